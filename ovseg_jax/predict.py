"""Segment your own images with any class names: `python -m ovseg_jax.predict`.

    python -m ovseg_jax.predict --checkpoint ovseg_swinbase_vitL14_ft_mpt.pth \\
        --tokenizer bpe_simple_vocab_16e6.txt.gz --classes "sky,tree,red car" --input photos/ --output out/

Writes `<stem>.overlay.png`, `<stem>.labels.png` and `<stem>.json` per image
(`ovseg_jax.inference.files`).

Modes (reference 1.7 / 1.10): "semantic" labels every pixel with the ensemble of the segmenter's and
CLIP's class probabilities (λ 0.7, mask threshold 0.4: the evaluation setting); "demo" is the
original web demo (λ 0: CLIP only, threshold 0.35; for each class its best proposal; pixels no
kept proposal covers are unlabeled; one class name competes against "others").

SAM's automatic masks as proposals (`ovseg_jax.inference.sam_proposals`); the original Space's SAM demo:

    python -m ovseg_jax.predict --checkpoint ovseg_swinbase_vitL14_ft_mpt.pth --tokenizer bpe_simple_vocab_16e6.txt.gz \
        --proposals sam --sam-checkpoint sam_vit_l_0b3195.pth --mode demo --granularity 0.8 \
        --classes "cat,sofa,wall" --input photos/ --output out/
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from ovseg_jax.inference.ensemble import Predictor
from ovseg_jax.inference.files import format_summary, predict_files
from ovseg_jax.inference.inputs import BUCKET, InputError, collect_inputs, parse_class_names, parse_templates
from ovseg_jax.inference.loading import MODE_DEFAULTS, RESIZE, TOKENIZER_PLACES, load_predictor
from ovseg_jax.inference.sam_proposals import add_sam_arguments, not_released_reason, parse_sam_options
from ovseg_jax.utils.compilation import default_cache_dir
from ovseg_jax.utils.host_memory import keep_freed_memory

log = logging.getLogger("ovseg_jax.predict")

_UNSET = object()  # --ensemble-weight not given: the mode's default


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ovseg_jax.predict", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Writes <stem>.overlay.png, <stem>.labels.png (class indices; uint8 with "
                                       "255 = unlabeled for < 255 classes, else uint16 with 65535) and <stem>.json "
                                       "per image into --output.")
    p.add_argument("--checkpoint", required=True, help="merged OVSeg .pth, original OVSeg .pth, or segmenter workdir")
    p.add_argument("--tokenizer", help="tokenizer directory or OpenAI's bpe_simple_vocab_16e6.txt.gz "
                                       f"(default: the run's, or beside the checkpoint: {', '.join(TOKENIZER_PLACES)})")
    names = p.add_mutually_exclusive_group(required=True)
    names.add_argument("--classes", help='comma-separated class names, e.g. "sky,tree,red car"')
    names.add_argument("--classes-file", help="a text file with one class name per line (any readable file, e.g. "
                       "<(...) in a shell; '-' reads standard input)")
    names.add_argument("--classes-from", metavar="DATASET", help="the class list of a dataset: a dataset folder "
                       "(docs/own-data.md) or a registry name such as ade20k_150")
    p.add_argument("--input", required=True, nargs="+", help="image files, directories or glob patterns")
    p.add_argument("--output", required=True, help="output directory (created)")
    p.add_argument("--mode", choices=sorted(MODE_DEFAULTS), default="semantic")
    p.add_argument("--ensemble-weight", type=_weight, default=_UNSET,
                   help="λ: 0 = CLIP only, 'none' = segmenter only (default 0.7 semantic, 0.0 demo)")
    p.add_argument("--mask-threshold", type=float, default=None, help="default 0.4 semantic, 0.35 demo")
    p.add_argument("--templates", default=None, help="prompt templates: 'vild' (14), 'single', or your own with "
                   "'{}', separated by ';' (default vild; demo mode with SAM: the Space's 'a photo of {}')")
    p.add_argument("--no-mask-prompts", action="store_true", help="run CLIP without its mask prompts")
    p.add_argument("--clip-top-k", type=int, default=None, metavar="K",
                   help="CLIP on the K valid proposals the segmenter ranks highest only (default: all, as the paper)")
    add_sam_arguments(p)
    p.add_argument("--granularity", type=float, default=1.0, help="demo mode with SAM proposals: each class keeps "
                   "every mask scoring above this fraction of its best (default 1: the best only)")
    p.add_argument("--short", type=int, default=None, help="short side of the model input (default 640; R101c 512; "
                   "with --proposals sam the Space's long side 1280: short = max size = 1280)")
    p.add_argument("--max-size", type=int, default=None, help="long side cap (default 2560; R101c 2048)")
    p.add_argument("--bucket", type=int, default=BUCKET, help="pad sizes to multiples of this (compile buckets)")
    p.add_argument("--batch-size", type=int, default=4, help="images of one padded shape per device call")
    p.add_argument("--side-by-side", action="store_true", help="overlay pictures show the input on the left")
    p.add_argument("--compile-cache", default=str(default_cache_dir()),
                   help="JAX persistent compilation cache: later runs skip compiling ('none': off; default %(default)s)")
    return p


def _weight(text: str) -> float | None:
    if text.lower() == "none":
        return None
    return float(text)


def _check_args(args) -> None:
    for name in ("short", "max_size", "bucket", "batch_size"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive; got {value}")
    if args.bucket % 32:
        raise InputError(f"--bucket must be a multiple of 32 (the segmenter's size divisibility); got {args.bucket}")


def run(args) -> dict:
    """The command: check inputs, load, segment, print the summary -> the summary dict."""
    from ovseg_jax.text import templates as resolve_templates  # noqa: PLC0415

    _check_args(args)
    class_names = parse_class_names(args.classes, args.classes_file, args.classes_from)
    templates = None  # the mode's default
    if args.templates is not None:
        try:
            templates = parse_templates(args.templates)
            resolve_templates(templates)
        except ValueError as e:
            raise InputError(f"--templates: {e}") from None
    paths = collect_inputs(args.input)
    if args.compile_cache and args.compile_cache.lower() != "none":
        from ovseg_jax.utils.compilation import enable_cache  # noqa: PLC0415

        enable_cache(args.compile_cache, min_compile_seconds=0.0)  # model init compiles too
    options = {"mode": args.mode, "mask_prompts": not args.no_mask_prompts, "clip_top_k": args.clip_top_k,
               "proposals": args.proposals, "granularity": args.granularity, "sam_checkpoint": args.sam_checkpoint,
               "sam_options": parse_sam_options(args.sam_option), "sam_dtype": args.sam_dtype}
    if templates is not None:
        options["templates"] = templates
    if args.mask_threshold is not None:
        options["mask_threshold"] = args.mask_threshold
    if args.ensemble_weight is not _UNSET:
        options["ensemble_weight"] = args.ensemble_weight
    predictor = _load(args.checkpoint, args.tokenizer, options)
    smoke_test = predictor.proposal_source != "maskformer" and not_released_reason(predictor.sam.config)
    if smoke_test:
        print(f"warning: {smoke_test}", file=sys.stderr)
    short, max_size = predictor.resize or RESIZE["swin"]
    short, max_size = args.short or short, args.max_size or max_size
    summary = predict_files(predictor, paths, class_names, Path(args.output), short=short, max_size=max_size,
                            bucket=args.bucket, batch_size=args.batch_size, side_by_side=args.side_by_side)
    print(format_summary(summary))
    return summary


def _load(checkpoint: str, tokenizer: str | None, options: dict) -> Predictor:
    from ovseg_jax.convert.torch_io import CheckpointError  # noqa: PLC0415

    try:
        return load_predictor(checkpoint, tokenizer, **options)
    except (CheckpointError, FileNotFoundError) as e:
        raise InputError(str(e).splitlines()[0]) from None
    except ValueError as e:  # Predictor's option checks
        raise InputError(str(e)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m ovseg_jax.predict ...` -> exit status (0 ok, 2 bad input, 1 when every image was skipped)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = run(args)
    except InputError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    return 1 if summary["images"] == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
