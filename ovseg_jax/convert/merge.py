"""Put an adapted CLIP into a trained OVSeg segmenter checkpoint (reference 4.4,
`tools/ovseg_replace_clip.py`).

    python -m ovseg_jax.merge --segmenter model_final.pth --clip runs/vitl_mpt --out ovseg_ft_mpt.pth

`--segmenter` is an OVSeg checkpoint or a segmenter-stage training workdir (its latest checkpoint,
written out in the OVSeg layout with the frozen CLIP it was trained with); `--clip` is a CLIP-stage
workdir or any checkpoint `ovseg_jax.clip.load` reads. Every CLIP key `k` present as
`clip_adapter.clip_model.k` in the segmenter's `model` dict is overwritten; `visual.mask_embedding`
is added when the CLIP has mask prompts (then evaluate with mask prompts on), and
`visual.vpt_embedding` when it has deep visual prompts (ovseg_jax's VPT baseline). The output is
`{"model": {...}}` for torch.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ovseg_jax.convert.torch_io import CheckpointError, read_state_dict, write_torch_file
from ovseg_jax.training import checkpoint

log = logging.getLogger(__name__)

PREFIX = "model.clip_adapter.clip_model."


def _segmenter_state(path: str | Path) -> dict[str, np.ndarray]:
    """`{"model.<OVSeg key>": array}` of an OVSeg checkpoint file or a segmenter-stage workdir."""
    if not checkpoint.is_checkpoint_dir(path):
        return read_state_dict(path)
    import ovseg_jax.clip  # noqa: PLC0415
    import ovseg_jax.segmenter  # noqa: PLC0415

    state = ovseg_jax.segmenter.ovseg_state_dict(ovseg_jax.segmenter.load(path), ovseg_jax.clip.load(path))
    return {f"model.{k}": v for k, v in state.items()}


def merge(segmenter_path: str | Path, clip, out_path: str | Path) -> Path:
    """Write `segmenter_path`'s parameters (an OVSeg checkpoint or a segmenter workdir) with the CLIP
    ones replaced by `clip`'s (an `ovseg_jax.clip.Clip` or `CLIP`) -> `out_path`."""
    from ovseg_jax.clip import openai_state_dict  # noqa: PLC0415

    state = _segmenter_state(segmenter_path)
    if not any(k.startswith(PREFIX) for k in state):
        raise CheckpointError(f"{segmenter_path}: no {PREFIX}* keys; expected an OVSeg segmenter checkpoint")
    replaced = 0
    adapted = openai_state_dict(clip)
    for key, value in adapted.items():
        target = PREFIX + key
        if target in state:
            if state[target].shape != value.shape:
                raise CheckpointError(f"{segmenter_path}: {target} has shape {state[target].shape}; the "
                                      f"adapted CLIP's is {value.shape} (a different CLIP architecture?)")
            replaced += 1
        elif key not in ("visual.mask_embedding", "visual.vpt_embedding"):
            continue
        state[target] = np.asarray(value, np.float32)
    added = [k for k in ("visual.mask_embedding", "visual.vpt_embedding") if k in adapted]
    log.info("replaced %d CLIP tensors%s", replaced, f" and added {', '.join(added)}" if added else "")
    model = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    write_torch_file({"model": model}, out_path)
    return Path(out_path)
