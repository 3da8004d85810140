"""Check a dataset folder before spending compute on it: `python -m ovseg_jax.data check PATH`.

Reports the layout found (`ovseg_jax.data.custom`), then per split: the image/label pairs, images
without a label and labels without an image, unreadable files, label maps whose size differs from
their image, label values outside the class list (per value: pixels, images and example files),
each class's share of the labelled pixels and the number of images it is in; and draws a PNG grid
of a few images with their labels overlaid and a legend. Every problem is an error naming its file
(exit status 1), except classes that no image shows, which are warnings.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from ovseg_jax.data.custom import CustomDataset, open_dataset, split_name
from ovseg_jax.data.sources import BadExampleError, DatasetLayoutError, read_image

EXAMPLE_FILES = 3  # files named per kind of problem


@dataclasses.dataclass
class SplitReport:
    """What `check` found in one split."""
    split: str
    pairs: int = 0
    checked: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    class_pixels: np.ndarray | None = None  # int64 [C]
    class_images: np.ndarray | None = None  # int64 [C]
    ignored_pixels: int = 0


@dataclasses.dataclass
class Report:
    path: Path
    description: str = ""
    class_names: tuple[str, ...] = ()
    errors: list[str] = dataclasses.field(default_factory=list)  # the dataset as a whole
    splits: list[SplitReport] = dataclasses.field(default_factory=list)
    grid: Path | None = None

    @property
    def num_errors(self) -> int:
        return len(self.errors) + sum(len(s.errors) for s in self.splits)

    @property
    def num_warnings(self) -> int:
        return sum(len(s.warnings) for s in self.splits)


def _inspect(source, i: int) -> dict:
    """One pair -> {"error": message} or {"ids", "counts", "invalid"}."""
    try:
        image = read_image(source.image_paths[i])
        label = source.read_label(i)
    except BadExampleError as e:
        return {"error": str(e)}
    if image.shape[:2] != label.ids.shape:
        return {"error": f"{source.label_paths[i]}: label size {label.ids.shape[1]}x{label.ids.shape[0]} (WxH) "
                         f"differs from its image {source.image_paths[i]} ({image.shape[1]}x{image.shape[0]})"}
    ids, counts = np.unique(label.ids, return_counts=True)
    return {"ids": ids, "counts": counts, "invalid": label.invalid}


def check_split(dataset: CustomDataset, split: str, *, max_images: int | None = None, threads: int = 4,
                refresh: bool = False) -> SplitReport:
    """Every pair of `split` read and checked (the first `max_images` only, if given)."""
    report = SplitReport(split)
    files = dataset.files(split, refresh=refresh)
    report.pairs = len(files.pairs)
    root = dataset.path
    report.errors += [f"{root / f}: image without a label" for f in files.orphan_images]
    report.errors += [f"{root / f}: label without an image" for f in files.orphan_labels]
    num_classes = len(dataset.class_names)
    report.class_pixels = np.zeros(num_classes, np.int64)
    report.class_images = np.zeros(num_classes, np.int64)
    if not files.pairs:
        report.errors.append(f"{root}: split {split!r} has no image/label pairs")
        return report
    source = dataset.make_source(None, split)
    count = len(source) if max_images is None else min(max_images, len(source))
    invalid: dict[str, list] = {}  # value -> [pixels, images, example files]
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for i, found in enumerate(pool.map(lambda k: _inspect(source, k), range(count))):
            report.checked += 1
            if "error" in found:
                report.errors.append(found["error"])
                continue
            for value, pixels in found["invalid"].items():
                entry = invalid.setdefault(value, [0, 0, []])
                entry[0] += pixels
                entry[1] += 1
                if len(entry[2]) < EXAMPLE_FILES:
                    entry[2].append(source.label_paths[i])
            known = (found["ids"] >= 0) & (found["ids"] < num_classes)
            report.class_pixels[found["ids"][known]] += found["counts"][known]
            report.class_images[found["ids"][known]] += 1
            report.ignored_pixels += int(found["counts"][found["ids"] == dataset.ignore_value].sum())
    for value, (pixels, images, examples) in sorted(invalid.items()):
        report.errors.append(f"label {value} outside the {num_classes} classes (0..{num_classes - 1}, ignore "
                             f"{dataset.ignore_value}): {pixels} pixels in {images} image(s), "
                             f"e.g. {', '.join(examples)}")
    absent = [n for n, c in zip(dataset.class_names, report.class_images) if c == 0]
    if absent:
        report.warnings.append(f"{len(absent)} of {num_classes} classes in no image of {split!r}: {', '.join(absent)}")
    return report


def draw_grid(dataset: CustomDataset, split: str, path: Path, count: int = 6, height: int = 160) -> Path | None:
    """The first `count` readable pairs of `split`, labels overlaid, with a legend -> `path` (None: none readable)."""
    from ovseg_jax.inference.visualize import overlay, palette, panel  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    source = dataset.make_source(None, split)
    colours = palette(len(dataset.class_names))
    shown, present = [], set()
    for i in range(len(source)):
        if len(shown) == count:
            break
        try:
            example = source[i]
        except BadExampleError:
            continue
        label = np.where(example["label"] == dataset.ignore_value, -1, example["label"])
        present.update(np.unique(label[label >= 0]).tolist())
        h, w = label.shape
        size = (max(1, round(w * height / h)), height)
        image = np.asarray(Image.fromarray(example["image"]).resize(size, Image.BILINEAR))
        small = np.asarray(Image.fromarray(label.astype(np.int32)).resize(size, Image.NEAREST))
        shown.append((Path(source.image_paths[i]).name, overlay(image, small, colours, edge_thickness=1)))
    if not shown:
        return None
    legend = [(dataset.class_names[c], colours[c]) for c in sorted(present)]
    path.parent.mkdir(parents=True, exist_ok=True)
    panel(shown, legend).save(path)
    return path


def check(path: str | Path, *, splits: Sequence[str] | None = None, max_images: int | None = None,
          grid: str | Path | None = None, threads: int = 4, refresh: bool = False) -> Report:
    """Check the dataset folder `path` (every split, or `splits`) -> the report; the grid picture goes
    to `grid` (default `outputs/check/<folder name>.png`)."""
    report = Report(Path(path))
    try:
        dataset = open_dataset(path)
        chosen = list(splits or dataset.splits)
        for split in chosen:
            dataset._check_split(split)
    except DatasetLayoutError as e:
        report.errors.append(str(e))
        return report
    report.class_names = dataset.class_names
    report.description = (f"{dataset.layout.describe()}; {len(dataset.class_names)} classes, ignore value "
                          f"{dataset.ignore_value}, λ {dataset.ensemble_weight:g}, "
                          + (f"{len(dataset.seen)} seen classes (dataset.json)" if dataset.seen is not None
                             else "no seen list") + f"; splits: {', '.join(dataset.splits)}")
    for split in chosen:
        report.splits.append(check_split(dataset, split, max_images=max_images, threads=threads, refresh=refresh))
    shown = next((s.split for s in report.splits if s.checked), None)
    if shown is not None:
        grid = Path(grid) if grid is not None else Path("outputs") / "check" / f"{split_name(str(path))}.png"
        report.grid = draw_grid(dataset, shown, grid)
    return report


def format_report(report: Report) -> str:
    """The report as printed by the command."""
    lines = [f"{report.path}: {report.description}" if report.description else f"{report.path}:"]
    lines += [f"ERROR {e}" for e in report.errors]
    for s in report.splits:
        lines.append(f"\nsplit {s.split}: {s.pairs} image/label pairs"
                     + (f" ({s.checked} checked)" if s.checked != s.pairs else ""))
        lines += [f"  ERROR {e}" for e in s.errors]
        lines += [f"  warning: {w}" for w in s.warnings]
        total = int(s.class_pixels.sum()) if s.class_pixels is not None else 0
        if total:
            width = max(12, *(len(n) for n in report.class_names))
            lines.append(f"  {'class':<{width}} {'pixels':>7} {'images':>7}")
            for name, pixels, images in zip(report.class_names, s.class_pixels, s.class_images):
                lines.append(f"  {name:<{width}} {100 * pixels / total:6.2f}% {images:7d}")
            lines.append(f"  {'(ignored)':<{width}} {100 * s.ignored_pixels / (total + s.ignored_pixels):6.2f}%")
    if report.grid is not None:
        lines.append(f"\nwrote {report.grid} (a few images with their labels)")
    lines.append(f"\n{report.num_errors} error(s), {report.num_warnings} warning(s)")
    return "\n".join(lines)
