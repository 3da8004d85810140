"""Put an adapted CLIP into a trained OVSeg segmenter checkpoint (reference 4.4,
`tools/ovseg_replace_clip.py`).

    python -m ovseg_jax.merge --segmenter model_final.pth --clip runs/vitl_mpt --out ovseg_ft_mpt.pth

`--clip` is a trainer workdir of a CLIP stage (its latest checkpoint) or any CLIP checkpoint
`ovseg_jax.clip.load` reads. Every CLIP key `k` present as `clip_adapter.clip_model.k` in the
segmenter's `model` dict is overwritten; `visual.mask_embedding` is added when the CLIP has mask
prompts (then evaluate with mask prompts on). The output is `{"model": {...}}` for torch.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from flax import nnx

from ovseg_jax import checkpoint
from ovseg_jax.convert.torch_io import CheckpointError, read_state_dict, write_torch_file
from ovseg_jax.models.clip import CLIP, ClipConfig

log = logging.getLogger(__name__)

PREFIX = "model.clip_adapter.clip_model."


def clip_from_workdir(workdir: str | Path) -> CLIP:
    """The CLIP of a trainer workdir's latest checkpoint (architecture from its saved config)."""
    config = checkpoint.load_config(workdir)
    if config.get("task") != "clip":
        raise CheckpointError(f"{workdir}: a {config.get('task')!r} run, not a CLIP stage")
    model = CLIP(ClipConfig(**config["model"]["clip"]), rngs=nnx.Rngs(0))
    checkpoint.assign_params(model, checkpoint.load_params(workdir), source=str(workdir))
    return model


def merge(segmenter_path: str | Path, clip: CLIP, out_path: str | Path) -> Path:
    """Write `segmenter_path`'s parameters with the CLIP ones replaced by `clip`'s -> `out_path`."""
    from ovseg_jax.clip import openai_state_dict  # noqa: PLC0415

    state = read_state_dict(segmenter_path)
    if not any(k.startswith(PREFIX) for k in state):
        raise CheckpointError(f"{segmenter_path}: no {PREFIX}* keys; expected an OVSeg segmenter checkpoint")
    replaced = 0
    for key, value in openai_state_dict(clip).items():
        target = PREFIX + key
        if target in state:
            if state[target].shape != value.shape:
                raise CheckpointError(f"{segmenter_path}: {target} has shape {state[target].shape}; the "
                                      f"adapted CLIP's is {value.shape} (a different CLIP architecture?)")
            replaced += 1
        elif key != "visual.mask_embedding":
            continue
        state[target] = np.asarray(value, np.float32)
    log.info("replaced %d CLIP tensors%s", replaced,
             " and added visual.mask_embedding" if clip.config.mask_prompt_depth else "")
    model = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    write_torch_file({"model": model}, out_path)
    return Path(out_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segmenter", required=True, help="trained OVSeg segmenter .pth")
    parser.add_argument("--clip", required=True, help="CLIP stage workdir or CLIP checkpoint")
    parser.add_argument("--out", required=True, help="output .pth")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    if checkpoint.is_checkpoint_dir(args.clip):
        clip = clip_from_workdir(args.clip)
    else:
        from ovseg_jax.clip import load  # noqa: PLC0415

        clip = load(args.clip).model
    print(merge(args.segmenter, clip, args.out))


if __name__ == "__main__":
    main()
