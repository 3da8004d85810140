"""Segment a list of image files into a folder (the work of `python -m ovseg_jax.predict`).

Per input image it writes `<stem>.overlay.png` (class colours blended over the image, a legend of
the classes present with their pixel share), `<stem>.labels.png` (class indices into the class list
at the image's size: uint8 for fewer than 255 classes, else uint16; pixels no class claims, demo
mode only, are 255 / 65535) and `<stem>.json` (`summarize`: class list, per-class pixel share and
mean confidence, unlabeled share, settings).

Images are read as the original demo does (PIL, EXIF rotation applied, RGB), resized with the short
side to `short` (long side <= `max_size`, PIL bilinear, reference 1.1) and zero-padded to a
multiple of `bucket` per side, so a folder of mixed sizes compiles once per padded shape; images of
one padded shape go to the device together, `batch_size` at a time.
"""

from __future__ import annotations

import concurrent.futures
import json
import time
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image

from ovseg_jax.data.sources import BadExampleError, read_image
from ovseg_jax.inference.ensemble import Predictor, Segmentation
from ovseg_jax.inference.inputs import BUCKET, output_stems, padded_shape, preprocess
from ovseg_jax.inference.results import label_image, render, summarize
from ovseg_jax.utils.compilation import CompileTimer
from ovseg_jax.utils.progress import progress as progress_bar


def _header_hw(path: Path) -> tuple[int, int]:
    """An image file's (H, W) after EXIF rotation, from its header; a file PIL cannot open is
    decoded by `read_image` to get its `BadExampleError`."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            orientation = img.getexif().get(0x0112, 1)
        return (w, h) if orientation in (5, 6, 7, 8) else (h, w)
    except Exception:  # noqa: BLE001  (PIL raises many types for bad files)
        return read_image(path).shape[:2]


class Item(NamedTuple):
    path: Path
    stem: str
    shape: tuple[int, int]  # padded shape: the compile bucket


class Batch(NamedTuple):
    items: list[Item]
    size: int  # the device batch size of its padded shape (short batches are topped up to it)


def plan(paths: Sequence[Path], *, short: int, max_size: int, bucket: int, batch_size: int
         ) -> tuple[list[Batch], list[tuple[Path, str]]]:
    """Group the inputs by padded shape (read from the file headers) and cut each group into
    batches -> (batches, skipped (path, reason)). Batches of one group share one device batch
    size, min(`batch_size`, group size), so each padded shape compiles once."""
    groups: dict[tuple[int, int], list[Item]] = {}
    skipped = []
    for path, stem in zip(paths, output_stems(paths)):
        try:
            shape = padded_shape(_header_hw(path), short, max_size, bucket)
        except BadExampleError as e:
            skipped.append((path, str(e)))
            continue
        groups.setdefault(shape, []).append(Item(path, stem, shape))
    batches = []
    for items in groups.values():
        size = min(batch_size, len(items))
        batches.extend(Batch(items[i:i + size], size) for i in range(0, len(items), size))
    return batches, skipped


def _write_outputs(out_dir: Path, item: Item, image: np.ndarray, segmentation: Segmentation,
                   class_names: list[str], settings: dict, side_by_side: bool) -> str:
    """Write the image's overlay, labels PNG and JSON -> a one-line account ("x.jpg: sky 52.9%, ...")."""
    render(image, segmentation, class_names, side_by_side).save(out_dir / f"{item.stem}.overlay.png")
    labels = label_image(segmentation.labels, len(class_names))
    labels.save(out_dir / f"{item.stem}.labels.png")
    record = {"input": str(item.path), **summarize(segmentation, class_names), **settings,
              "labels_png": f"{item.stem}.labels.png", "labels_dtype": "uint8" if labels.mode == "L" else "uint16",
              "unlabeled_value": 255 if labels.mode == "L" else 65535}
    (out_dir / f"{item.stem}.json").write_text(json.dumps(record, indent=1))
    shares = [f"{c['name']} {100 * c['share']:.1f}%" for c in record["classes"]]
    if record["unlabeled_share"] > 0:
        shares.append(f"unlabeled {100 * record['unlabeled_share']:.1f}%")
    return f"{item.path.name}: {', '.join(shares)}"


def _load_batch(batch: Batch, short: int, max_size: int, bucket: int) -> tuple[list, list[tuple[Path, str]]]:
    """Decode + preprocess a batch -> ([(item, original image, padded, resized_hw, original_hw)], skipped)."""
    loaded, skipped = [], []
    for item in batch.items:
        try:
            image = read_image(item.path)
            loaded.append((item, image, *preprocess(image, short, max_size, bucket)))
        except BadExampleError as e:
            skipped.append((item.path, str(e)))
    return loaded, skipped


def predict_files(predictor: Predictor, paths: Sequence[Path], class_names: list[str], out_dir: Path, *,
                  short: int, max_size: int, bucket: int = BUCKET, batch_size: int = 4,
                  side_by_side: bool = False, progress: bool = True) -> dict:
    """Segment `paths` into `out_dir` (see the module docstring) -> the run's summary: `{"images",
    "skipped": [[path, reason]], "seconds", "images_per_second", "compiles", "compile_seconds",
    "padded_shapes", "per_image": ["x.jpg: sky 52.9%, ..."] (input order within each batch)}`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    batches, skipped = plan(paths, short=short, max_size=max_size, bucket=bucket, batch_size=batch_size)
    settings = {"mode": predictor.mode, "ensemble_weight": predictor.ensemble_weight,
                "mask_threshold": predictor.mask_threshold, "mask_prompts": predictor.mask_prompts,
                "templates": predictor.templates if isinstance(predictor.templates, str) else list(predictor.templates),
                "short": short, "max_size": max_size}
    done, per_image = 0, []
    with (CompileTimer() as compiles, concurrent.futures.ThreadPoolExecutor(2) as pool,
          progress_bar(len(paths), "predicting", disable=not progress) as bar):
        bar.update(len(skipped))
        writes: list[concurrent.futures.Future] = []
        upcoming = pool.submit(_load_batch, batches[0], short, max_size, bucket) if batches else None
        for i, batch in enumerate(batches):
            loaded, bad = upcoming.result()
            upcoming = pool.submit(_load_batch, batches[i + 1], short, max_size, bucket) if i + 1 < len(batches) else None
            skipped.extend(bad)
            for group in _by_shape(loaded):
                padded = group + [group[-1]] * (batch.size - len(group))  # one batch size per padded shape
                results = predictor.predict_batch([g[2] for g in padded], class_names,
                                                  resized_hw=[g[3] for g in padded], original_hw=[g[4] for g in padded])
                for (item, image, *_), segmentation in zip(group, results):
                    writes.append(pool.submit(_write_outputs, out_dir, item, image, segmentation, class_names,
                                              settings, side_by_side))
            while len(writes) > 2 * batch_size:  # bound the images held in memory
                per_image.append(writes.pop(0).result())
            done += len(loaded)
            bar.update(len(batch.items))
        per_image.extend(write.result() for write in writes)
    seconds = time.perf_counter() - t0
    return {"images": done, "skipped": [[str(p), reason] for p, reason in skipped], "seconds": round(seconds, 2),
            "images_per_second": round(done / seconds, 3) if seconds > 0 else 0.0, "compiles": compiles.count,
            "compile_seconds": round(compiles.seconds, 2),
            "padded_shapes": sorted({b.items[0].shape for b in batches}), "per_image": per_image}


def _by_shape(loaded: list) -> list[list]:
    """Loaded images grouped by padded shape (a header that misstated the size lands in its own group)."""
    groups: dict[tuple, list] = {}
    for entry in loaded:
        groups.setdefault(entry[2].shape, []).append(entry)
    return list(groups.values())


def format_summary(summary: dict, max_listed: int = 10) -> str:
    """The run's summary as a few printed lines (each image's class shares too, up to `max_listed` images)."""
    def count(n: int, noun: str) -> str:
        return f"{n} {noun}{'' if n == 1 else 's'}"

    lines = [f"{count(summary['images'], 'image')} segmented, {len(summary['skipped'])} skipped, in "
             f"{summary['seconds']:.1f} s ({summary['images_per_second']:.2f} images/s); "
             f"{count(summary['compiles'], 'compilation')} ({summary['compile_seconds']:.1f} s) for "
             f"{count(len(summary['padded_shapes']), 'padded shape')} "
             + ", ".join(f"{h}x{w}" for h, w in summary["padded_shapes"])]
    lines += [f"  skipped {path}: {reason}" for path, reason in summary["skipped"]]
    if len(summary["per_image"]) <= max_listed:
        lines += [f"  {line}" for line in summary["per_image"]]
    return "\n".join(lines)
