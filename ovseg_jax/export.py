"""Export any model this package loads (a checkpoint file or a training workdir) for PyTorch.

    python -m ovseg_jax.export --from runs/segmenter --format ovseg --out ovseg_ft_mpt.pth [--clip runs/vitl_mpt]
    python -m ovseg_jax.export --from runs/vitl_mpt --format openai --out vitl_mpt.pt
    python -m ovseg_jax.export --from runs/vitl_mpt --format hf --out vitl_mpt_hf/

- `ovseg`: what the original OVSeg code loads: a detectron2-style `{"model": {...}}` `.pth` (or a
  flat `.safetensors`) with the segmenter under reference 6.1's names and the CLIP as
  `clip_adapter.clip_model.*` (`ovseg_jax.segmenter.export`). `--from` is the segmenter (any file
  or workdir `ovseg_jax.segmenter.load` reads); `--clip` the CLIP (any `ovseg_jax.clip.load`
  input), by default the CLIP inside `--from` (an OVSeg checkpoint's, or the frozen CLIP a
  segmenter workdir was trained with).
- `openai`: an OpenAI CLIP state dict (`visual.mask_embedding` included when the CLIP has mask
  prompts); `hf`: a transformers `CLIPModel` directory (`ovseg_jax.clip.export`). `--from` is the
  CLIP: a CLIP file or workdir, or an OVSeg checkpoint / segmenter workdir for the CLIP inside.

`--tokenizer` (a tokenizer directory or OpenAI's BPE file) replaces the tokenizer that comes
with the CLIP (written into `hf` directories). Unreadable or unfitting inputs end with one line
`error: ...` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from ovseg_jax.convert.export import FORMATS, export
from ovseg_jax.utils.cli import cli_logging, exit_on_error


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", required=True,
                        help="checkpoint file or training workdir (the segmenter for ovseg, else the CLIP)")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, help="output file (ovseg, openai) or directory (hf)")
    parser.add_argument("--clip", help="ovseg only: the CLIP (file or workdir); default the one inside --from")
    parser.add_argument("--tokenizer", help="tokenizer directory or OpenAI BPE .txt.gz (default: the CLIP's own)")
    args = parser.parse_args(argv)
    cli_logging()
    with exit_on_error():
        print(export(args.source, args.format, args.out, clip=args.clip, tokenizer=args.tokenizer))


if __name__ == "__main__":
    main()
