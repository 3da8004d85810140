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
import contextlib
import logging
import sys
from pathlib import Path
from typing import Iterator, Sequence

from ovseg_jax.convert.torch_io import CheckpointError

FORMATS = ("ovseg", "openai", "hf")


@contextlib.contextmanager
def exit_on_error() -> Iterator[None]:
    """For command-line entry points: a CheckpointError / ValueError / OSError (FileNotFoundError,
    PermissionError, ...) becomes `error: <message>` on stderr and exit status 2 (no traceback)."""
    try:
        yield
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def cli_logging() -> None:
    """Log this package's INFO lines to stderr, and only orbax's (absl's) errors."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s:%(name)s: %(message)s")
    for name in ("ovseg_jax", "__main__"):
        logging.getLogger(name).setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.ERROR)


def export(source: str | Path, format: str, out: str | Path, *, clip: str | Path | None = None,
           tokenizer: str | Path | None = None) -> Path:
    """Write the model(s) of `source` (and `clip`, for "ovseg") to `out` in `format` -> `out`."""
    import ovseg_jax.clip as oclip  # noqa: PLC0415
    import ovseg_jax.segmenter as osegmenter  # noqa: PLC0415

    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {format!r}")
    if format != "ovseg":
        if clip is not None:
            raise ValueError(f"--clip is for --format ovseg; for {format}, --from is the CLIP to export")
        return oclip.export(oclip.load(source, tokenizer=tokenizer), out, format=format)
    segmenter = osegmenter.load(source)
    if clip is None:
        try:
            adapted = oclip.load(source, tokenizer=tokenizer)
        except CheckpointError as e:
            raise CheckpointError(f"{source} holds no CLIP to put into the OVSeg checkpoint ({e}); "
                                  "pass --clip") from None
    else:
        adapted = oclip.load(clip, tokenizer=tokenizer)
    if adapted.config.embed_dim != segmenter.config.clip_dim:
        raise ValueError(f"the CLIP embeds to {adapted.config.embed_dim} but the segmenter's open-vocabulary "
                         f"head has clip_dim {segmenter.config.clip_dim}")
    return osegmenter.export(segmenter, out, clip=adapted)


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
