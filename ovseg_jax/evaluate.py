"""Semantic-segmentation evaluation as the paper's tables: `python -m ovseg_jax.evaluate`.

    python -m ovseg_jax.evaluate --checkpoint ovseg_swinbase_vitL14_ft_mpt.pth \
        --tokenizer bpe_simple_vocab_16e6.txt.gz --dataset ade150 --root $DETECTRON2_DATASETS
    python -m ovseg_jax.evaluate ... --sweep lambda=0.6,0.65,...,0.8 --sweep threshold=0.35,0.4,0.45
    python -m ovseg_jax.evaluate ... --mode clip --crop box --no-mask-prompts     # appendix A
    python -m ovseg_jax.evaluate ... --tta flip --tta-scales 0.75,1.0,1.25
    python -m ovseg_jax.evaluate ... --clip-top-k 25     # CLIP on the segmenter's 25 best proposals only

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
import concurrent.futures
import dataclasses
import functools
import itertools
import json
import logging
import math
import os
import re
import sys
import time
from collections import deque
from pathlib import Path
from typing import Iterable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ovseg_jax.host_memory import keep_freed_memory

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Metrics


class ConfusionMatrix:
    """`[C, C]` int64 counts, rows = prediction, columns = ground truth; ignored pixels excluded."""

    def __init__(self, num_classes: int, ignore_value: int = 255):
        self.num_classes = num_classes
        self.ignore_value = ignore_value
        self.counts = np.zeros((num_classes, num_classes), np.int64)

    def update(self, pred, label) -> None:
        """Add one image (or a batch): `pred`, `label` int `[..., H, W]` of equal shape.

        Labels other than `ignore_value` must lie in `[0, num_classes)`."""
        pred, label = np.asarray(pred, np.int64), np.asarray(label, np.int64)
        if pred.shape != label.shape:
            raise ValueError(f"prediction {pred.shape} and label {label.shape} differ in shape")
        valid = label != self.ignore_value
        bad = valid & ((label < 0) | (label >= self.num_classes))
        if bad.any():
            raise ValueError(f"labels outside [0, {self.num_classes}) other than ignore {self.ignore_value}: "
                             f"{np.unique(label[bad])[:10].tolist()}")
        if ((pred < 0) | (pred >= self.num_classes)).any():
            raise ValueError(f"predictions outside [0, {self.num_classes})")
        c = self.num_classes
        self.counts += np.bincount(pred[valid] * c + label[valid], minlength=c * c).reshape(c, c)

    def metrics(self, class_names: Sequence[str] | None = None, unseen: Iterable[str] = ()) -> dict:
        return segmentation_metrics(self.counts, class_names, unseen)


def segmentation_metrics(confusion: np.ndarray, class_names: Sequence[str] | None = None,
                         unseen: Iterable[str] = ()) -> dict:
    """`[C, C]` confusion (rows = prediction, cols = GT) -> `{"mIoU", "fwIoU", "mACC", "pACC",
    "IoU": {name: value or nan}, "ACC": {name: value or nan}}` in percent, as the original
    evaluator (nan: no ground-truth pixels). With `unseen` class names, also `mIoU_seen` /
    `mIoU_unseen`: mean IoU over the classes of each group that have GT pixels."""
    conf = np.asarray(confusion, np.float64)
    tp = np.diag(conf)
    pos_gt = conf.sum(axis=0)
    pos_pred = conf.sum(axis=1)
    acc_valid = pos_gt > 0
    iou_valid = (pos_gt + pos_pred) > 0
    iou = np.full(len(tp), np.nan)
    acc = np.full(len(tp), np.nan)
    union = pos_gt + pos_pred - tp
    iou[acc_valid] = tp[acc_valid] / union[acc_valid]
    acc[acc_valid] = tp[acc_valid] / pos_gt[acc_valid]
    total = pos_gt.sum()
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(tp))]
    if len(names) != len(tp):
        raise ValueError(f"{len(names)} class names for a {len(tp)}-class confusion matrix")
    unseen = set(unseen)
    groups = {}
    if unseen:
        is_unseen = np.array([n in unseen for n in names])
        for group, members in (("seen", ~is_unseen), ("unseen", is_unseen)):
            keep = members & acc_valid
            groups[f"mIoU_{group}"] = 100 * float(np.mean(iou[keep])) if keep.any() else float("nan")
    return {
        **groups,
        "mIoU": 100 * np.sum(iou[acc_valid]) / max(np.sum(iou_valid), 1),
        "fwIoU": 100 * np.sum(iou[acc_valid] * pos_gt[acc_valid] / max(total, 1)),
        "mACC": 100 * np.sum(acc[acc_valid]) / max(np.sum(acc_valid), 1),
        "pACC": 100 * np.sum(tp) / max(total, 1),
        "IoU": {n: 100 * v for n, v in zip(names, iou)},
        "ACC": {n: 100 * v for n, v in zip(names, acc)},
    }


def evaluate_dataset(predictor, examples: Iterable[Mapping[str, np.ndarray]], class_names: Sequence[str], *,
                     ignore_value: int, unseen: Iterable[str] = (), max_examples: int | None = None,
                     log_every: int = 50) -> dict:
    """Run `predictor` (anything with `ensemble.Predictor.predict`) image by image over eval examples
    (`ovseg_jax.data.pipeline.eval_loader`: padded `image`, original-size `label`, `resized_size`,
    `orig_size`) -> metrics, with `images` (evaluated) and `skipped` (bad examples the loader
    dropped: its `num_skipped`). The training-time evaluation; the CLI batches with `evaluate`."""
    confusion = ConfusionMatrix(len(class_names), ignore_value)
    start = time.perf_counter()
    count = 0
    examples = iter(examples)
    for count, example in enumerate(examples, 1):
        pred = predictor.predict(example["image"], class_names, resized_hw=tuple(example["resized_size"]),
                                 original_hw=tuple(example["orig_size"]))
        confusion.update(pred, example["label"])
        if log_every and count % log_every == 0:
            log.info("evaluated %d images (%.2f images/s)", count, count / (time.perf_counter() - start))
        if max_examples is not None and count >= max_examples:
            break
    skipped = int(getattr(examples, "num_skipped", 0))
    _warn_skipped(skipped, count)
    metrics = segmentation_metrics(confusion.counts, class_names, unseen)
    metrics["images"] = count
    metrics["skipped"] = skipped
    return metrics


def _warn_skipped(skipped: int, count: int) -> None:
    if skipped:
        log.warning("evaluation skipped %d bad example(s) (their files are named in the warnings above); "
                    "metrics are over the %d others", skipped, count)
    if count == 0:
        raise ValueError("no evaluation examples" + (f": all {skipped} were bad and skipped" if skipped else ""))


# ---------------------------------------------------------------------------------------------
# Seen and unseen classes (appendix H)

# Spelling variants between COCO-Stuff's names and the benchmarks' (normalised: letters only).
COCO_ALIASES = {"airplane": ("aeroplane", "plane"), "motorcycle": ("motorbike",), "tv": ("tvmonitor", "television"),
                "couch": ("sofa",), "shelf": ("shelves",)}


def _letters(name: str) -> str:
    return re.sub(r"[^a-z]", "", name.lower())


def coco_seen(class_names: Sequence[str], coco_names: Sequence[str]) -> list[bool]:
    """For each evaluation class: does one of its comma-separated synonyms match a COCO-Stuff class
    (full name, head before "-", or a `COCO_ALIASES` variant; compared as lower-case letters)?"""
    keys = set()
    for name in coco_names:
        for form in (name, name.split("-")[0]):
            keys.add(_letters(form))
            keys.update(COCO_ALIASES.get(form, ()))
    return [any(_letters(part) in keys for part in name.split(",") if part.strip()) for name in class_names]


def unseen_classes(dataset: str, class_names: Sequence[str], root: str | Path | None) -> list[str]:
    """The unseen classes of a registry dataset: the synthetic world's `classes.json` "unseen" list,
    else the classes `coco_seen` finds no COCO-Stuff match for (none for COCO-Stuff itself)."""
    if dataset == "synthetic":
        path = Path(root) / "classes.json"
        try:
            return list(json.loads(path.read_text())["unseen"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: cannot read the world's 'unseen' list ({type(e).__name__}: {e})") from None
    from ovseg_jax.data import registry  # noqa: PLC0415

    if dataset == "coco_stuff_171":
        return []
    seen = coco_seen(class_names, registry.class_names("coco_stuff_171"))
    return [n for n, s in zip(class_names, seen) if not s]


# ---------------------------------------------------------------------------------------------
# Settings, sweeps and test-time augmentation


class Setting(NamedTuple):
    """One evaluated setting (a cell of a sweep grid)."""
    ensemble_weight: float | None  # λ of reference 1.7; None: the segmenter alone; 0: CLIP alone
    mask_threshold: float

    def describe(self) -> str:
        weight = "segmenter only" if self.ensemble_weight is None else f"lambda={self.ensemble_weight:g}"
        return f"{weight}, mask threshold {self.mask_threshold:g}"


SWEEP_KEYS = {"lambda": "lambda", "λ": "lambda", "ensemble_weight": "lambda", "threshold": "threshold",
              "mask_threshold": "threshold"}


def parse_values(text: str) -> list[float]:
    """"0.3,0.4,0.5" -> floats; "a,b,...,z" continues the step b - a up to z ("0,0.1,...,1": 11 values)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    values: list[float] = []
    i = 0
    while i < len(parts):
        if parts[i] in ("...", "\u2026"):
            if len(values) < 2 or i + 1 >= len(parts) or values[-1] <= values[-2]:
                raise ValueError(f"{text!r}: '...' needs two increasing values before it and an end after it")
            step, end = values[-1] - values[-2], _number(parts[i + 1], text)
            while values[-1] + step <= end + 1e-9:
                values.append(round(values[-1] + step, 10))
            if abs(values[-1] - end) > 1e-9:
                values.append(end)
            i += 2
            continue
        values.append(_number(parts[i], text))
        i += 1
    if not values:
        raise ValueError(f"{text!r}: no values")
    return list(dict.fromkeys(values))


def _number(part: str, text: str) -> float:
    try:
        return float(part)
    except ValueError:
        raise ValueError(f"{text!r}: {part!r} is not a number") from None


def parse_sweeps(specs: Sequence[str]) -> dict[str, list[float]]:
    """["lambda=0,0.5,1", "threshold=0.4"] -> {"lambda": [...], "threshold": [...]}."""
    out: dict[str, list[float]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or key.strip() not in SWEEP_KEYS:
            raise ValueError(f"--sweep {spec!r}: expected lambda=V1,V2,... or threshold=V1,V2,...")
        key = SWEEP_KEYS[key.strip()]
        out[key] = parse_values(values)
        bad = [v for v in out[key] if not 0.0 <= v <= 1.0]
        if bad:
            raise ValueError(f"--sweep {spec!r}: values must lie in [0, 1]; got {bad}")
    return out


def grid(ensemble_weights: Sequence[float | None], thresholds: Sequence[float]) -> list[Setting]:
    """Every (λ, threshold) pair, thresholds outer; the segmenter alone (λ None) needs no threshold."""
    if list(ensemble_weights) == [None]:
        return [Setting(None, thresholds[0])]
    return [Setting(w, t) for t in thresholds for w in ensemble_weights]


@dataclasses.dataclass(frozen=True)
class TTA:
    """Test-time augmentation: the scales of the test size and whether to add mirrored passes."""
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False

    def passes(self) -> list[tuple[float, bool]]:
        """(scale, mirrored) per forward pass."""
        return [(s, f) for s in self.scales for f in ((False, True) if self.flip else (False,))]

    @property
    def enabled(self) -> bool:
        return self.flip or tuple(self.scales) != (1.0,)


def scaled_size(short: int, max_size: int, scale: float) -> tuple[int, int]:
    """The test size (short side, long-side cap) of a TTA scale, rounded as detectron2 rounds sizes."""
    return int(short * scale + 0.5), int(max_size * scale + 0.5)


# ---------------------------------------------------------------------------------------------
# Examples: every pass of an image, batched by padded shape


def mirror_window(image: np.ndarray, width: int) -> np.ndarray:
    """`[Hp, Wp, ...]` padded image -> the same with its first `width` columns mirrored (the resized
    image flipped as detectron2's HFlipTransform; the padding stays at the right)."""
    out = image.copy()
    out[:, :width] = image[:, :width][:, ::-1]
    return out


class PassExamples:
    """One pass over a source, each image as every TTA pass: `{"passes": [(image uint8 [Hp, Wp, 3]
    padded to the bucket, resized (h, w), mirrored)], "label": [H0, W0], "orig_size", "index"}`.

    One `eval_loader` per scale (this process's share of the images); `max_images` stops at that
    source index; `num_skipped`: bad examples the loaders skipped."""

    def __init__(self, source, *, short: int, max_size: int, bucket: int, tta: TTA = TTA(),
                 max_images: int | None = None, process_index: int | None = None, process_count: int | None = None,
                 num_workers: int = 0):
        from ovseg_jax.data import pipeline  # noqa: PLC0415

        self.tta, self.max_images = tta, max_images
        self._iters = [iter(pipeline.eval_loader(source, short=s, max_size=m, bucket=bucket, num_workers=num_workers,
                                                 process_index=process_index, process_count=process_count))
                       for s, m in (scaled_size(short, max_size, scale) for scale in tta.scales)]

    @property
    def num_skipped(self) -> int:
        return int(getattr(self._iters[0], "num_skipped", 0))

    def __iter__(self):
        for examples in zip(*self._iters):
            first = examples[0]
            if self.max_images is not None and first["index"] >= self.max_images:
                return
            passes = []
            for example in examples:
                if example["index"] != first["index"]:
                    raise RuntimeError(f"TTA scales went out of step at source index {first['index']}")
                hw = tuple(int(v) for v in example["resized_size"])
                passes.append((example["image"], hw, False))
                if self.tta.flip:
                    passes.append((mirror_window(example["image"], hw[1]), hw, True))
            yield {"passes": passes, "label": first["label"], "orig_size": tuple(int(v) for v in first["orig_size"]),
                   "index": int(first["index"])}


def bucket_batches(examples: Iterable[dict], batch_size: int) -> Iterable[list[dict]]:
    """Group examples whose passes have equal padded shapes into lists of `batch_size`; the
    leftovers of each shape come at the end."""
    pending: dict[tuple, list[dict]] = {}
    for example in examples:
        key = tuple(p[0].shape for p in example["passes"])
        group = pending.setdefault(key, [])
        group.append(example)
        if len(group) == batch_size:
            yield pending.pop(key)
    yield from pending.values()


# ---------------------------------------------------------------------------------------------
# One batch on one device




def _unmirror(scores: jax.Array, width: jax.Array) -> jax.Array:
    """`[H, W, C]` scores whose first `width` columns came from a mirrored image -> mirrored back."""
    col = jnp.arange(scores.shape[1])
    return jnp.take(scores, jnp.where(col < width, width - 1 - col, col), axis=1)


@functools.partial(jax.jit, static_argnames=("ensemble_weight", "out_hw", "mirrored"))
def _pass_scores(pred_logits, mask_probs, clip_logits, valid, resized_hw, original_hw, *, ensemble_weight, out_hw,
                 mirrored):
    """One pass of a batch -> `[B, *out_hw, C]` score maps at the original sizes (reference 1.7)."""
    from ovseg_jax.ensemble import Proposals, combine, scores_at_original  # noqa: PLC0415

    def one(logits, masks, crop_logits, crop_valid, rhw, ohw):
        scores = combine(Proposals(logits, masks), crop_logits, crop_valid, ensemble_weight=ensemble_weight)
        full = scores_at_original(scores, rhw, ohw, out_hw)
        return _unmirror(full, ohw[1]) if mirrored else full

    return jax.vmap(one)(pred_logits, mask_probs, clip_logits, valid, resized_hw, original_hw)


@jax.jit
def _mean_argmax(*scores):
    return jnp.argmax(sum(scores) / len(scores), axis=-1).astype(jnp.int32)


def batch_labels(predictor, batch: Sequence[dict], class_names: Sequence[str],
                 settings: Sequence[Setting]) -> dict[Setting, list[np.ndarray]]:
    """A batch of `PassExamples` items of one padded shape -> `[H0, W0]` int32 labels per item for
    every setting.

    One setting, one pass: `predictor.predict_batch` (the `ensemble.Predictor` built with that
    setting). Otherwise each pass runs the segmenter once and CLIP once per mask threshold, and every
    setting combines those (`ensemble.combine`); passes are averaged at the original size."""
    from ovseg_jax.ensemble import output_bucket  # noqa: PLC0415

    original = np.asarray([item["orig_size"] for item in batch], np.int32)
    num_passes = len(batch[0]["passes"])
    if len(settings) == 1 and num_passes == 1:
        images = [item["passes"][0][0] for item in batch]
        results = predictor.predict_batch(images, class_names, resized_hw=[item["passes"][0][1] for item in batch],
                                          original_hw=original)
        return {settings[0]: [r.labels for r in results]}
    thresholds = sorted({s.mask_threshold for s in settings if s.ensemble_weight is not None})
    passes = []
    for p in range(num_passes):
        images = np.stack([item["passes"][p][0] for item in batch])
        sizes = np.asarray([item["passes"][p][1] for item in batch], np.int32)
        proposals = predictor.proposals(images, class_names, resized_hw=sizes)
        crops = {t: predictor.classify_crops(images, proposals.mask_probs, class_names, mask_threshold=t,
                                             pred_logits=proposals.pred_logits)
                 for t in thresholds}
        passes.append((proposals, sizes, batch[0]["passes"][p][2], crops))
    out_hw = output_bucket(original)
    labels = {}
    for setting in settings:
        maps = []
        for proposals, sizes, mirrored, crops in passes:
            crop_logits, valid = crops[setting.mask_threshold] if setting.ensemble_weight is not None else (None, None)
            maps.append(_pass_scores(proposals.pred_logits, proposals.mask_probs, crop_logits, valid, sizes, original,
                                     ensemble_weight=setting.ensemble_weight, out_hw=out_hw, mirrored=mirrored))
        out = np.asarray(_mean_argmax(*maps))
        labels[setting] = [out[i, :h, :w] for i, (h, w) in enumerate(original)]
    return labels


# ---------------------------------------------------------------------------------------------
# The whole evaluation: devices, processes, progress


def replicate(predictor, device):
    """A copy of an `ensemble.Predictor` with its models' parameters on `device`."""
    import copy  # noqa: PLC0415

    from flax import nnx  # noqa: PLC0415

    from ovseg_jax.clip import Clip  # noqa: PLC0415

    def moved(model):
        graph, state = nnx.split(model)
        return nnx.merge(graph, jax.device_put(state, device))

    replica = copy.copy(predictor)
    replica.segmenter = moved(predictor.segmenter)
    replica.clip = Clip(moved(predictor.clip.model), predictor.clip.tokenizer)
    replica.clip._class_cache = predictor.clip._class_cache  # text embeddings (host arrays) shared
    return replica


class Progress:
    """`done/total images, images/s, ETA` on stderr: rewritten in place on a terminal, else a line
    every 10%."""

    def __init__(self, total: int, enabled: bool = True, stream=None):
        self.total, self.enabled, self.stream = total, enabled, stream or sys.stderr
        self.done, self.start, self._last = 0, time.perf_counter(), -1

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        rate = self.done / max(elapsed, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        line = (f"evaluating [{'=' * filled}{' ' * (width - filled)}] {self.done}/{self.total} images, "
                f"{rate:.2f} images/s, ETA {_clock(eta)} (elapsed {_clock(elapsed)})")
        tenth = int(10 * self.done / max(self.total, 1))
        if self.stream.isatty():
            print("\r" + line, end="\n" if self.done >= self.total else "", file=self.stream, flush=True)
        elif tenth != self._last or self.done >= self.total:
            print(line, file=self.stream, flush=True)
        self._last = tenth


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class EvalResult(NamedTuple):
    confusion: dict[Setting, np.ndarray]  # [C, C] int64 per setting, summed over processes
    images: int
    skipped: int
    seconds: float


def _sum_over_processes(counts: np.ndarray) -> np.ndarray:
    """Sum int64 arrays over JAX processes (exact: gathered as two int32 halves)."""
    if jax.process_count() == 1:
        return counts
    from jax.experimental import multihost_utils  # noqa: PLC0415

    high, low = np.divmod(counts, 1 << 30)
    gathered = np.asarray(multihost_utils.process_allgather(np.stack([high, low]).astype(np.int32)))
    return (gathered[:, 0].astype(np.int64) * (1 << 30) + gathered[:, 1]).sum(axis=0)


def evaluate(predictor, source, settings: Sequence[Setting], *, ignore_value: int, short: int, max_size: int,
             bucket: int = 128, batch_size: int = 1, tta: TTA = TTA(), max_images: int | None = None,
             devices: Sequence | None = None, progress: bool = True, num_workers: int = 0) -> EvalResult:
    """Evaluate `predictor` (`ensemble.Predictor`, built with `settings[0]`) on a segmentation source
    for every setting -> one dataset-wide confusion matrix per setting (summed over processes).

    This process takes images p, p+P, ... (up to source index `max_images`), batches them by padded
    shape (`batch_size`; short batches are filled with repeats, so each shape compiles once) and
    runs batches round-robin on `devices` (default: the local devices), one thread per device."""
    names = list(source.class_names)
    devices = list(devices or jax.local_devices())
    predictor.text_bank(names)  # embed the class names once, before any thread starts
    workers = [predictor] if len(devices) == 1 else [replicate(predictor, d) for d in devices]
    pools = [concurrent.futures.ThreadPoolExecutor(1) for _ in workers] if len(workers) > 1 else None
    examples = PassExamples(source, short=short, max_size=max_size, bucket=bucket, tta=tta, max_images=max_images,
                            num_workers=num_workers)
    end = len(source) if max_images is None else min(max_images, len(source))
    bar = Progress(len(range(jax.process_index(), end, jax.process_count())), enabled=progress)
    confusion = {s: ConfusionMatrix(len(names), ignore_value) for s in settings}
    count, start = 0, time.perf_counter()

    def run(k: int, batch: list[dict]):
        full = batch + [batch[-1]] * (batch_size - len(batch))
        with jax.default_device(devices[k]):
            return batch, batch_labels(workers[k], full, names, settings)

    def record(batch, labels) -> None:
        nonlocal count
        for setting, matrix in confusion.items():
            for item, pred in zip(batch, labels[setting]):
                matrix.update(pred, item["label"])
        count += len(batch)
        bar.update(len(batch))

    in_flight: deque = deque()
    try:
        for i, batch in enumerate(bucket_batches(examples, batch_size)):
            if pools is None:
                record(*run(0, batch))
                continue
            in_flight.append(pools[i % len(pools)].submit(run, i % len(pools), batch))
            if len(in_flight) >= 2 * len(pools):
                record(*in_flight.popleft().result())
        while in_flight:
            record(*in_flight.popleft().result())
    finally:
        for pool in pools or ():
            pool.shutdown(cancel_futures=True)
    counts = _sum_over_processes(np.stack([confusion[s].counts for s in settings]))
    totals = _sum_over_processes(np.asarray([count, examples.num_skipped], np.int64))
    _warn_skipped(int(totals[1]), int(totals[0]))
    return EvalResult(dict(zip(settings, counts)), int(totals[0]), int(totals[1]), time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# Report: metrics.json, the printed table, the per-class chart

SEEN_COLOUR, UNSEEN_COLOUR, NO_GT_COLOUR = (52, 101, 164), (230, 126, 34), (170, 170, 170)


def _finite(value):
    """JSON-safe: NaN -> None, numpy scalars -> floats, recursively."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _fmt(value) -> str:
    return "  -  " if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:5.1f}"


def format_table(report: dict) -> str:
    """The printed summary of a `metrics.json` report: header, metrics, per-class rows (up to 60
    classes), and the sweep grid with the best setting."""
    s = report["setting"]
    weight = {"segmenter": "segmenter only", "clip": "CLIP only (λ=0)"}.get(s["mode"]) or f"λ={s['ensemble_weight']:g}"
    tta = (f", TTA scales {','.join(f'{v:g}' for v in s['tta']['scales'])}" + (" + flip" if s["tta"]["flip"] else "")
           if s["tta"]["flip"] or s["tta"]["scales"] != [1.0] else "")
    lines = [f"{report['dataset']} ({report['split']}): {report['images']} images in {report['seconds']:.1f} s"
             + (f", {report['skipped']} bad skipped" if report["skipped"] else ""),
             f"{weight}, mask threshold {s['mask_threshold']:g}, {s['crop']} crops"
             + (f" (CLIP on the top {s['clip_top_k']} proposals)" if s.get("clip_top_k") else "")
             + f", mask prompts {'on' if s['mask_prompts'] else 'off'}, templates {s['templates']}, "
             f"test size {s['short']}/{s['max_size']}" + tta, ""]
    n_unseen = len(report["unseen"])
    n_seen = len(report["IoU"]) - n_unseen
    lines.append(f"{'mIoU':>6} {'fwIoU':>6} {'mACC':>6} {'pACC':>6}  {'seen (' + str(n_seen) + ')':>11} "
                 f"{'unseen (' + str(n_unseen) + ')':>12}")
    lines.append(f"{_fmt(report['mIoU']):>6} {_fmt(report['fwIoU']):>6} {_fmt(report['mACC']):>6} "
                 f"{_fmt(report['pACC']):>6}  {_fmt(report.get('mIoU_seen')):>11} {_fmt(report.get('mIoU_unseen')):>12}")
    if len(report["IoU"]) <= 60:
        width = max(len(n) for n in report["IoU"]) + 2
        lines += ["", f"{'class':<{width}} {'IoU':>5} {'ACC':>5}"]
        unseen = set(report["unseen"])
        lines += [f"{name:<{width}} {_fmt(iou)} {_fmt(report['ACC'][name])}" + ("  unseen" if name in unseen else "")
                  for name, iou in report["IoU"].items()]
    sweep = report.get("sweep")
    if sweep:
        cells = {(c["mask_threshold"], c["ensemble_weight"]): c["mIoU"] for c in sweep["cells"]}
        weights = sweep["lambda"]
        lines += ["", "mIoU over the sweep (rows: mask threshold, columns: λ)",
                  "threshold " + " ".join(f"{w:>5g}" for w in weights)]
        for t in sweep["threshold"]:
            lines.append(f"{t:<9g} " + " ".join(_fmt(cells.get((t, w))) for w in weights))
        b = sweep["best"]
        lines.append(f"best: λ={b['ensemble_weight']:g}, mask threshold {b['mask_threshold']:g}: mIoU {b['mIoU']:.1f}"
                     + (f" (seen {_fmt(b.get('mIoU_seen')).strip()}, unseen {_fmt(b.get('mIoU_unseen')).strip()})"
                        if report["unseen"] else ""))
    return "\n".join(lines)


def _font(size: int):
    from PIL import ImageFont  # noqa: PLC0415

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError, ImportError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def draw_iou_chart(iou: Mapping[str, float | None], unseen: Iterable[str], path: str | Path, title: str) -> Path:
    """Per-class IoU as horizontal bars, best first, coloured seen / unseen (grey: no ground-truth
    pixels) -> a PNG at `path`."""
    from PIL import Image, ImageDraw  # noqa: PLC0415

    unseen = set(unseen)
    has = {n: v for n, v in iou.items() if v is not None and not math.isnan(v)}
    order = sorted(has, key=lambda n: -has[n]) + [n for n in iou if n not in has]
    face = _font(12)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    name_w = int(max([probe.textlength(n, font=face) for n in order] + [60])) + 12
    bar_w, row, header = 400, 16, 48
    width, height = name_w + bar_w + 60, header + row * len(order) + 8
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((8, 6), title, fill="black", font=face)

    def mean(names):
        values = [has[n] for n in names if n in has]
        return f"{np.mean(values):.1f}" if values else "-"

    x = 8
    for label, colour in ((f"seen (mean IoU {mean([n for n in iou if n not in unseen])})", SEEN_COLOUR),
                          (f"unseen (mean IoU {mean(unseen)})", UNSEEN_COLOUR), ("no ground truth", NO_GT_COLOUR)):
        draw.rectangle([x, 27, x + 10, 37], fill=colour)
        draw.text((x + 14, 25), label, fill="black", font=face)
        x += int(probe.textlength(label, font=face)) + 34
    for i, name in enumerate(order):
        y = header + i * row
        draw.text((name_w - 6 - probe.textlength(name, font=face), y + 1), name, fill="black", font=face)
        if name not in has:
            draw.text((name_w + 2, y + 1), "no ground truth", fill=NO_GT_COLOUR, font=face)
            continue
        colour = UNSEEN_COLOUR if name in unseen else SEEN_COLOUR
        draw.rectangle([name_w, y + 2, name_w + max(1, round(bar_w * has[name] / 100)), y + row - 3], fill=colour)
        draw.text((name_w + bar_w + 6, y + 1), f"{has[name]:.1f}", fill="black", font=face)
    path = Path(path)
    image.save(path)
    return path


# ---------------------------------------------------------------------------------------------
# Command line

DATASETS = {"ade150": "ade20k_150", "ade847": "ade20k_847", "pc59": "pascal_context_59", "pc459": "pascal_context_459",
            "voc20": "pascal_voc_20", "synthetic": "synthetic"}
# Reference 0: the mask threshold of each released model, by its segmenter's backbone (the test
# size per backbone is `predict.RESIZE`).
MASK_THRESHOLD = {"swin": 0.4, "resnet": 0.5}
MODES = ("ensemble", "segmenter", "clip")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ovseg_jax.evaluate", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="OVSeg checkpoint (segmenter + CLIP: a released .pth, our "
                   "merged file) or a segmenter training workdir")
    p.add_argument("--tokenizer", help="tokenizer directory or OpenAI's bpe_simple_vocab_16e6.txt.gz (default: "
                   "the workdir run's, or one beside the checkpoint; synthetic: ROOT/tokenizer)")
    p.add_argument("--dataset", required=True, help=f"{' | '.join(DATASETS)} (or a registry name)")
    p.add_argument("--root", help="datasets root (default $DETECTRON2_DATASETS, else ./datasets; synthetic: the world)")
    p.add_argument("--split", default="val")
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


def _dataset(name: str):
    from ovseg_jax.data import registry  # noqa: PLC0415

    try:
        return registry.get(DATASETS.get(name, name))
    except KeyError:
        raise ValueError(f"--dataset {name!r} unknown; expected one of {', '.join(DATASETS)} "
                         f"or a registry name ({', '.join(registry.names())})") from None


def _load(args, root: str | None):
    """(Segmenter, Clip) of `--checkpoint` through `predict.load_predictor`."""
    from ovseg_jax.predict import load_predictor  # noqa: PLC0415

    tokenizer = args.tokenizer
    if tokenizer is None and args.dataset == "synthetic" and (Path(root) / "tokenizer").is_dir():
        tokenizer = str(Path(root) / "tokenizer")
    loaded = load_predictor(args.checkpoint, tokenizer)
    return loaded.segmenter, loaded.clip


def run(argv: Sequence[str] | None = None, models: tuple | None = None) -> dict:
    """The CLI without the exit handling -> the report written to `OUT/metrics.json`. `models`:
    an already loaded `(Segmenter, Clip)` to evaluate instead of loading `--checkpoint`."""
    from ovseg_jax.ensemble import Predictor  # noqa: PLC0415
    from ovseg_jax.sharding import initialize_distributed  # noqa: PLC0415

    args = _parser().parse_args(argv)
    initialize_distributed()
    spec = _dataset(args.dataset)
    tfds = spec.name.startswith("tfds:")
    root = args.root or (None if tfds else os.environ.get("DETECTRON2_DATASETS", "datasets"))
    if not tfds and not Path(root).is_dir():
        raise ValueError(f"--root {root}: no such directory (the datasets root, as detectron2's DETECTRON2_DATASETS"
                         + (", or the synthetic world's folder)" if spec.name == "synthetic" else ")"))
    if args.split not in spec.splits:
        raise ValueError(f"--split {args.split!r}: {spec.name} has {', '.join(spec.splits)}")
    for flag in ("batch_size", "max_images", "short", "max_size", "bucket", "clip_top_k"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive; got {getattr(args, flag)}")
    sweeps = parse_sweeps(args.sweep)
    tta = TTA(tuple(parse_values(args.tta_scales)), args.tta == "flip")
    if any(s <= 0 for s in tta.scales):
        raise ValueError(f"--tta-scales must be positive; got {args.tta_scales}")
    if args.mode != "ensemble" and "lambda" in sweeps:
        raise ValueError(f"--sweep lambda needs --mode ensemble (mode {args.mode} fixes λ)")
    if args.mode == "segmenter" and args.clip_top_k is not None:
        raise ValueError("--clip-top-k needs CLIP (mode ensemble or clip): the segmenter alone runs no crops")
    if args.mode == "segmenter" and "threshold" in sweeps:
        raise ValueError("--sweep threshold needs CLIP (mode ensemble or clip): the segmenter alone has no crops")
    source = spec.make_source(root, args.split)
    names = list(source.class_names)
    unseen = unseen_classes(spec.name, names, root)
    segmenter, clip = models or _load(args, root)

    from ovseg_jax.predict import BUCKET, RESIZE, parse_templates  # noqa: PLC0415

    backbone = segmenter.config.backbone
    model = {"mask_threshold": MASK_THRESHOLD.get(backbone, 0.4), "short": RESIZE.get(backbone, RESIZE["swin"])[0],
             "max_size": RESIZE.get(backbone, RESIZE["swin"])[1], "bucket": BUCKET, "templates": "vild"}
    if spec.name == "synthetic":  # the demo's evaluation settings (configs/synthetic.py)
        from ovseg_jax.demo import load_config  # noqa: PLC0415

        e = load_config(None).eval
        model.update(mask_threshold=e.mask_threshold, short=e.short, max_size=e.max_size, bucket=e.bucket,
                     templates=list(e.templates))
    threshold = model["mask_threshold"] if args.mask_threshold is None else args.mask_threshold
    weight = spec.ensemble_weight if args.ensemble_weight is None else args.ensemble_weight
    weight = {"segmenter": None, "clip": 0.0}.get(args.mode, weight)
    settings = grid(sweeps.get("lambda", [weight]), sweeps.get("threshold", [threshold]))
    short = args.short or model["short"]
    max_size = args.max_size or model["max_size"]
    bucket = args.bucket or model["bucket"]
    templates = model["templates"] if args.templates is None else parse_templates(args.templates)
    predictor = Predictor(segmenter, clip, mask_threshold=settings[0].mask_threshold,
                          ensemble_weight=settings[0].ensemble_weight, mask_prompts=not args.no_mask_prompts,
                          templates=templates, crop=args.crop, clip_top_k=args.clip_top_k)
    result = evaluate(predictor, source, settings, ignore_value=spec.ignore_value, short=short, max_size=max_size,
                      bucket=bucket, batch_size=args.batch_size, tta=tta, max_images=args.max_images,
                      progress=not args.no_progress and jax.process_index() == 0, num_workers=args.num_workers)
    metrics = {s: segmentation_metrics(result.confusion[s], names, unseen) for s in settings}
    best = max(settings, key=lambda s: metrics[s]["mIoU"])
    report = {
        "dataset": args.dataset, "registry_name": spec.name, "split": args.split, "root": root,
        "checkpoint": args.checkpoint, "images": result.images, "skipped": result.skipped,
        "seconds": round(result.seconds, 2), "images_per_second": round(result.images / result.seconds, 3),
        "setting": {"mode": args.mode, "ensemble_weight": best.ensemble_weight, "mask_threshold": best.mask_threshold,
                    "templates": templates, "crop": args.crop, "mask_prompts": predictor.mask_prompts,
                    "clip_top_k": args.clip_top_k,
                    "backbone": segmenter.config.backbone, "short": short, "max_size": max_size, "bucket": bucket,
                    "batch_size": args.batch_size, "processes": jax.process_count(),
                    "devices": len(jax.devices()), "tta": {"scales": list(tta.scales), "flip": tta.flip}},
        **metrics[best],
        "unseen": unseen,
        "seen_rule": "synthetic world classes.json" if spec.name == "synthetic" else
                     "COCO-Stuff-171 name match (ovseg_jax.evaluate.coco_seen)",
    }
    if len(settings) > 1:
        summary = ("mIoU", "mIoU_seen", "mIoU_unseen", "fwIoU", "mACC", "pACC")
        cells = [{"ensemble_weight": s.ensemble_weight, "mask_threshold": s.mask_threshold,
                  **{k: metrics[s][k] for k in summary if k in metrics[s]}} for s in settings]
        report["sweep"] = {"lambda": sorted({s.ensemble_weight for s in settings}),
                           "threshold": sorted({s.mask_threshold for s in settings}), "cells": cells,
                           "best": cells[settings.index(best)]}
    report = _finite(report)
    if jax.process_index() == 0:
        out = Path(args.out or Path("outputs") / "evaluate" / f"{args.dataset.replace(':', '_')}-{args.split}")
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(report, indent=1))
        draw_iou_chart(report["IoU"], unseen, out / "per_class_iou.png",
                       f"{args.dataset} {args.split}: per-class IoU ({best.describe()}), mIoU {report['mIoU']:.1f}")
        print(format_table(report))
        print(f"\nwrote {out / 'metrics.json'} and {out / 'per_class_iou.png'}")
    return report


def main(argv: Sequence[str] | None = None) -> None:
    from ovseg_jax.export import cli_logging, exit_on_error  # noqa: PLC0415

    keep_freed_memory()
    cli_logging()
    with exit_on_error():
        run(argv)


if __name__ == "__main__":
    main()
