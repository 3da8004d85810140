"""Evaluate a predictor over a dataset: every image once, every setting of a sweep, TTA, devices
and processes (reference 5; `python -m ovseg_jax.evaluate` is its command).

Sweeps evaluate a λ x threshold grid in one pass: each image's proposals are computed once, CLIP
classifies its crops once per threshold, and every λ is a cheap recombination (`combine`); one
confusion matrix per grid cell. TTA follows detectron2's `SemanticSegmentorWithTTA`: each scale
resizes the original image (short side `short * s`, long side `max_size * s`), flip mirrors the
resized image, and the score maps, resized to the original size (and mirrored back), are averaged
before the argmax.

Images are sharded over processes (`eval_loader`'s i = p, p+P, ...; confusion matrices summed with
`multihost_utils.process_allgather`) and over each process's local devices (one model replica and
one worker thread per device; a batch of same-bucket images per device call).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import time
from collections import deque
from typing import Iterable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ovseg_jax.evaluation.metrics import ConfusionMatrix, segmentation_metrics
from ovseg_jax.utils.progress import progress as progress_bar

log = logging.getLogger("ovseg_jax.evaluate")


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
    from ovseg_jax.inference.ensemble import Proposals, combine, scores_at_original  # noqa: PLC0415

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
    from ovseg_jax.inference.ensemble import output_bucket  # noqa: PLC0415

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
    bar = progress_bar(len(range(jax.process_index(), end, jax.process_count())), "evaluating", disable=not progress)
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
        bar.update(examples.num_skipped)
    finally:
        bar.close()
        for pool in pools or ():
            pool.shutdown(cancel_futures=True)
    counts = _sum_over_processes(np.stack([confusion[s].counts for s in settings]))
    totals = _sum_over_processes(np.asarray([count, examples.num_skipped], np.int64))
    _warn_skipped(int(totals[1]), int(totals[0]))
    return EvalResult(dict(zip(settings, counts)), int(totals[0]), int(totals[1]), time.perf_counter() - start)
