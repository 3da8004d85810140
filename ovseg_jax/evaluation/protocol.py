"""The paper's evaluation protocol on a dataset (reference 0, 1.7, 5, appendix C):
`evaluate_benchmark(segmenter, clip, dataset, ...) -> report` (`python -m ovseg_jax.evaluate`
is its command).

Settings: the ensemble weight λ comes from the dataset (0.7 A-150/A-847, 0.6 PC-59/PC-459, 0.45
PAS-20), the mask threshold and test size from the segmenter's backbone (Swin-B: 0.4, short side
640 / long side 2560; R101c: 0.5, 512 / 2048). Modes as the appendix's Table 1: "ensemble",
"segmenter" (MaskFormer only), "clip" (CLIP only, λ = 0).

With SAM's automatic masks as proposals (`proposals="sam"` / `"both"`, `inference.sam_proposals`)
λ defaults to 0 for "sam" (CLIP only; SAM has no class scores) and to the dataset's for "both"; the
test size stays the benchmark's. A SAM that is not a released architecture (a test model) makes
the report a smoke test, and the report says so (`smoke_test`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import jax

from ovseg_jax.data import registry
from ovseg_jax.evaluation.evaluator import TTA, evaluate, grid
from ovseg_jax.evaluation.metrics import segmentation_metrics
from ovseg_jax.evaluation.report import draw_iou_chart, finite, format_table
from ovseg_jax.evaluation.seen import seen_rule, unseen_classes
from ovseg_jax.inference.ensemble import PROPOSALS, Predictor
from ovseg_jax.inference.inputs import BUCKET
from ovseg_jax.inference.loading import RESIZE
from ovseg_jax.inference.sam_proposals import not_released_reason

DATASETS = {"ade150": "ade20k_150", "ade847": "ade20k_847", "pc59": "pascal_context_59", "pc459": "pascal_context_459",
            "voc20": "pascal_voc_20", "synthetic": "synthetic"}
# Reference 0: the mask threshold of each released model, by its segmenter's backbone (the test
# size per backbone is `inference.loading.RESIZE`).
MASK_THRESHOLD = {"swin": 0.4, "resnet": 0.5}
MODES = ("ensemble", "segmenter", "clip")


def dataset_spec(name: str) -> registry.DatasetSpec:
    """A short benchmark name (`DATASETS`), a registry name or a dataset folder's path (layouts in
    `ovseg_jax.data.custom`) -> its `registry.DatasetSpec`."""
    try:
        return registry.get(DATASETS.get(name, name))
    except KeyError:
        raise ValueError(f"--dataset {name!r} unknown; expected one of {', '.join(DATASETS)}, "
                         f"a registry name ({', '.join(registry.names())}) or a dataset folder") from None


def check_proposals(proposals: str, has_sam: bool, mode: str, sweeps: dict, tta: TTA) -> None:
    """ValueError for settings SAM proposals cannot run: without a SAM, segmenter only, sweeps or
    TTA (those recombine the segmenter's proposals, `evaluator.batch_labels`)."""
    if proposals not in PROPOSALS:
        raise ValueError(f"proposals must be one of {', '.join(PROPOSALS)}; got {proposals!r}")
    if proposals == "maskformer":
        return
    if not has_sam:
        raise ValueError(f"--proposals {proposals} needs --sam-checkpoint (sam_vit_{{b,l,h}}_*.pth or a transformers "
                         "SamModel directory)")
    if mode == "segmenter":
        raise ValueError(f"--proposals {proposals}: SAM's masks are classified by CLIP; use --mode ensemble or clip")
    if sweeps or tta.enabled:
        raise ValueError(f"--proposals {proposals} evaluates one setting without TTA (--sweep and --tta recombine "
                         "the segmenter's proposals)")


def model_defaults(backbone: str, dataset: str) -> dict:
    """The evaluation settings of a segmenter backbone (reference 0): mask threshold, test size,
    bucket, templates; the synthetic world's are the demo's (`configs/synthetic.py`'s eval)."""
    short, max_size = RESIZE.get(backbone, RESIZE["swin"])
    defaults = {"mask_threshold": MASK_THRESHOLD.get(backbone, 0.4), "short": short, "max_size": max_size,
                "bucket": BUCKET, "templates": "vild"}
    if dataset == "synthetic":
        from ovseg_jax.experiments.demo import load_config  # noqa: PLC0415  (reads configs/synthetic.py)

        e = load_config(None).eval
        defaults.update(mask_threshold=e.mask_threshold, short=e.short, max_size=e.max_size, bucket=e.bucket,
                        templates=list(e.templates))
    return defaults


def evaluate_benchmark(segmenter, clip, spec: registry.DatasetSpec, root: str | None, split: str, *,
                       mode: str = "ensemble", ensemble_weight: float | None = None,
                       mask_threshold: float | None = None, sweeps: dict[str, list[float]] | None = None,
                       templates=None, mask_prompts: bool = True, crop: str = "masked",
                       clip_top_k: int | None = None, short: int | None = None, max_size: int | None = None,
                       bucket: int | None = None, batch_size: int = 1, tta: TTA = TTA(),
                       max_images: int | None = None, progress: bool = True, num_workers: int = 0,
                       seen_classes: Sequence[str] | None = None, labels: dict | None = None,
                       proposals: str = "maskformer", sam=None) -> dict:
    """Evaluate a (Segmenter, Clip) pair on `spec`'s `split` under the protocol -> the report
    (`metrics.json`'s content: the best setting's metrics, `setting`, `unseen`, and `sweep` for a grid).

    Unset options take the protocol's values (`model_defaults`, the dataset's λ); `mode` "segmenter"
    sets λ to None, "clip" to 0; `sweeps` {"lambda": [...], "threshold": [...]} evaluates their grid.
    `seen_classes`: the classes the models were trained on (default: `seen.unseen_classes`'s rule);
    `proposals`, `sam`: SAM's automatic masks as proposals (`Predictor`'s options; see the module docstring);
    `labels`: extra fields for the report (e.g. the dataset name as typed, the checkpoint)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    sweeps = sweeps or {}
    check_proposals(proposals, sam is not None, mode, sweeps, tta)
    source = spec.make_source(root, split)
    names = list(source.class_names)
    if seen_classes is None:
        unseen, rule = unseen_classes(spec.name, names, root), seen_rule(spec.name)
    else:
        unknown = [n for n in seen_classes if n not in names]
        if unknown:
            raise ValueError(f"seen classes {unknown} are not classes of {spec.name} ({', '.join(names)})")
        unseen, rule = [n for n in names if n not in seen_classes], "given seen classes (--seen-classes)"
    backbone = segmenter.config.backbone
    defaults = model_defaults(backbone, spec.name)
    threshold = defaults["mask_threshold"] if mask_threshold is None else mask_threshold
    weight = (0.0 if proposals == "sam" else spec.ensemble_weight) if ensemble_weight is None else ensemble_weight
    weight = {"segmenter": None, "clip": 0.0}.get(mode, weight)
    settings = grid(sweeps.get("lambda", [weight]), sweeps.get("threshold", [threshold]))
    short, max_size = short or defaults["short"], max_size or defaults["max_size"]
    bucket = bucket or defaults["bucket"]
    templates = defaults["templates"] if templates is None else templates
    predictor = Predictor(segmenter, clip, mask_threshold=settings[0].mask_threshold,
                          ensemble_weight=settings[0].ensemble_weight, mask_prompts=mask_prompts,
                          templates=templates, crop=crop, clip_top_k=clip_top_k, proposals=proposals, sam=sam)
    result = evaluate(predictor, source, settings, ignore_value=spec.ignore_value, short=short, max_size=max_size,
                      bucket=bucket, batch_size=batch_size, tta=tta, max_images=max_images,
                      progress=progress and jax.process_index() == 0, num_workers=num_workers)
    metrics = {s: segmentation_metrics(result.confusion[s], names, unseen) for s in settings}
    best = max(settings, key=lambda s: metrics[s]["mIoU"])
    report = {
        **(labels or {}), "registry_name": spec.name, "split": split, "root": root,
        "images": result.images, "skipped": result.skipped,
        "seconds": round(result.seconds, 2), "images_per_second": round(result.images / result.seconds, 3),
        "setting": {"mode": mode, "ensemble_weight": best.ensemble_weight, "mask_threshold": best.mask_threshold,
                    "templates": templates, "crop": crop, "mask_prompts": predictor.mask_prompts,
                    "clip_top_k": clip_top_k, "backbone": backbone, "short": short, "max_size": max_size,
                    "bucket": bucket, "batch_size": batch_size, "processes": jax.process_count(),
                    "devices": len(jax.devices()), "tta": {"scales": list(tta.scales), "flip": tta.flip},
                    "proposals": proposals},
        **metrics[best],
        "unseen": unseen,
        "seen_rule": rule,
    }
    report.setdefault("dataset", spec.name)
    if proposals != "maskformer" and not_released_reason(sam.config):
        report["smoke_test"] = not_released_reason(sam.config)
    if len(settings) > 1:
        summary = ("mIoU", "mIoU_seen", "mIoU_unseen", "fwIoU", "mACC", "pACC")
        cells = [{"ensemble_weight": s.ensemble_weight, "mask_threshold": s.mask_threshold,
                  **{k: metrics[s][k] for k in summary if k in metrics[s]}} for s in settings]
        report["sweep"] = {"lambda": sorted({s.ensemble_weight for s in settings}),
                           "threshold": sorted({s.mask_threshold for s in settings}), "cells": cells,
                           "best": cells[settings.index(best)]}
    report["best_setting"] = best.describe()
    return finite(report)


def write_report(report: dict, out: str | Path) -> tuple[Path, Path]:
    """Write `metrics.json` and `per_class_iou.png` into `out` -> their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=1))
    chart = draw_iou_chart(report["IoU"], report["unseen"], out / "per_class_iou.png",
                           f"{report['dataset']} {report['split']}: per-class IoU ({report['best_setting']}), "
                           f"mIoU {report['mIoU']:.1f}")
    return out / "metrics.json", chart


__all__ = ["DATASETS", "MASK_THRESHOLD", "MODES", "dataset_spec", "check_proposals", "model_defaults",
           "evaluate_benchmark", "write_report", "format_table"]
