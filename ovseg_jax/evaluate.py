"""Semantic-segmentation evaluation as the paper's tables: `python -m ovseg_jax.evaluate`.

    python -m ovseg_jax.evaluate --checkpoint ovseg_swinbase_vitL14_ft_mpt.pth \
        --tokenizer bpe_simple_vocab_16e6.txt.gz --dataset ade150 --root $DETECTRON2_DATASETS
    python -m ovseg_jax.evaluate ... --dataset path/to/my_data --seen-classes seen.txt   # your own (docs/own-data.md)
    python -m ovseg_jax.evaluate ... --sweep lambda=0.6,0.65,...,0.8 --sweep threshold=0.35,0.4,0.45
    python -m ovseg_jax.evaluate ... --mode clip --crop box --no-mask-prompts     # appendix A
    python -m ovseg_jax.evaluate ... --tta flip --tta-scales 0.75,1.0,1.25
    python -m ovseg_jax.evaluate ... --clip-top-k 25     # CLIP on the segmenter's 25 best proposals only
    python -m ovseg_jax.evaluate ... --proposals sam --sam-checkpoint sam_vit_l_0b3195.pth   # SAM's masks (docs/sam.md)

Metrics have the original evaluator's math (reference 5): one confusion matrix over the whole
dataset (rows = prediction, columns = ground truth, ignored pixels excluded); IoU for classes with
ground-truth pixels, mIoU = their sum / the number of classes in the ground truth *or* the
predictions; fwIoU, mACC, pACC as detectron2's `SemSegEvaluator`.

Settings (reference 0, 1.7, 5, appendix C): the ensemble weight λ comes from the dataset (0.7
A-150/A-847, 0.6 PC-59/PC-459, 0.45 PAS-20), the mask threshold and test size from the segmenter's
backbone (Swin-B: 0.4, short side 640 / long side 2560; R101c: 0.5, 512 / 2048). Modes as the
appendix's Table 1: "ensemble", "segmenter" (MaskFormer only), "clip" (CLIP only, λ = 0).

Sweeps evaluate a λ x threshold grid in one pass: each image's proposals are computed once, CLIP
classifies its crops once per threshold, and every λ is a cheap recombination (`combine`); one
confusion matrix per grid cell. TTA follows detectron2's `SemanticSegmentorWithTTA`: each scale
resizes the original image (short side `short * s`, long side `max_size * s`), flip mirrors the
resized image, and the score maps, resized to the original size (and mirrored back), are averaged
before the argmax.

Images are sharded over processes (`eval_loader`'s i = p, p+P, ...; confusion matrices summed with
`multihost_utils.process_allgather`) and over each process's local devices (one model replica and
one worker thread per device; a batch of same-bucket images per device call).

Seen / unseen classes (appendix H, Figure 2): the synthetic world's unseen list; for the
benchmarks, a class is *seen* when one of its names matches a COCO-Stuff-171 training class
(`coco_seen`): names are compared lower-case with everything but letters removed, each of a
class's comma-separated synonyms on its own ("sidewalk, pavement" matches "pavement"), a COCO-Stuff
name also by its head before "-" ("wall-brick" -> "wall", "sky-other" -> "sky"), plus the spelling
variants in `COCO_ALIASES` ("aeroplane" = "airplane", "sofa" = "couch", ...).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

import jax

from ovseg_jax.data import registry
from ovseg_jax.data.custom import parse_classes, split_name
from ovseg_jax.evaluation.evaluator import TTA, parse_sweeps, parse_values
from ovseg_jax.evaluation.protocol import (DATASETS, MODES, check_proposals, dataset_spec, evaluate_benchmark,
                                           write_report)
from ovseg_jax.evaluation.report import format_table
from ovseg_jax.inference.inputs import parse_templates
from ovseg_jax.inference.loading import load_predictor
from ovseg_jax.inference.sam_proposals import SamProposals, add_sam_arguments, not_released_reason, parse_sam_options
from ovseg_jax.utils.cli import cli_logging, exit_on_error
from ovseg_jax.utils.host_memory import keep_freed_memory


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ovseg_jax.evaluate", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="OVSeg checkpoint (segmenter + CLIP: a released .pth, our "
                   "merged file) or a segmenter training workdir")
    p.add_argument("--tokenizer", help="tokenizer directory or OpenAI's bpe_simple_vocab_16e6.txt.gz (default: "
                   "the workdir run's, or one beside the checkpoint; synthetic: ROOT/tokenizer)")
    p.add_argument("--dataset", required=True, help=f"{' | '.join(DATASETS)}, a registry name, or the path of your own "
                   "dataset folder (layouts: docs/own-data.md)")
    p.add_argument("--root", help="datasets root (default $DETECTRON2_DATASETS, else ./datasets; synthetic: the world)")
    p.add_argument("--split", help="default val (a dataset folder with one split: that one)")
    p.add_argument("--seen-classes", help="the classes the model was trained on, comma-separated or a file with one "
                   "per line (default: a dataset folder's dataset.json 'seen', else the COCO-Stuff name match)")
    p.add_argument("--out", help="output folder (default outputs/evaluate/<dataset>-<split>)")
    p.add_argument("--mode", choices=MODES, default="ensemble", help="appendix Table 1: ensemble, segmenter only, "
                   "CLIP only")
    p.add_argument("--ensemble-weight", type=float, help="λ (default per dataset: 0.7 / 0.6 / 0.45)")
    p.add_argument("--mask-threshold", type=float, help="default per model: 0.4 Swin-B, 0.5 R101c")
    p.add_argument("--templates", help="vild | single | imagenet80, or templates with {} separated by ';'")
    p.add_argument("--no-mask-prompts", action="store_true", help="plain CLIP forward on the crops")
    p.add_argument("--crop", choices=("masked", "box"), default="masked", help="appendix A: masked or plain box crops")
    p.add_argument("--clip-top-k", type=int, metavar="K", help="CLIP on the K valid proposals the segmenter ranks "
                   "highest only, the others classified by the segmenter (default: all, as the paper)")
    add_sam_arguments(p)
    p.add_argument("--short", type=int, help="test short side (default per model: 640 Swin-B, 512 R101c)")
    p.add_argument("--max-size", type=int, help="test long-side cap (default 2560 Swin-B, 2048 R101c)")
    p.add_argument("--bucket", type=int, help="pad to multiples of this (one compilation per padded shape)")
    p.add_argument("--batch-size", type=int, default=1, help="images per device call")
    p.add_argument("--max-images", type=int, help="only the first N images of the split")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="lambda=0,0.1,...,1 and/or threshold=0.3,0.4,0.5: the grid in one pass")
    p.add_argument("--tta", choices=("none", "flip"), default="none", help="add horizontally mirrored passes")
    p.add_argument("--tta-scales", default="1.0", help="test-size scales, e.g. 0.75,1.0,1.25")
    p.add_argument("--num-workers", type=int, default=0, help="data loading processes")
    p.add_argument("--no-progress", action="store_true")
    return p


def _load(args, root: str | None):
    """(Segmenter, Clip) of `--checkpoint` through `inference.loading.load_predictor`."""
    tokenizer = args.tokenizer
    if tokenizer is None and args.dataset == "synthetic" and (Path(root) / "tokenizer").is_dir():
        tokenizer = str(Path(root) / "tokenizer")
    loaded = load_predictor(args.checkpoint, tokenizer)
    return loaded.segmenter, loaded.clip


def _seen_classes(text: str) -> list[str]:
    """`--seen-classes`: a file with one name per line (as classes.txt), or comma-separated names."""
    if Path(text).is_file():
        return parse_classes(Path(text))
    return [n.strip() for n in text.split(",") if n.strip()]


def _check(args, sweeps: dict, tta: TTA) -> None:
    for flag in ("batch_size", "max_images", "short", "max_size", "bucket", "clip_top_k"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive; got {getattr(args, flag)}")
    if any(s <= 0 for s in tta.scales):
        raise ValueError(f"--tta-scales must be positive; got {args.tta_scales}")
    if args.mode != "ensemble" and "lambda" in sweeps:
        raise ValueError(f"--sweep lambda needs --mode ensemble (mode {args.mode} fixes λ)")
    if args.mode == "segmenter" and args.clip_top_k is not None:
        raise ValueError("--clip-top-k needs CLIP (mode ensemble or clip): the segmenter alone runs no crops")
    if args.mode == "segmenter" and "threshold" in sweeps:
        raise ValueError("--sweep threshold needs CLIP (mode ensemble or clip): the segmenter alone has no crops")
    check_proposals(args.proposals, args.sam_checkpoint is not None, args.mode, sweeps, tta)


def _load_sam(args) -> SamProposals | None:
    """`--sam-checkpoint` with its `--sam-option`s, or None; a test model is announced as a smoke test."""
    if args.proposals == "maskformer":
        return None
    import jax.numpy as jnp  # noqa: PLC0415

    sam = SamProposals.load(args.sam_checkpoint, dtype=getattr(jnp, args.sam_dtype),
                            **parse_sam_options(args.sam_option))
    if not_released_reason(sam.config):
        print(f"warning: {not_released_reason(sam.config)}", file=sys.stderr)
    return sam


def run(argv: Sequence[str] | None = None, models: tuple | None = None) -> dict:
    """The CLI without the exit handling -> the report written to `OUT/metrics.json`. `models`:
    an already loaded `(Segmenter, Clip)` to evaluate instead of loading `--checkpoint`."""
    from ovseg_jax.training.sharding import initialize_distributed  # noqa: PLC0415

    args = _parser().parse_args(argv)
    initialize_distributed()
    spec = dataset_spec(args.dataset)
    tfds, folder = spec.name.startswith("tfds:"), spec.name not in registry.names()
    root = spec.name if folder else args.root or (None if tfds else os.environ.get("DETECTRON2_DATASETS", "datasets"))
    if args.split is None:
        args.split = "val" if "val" in spec.splits or len(spec.splits) != 1 else spec.splits[0]
    if not tfds and not Path(root).is_dir():
        raise ValueError(f"--root {root}: no such directory (the datasets root, as detectron2's DETECTRON2_DATASETS"
                         + (", or the synthetic world's folder)" if spec.name == "synthetic" else ")"))
    if args.split not in spec.splits:
        raise ValueError(f"--split {args.split!r}: {spec.name} has {', '.join(spec.splits)}")
    sweeps = parse_sweeps(args.sweep)
    tta = TTA(tuple(parse_values(args.tta_scales)), args.tta == "flip")
    _check(args, sweeps, tta)
    segmenter, clip = models or _load(args, root)
    sam = _load_sam(args)
    report = evaluate_benchmark(
        segmenter, clip, spec, root, args.split, mode=args.mode, ensemble_weight=args.ensemble_weight,
        mask_threshold=args.mask_threshold, sweeps=sweeps,
        templates=None if args.templates is None else parse_templates(args.templates),
        mask_prompts=not args.no_mask_prompts, crop=args.crop, clip_top_k=args.clip_top_k, short=args.short,
        max_size=args.max_size, bucket=args.bucket, batch_size=args.batch_size, tta=tta,
        max_images=args.max_images, progress=not args.no_progress, num_workers=args.num_workers,
        seen_classes=None if args.seen_classes is None else _seen_classes(args.seen_classes),
        labels={"dataset": args.dataset, "checkpoint": args.checkpoint}, proposals=args.proposals, sam=sam)
    if jax.process_index() == 0:
        name = split_name(args.dataset) if folder else args.dataset.replace(":", "_")
        out = Path(args.out or Path("outputs") / "evaluate" / f"{name}-{args.split}")
        metrics_path, chart = write_report(report, out)
        print(format_table(report))
        if "smoke_test" in report:
            print(f"\nSMOKE TEST: {report['smoke_test']}")
        print(f"\nwrote {metrics_path} and {chart}")
    return report


def main(argv: Sequence[str] | None = None) -> None:
    keep_freed_memory()
    cli_logging()
    with exit_on_error():
        run(argv)


if __name__ == "__main__":
    main()
