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

import argparse
from typing import Sequence

from ovseg_jax.convert.merge import merge
from ovseg_jax.utils.cli import cli_logging, exit_on_error


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segmenter", required=True, help="trained OVSeg segmenter .pth or segmenter workdir")
    parser.add_argument("--clip", required=True, help="CLIP stage workdir or CLIP checkpoint")
    parser.add_argument("--out", required=True, help="output .pth")
    args = parser.parse_args(argv)
    cli_logging()
    with exit_on_error():
        from ovseg_jax.clip import load  # noqa: PLC0415

        print(merge(args.segmenter, load(args.clip), args.out))


if __name__ == "__main__":
    main()
