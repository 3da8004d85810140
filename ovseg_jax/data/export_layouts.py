"""Write a segmentation dataset into the layouts `ovseg_jax.data.custom` reads: the folder layout
(index labels), the folder layout with colour labels (`palette.json`) and COCO panoptic JSON + PNGs.

    export(source, "out/my_folder", "folder", split="val", seen=[...])     # any source: [i] -> image, label
    export_world("outputs/synthetic_world", "out/world_coco", "coco", splits=("train", "val"))
    python -m ovseg_jax.data export synthetic out/world_palette --root outputs/synthetic_world --layout palette

Images are written as PNG (lossless: the exported dataset decodes to the same pixels), each
example under its source file's stem. Used by the tests (the exported world evaluates exactly as
`--dataset synthetic`) and to convert a dataset between layouts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from ovseg_jax.data.sources import SegmentationSource

LAYOUTS = ("folder", "palette", "coco")
IGNORE_COLOUR = (0, 0, 0)


def palette_colours(n: int) -> np.ndarray:
    """`n` distinct colours, none black (black marks ignored pixels) -> uint8 `[n, 3]`."""
    index = np.arange(1, n + 1)
    return np.stack([(index * 67) % 256, (index * 151) % 256, (index * 29 + 128) % 256], -1).astype(np.uint8)


def segment_id(class_index):
    """The panoptic segment id of a class's region (its one segment per image; int or int array):
    uses all three channels of the RGB encoding (id = R + 256 G + 256² B); up to 254 classes."""
    return 1 + 65793 * (class_index + 1)


def category_id(class_index: int) -> int:
    """COCO category ids need not be contiguous: 1, 4, 7, ..."""
    return 1 + 3 * class_index


def _stems(source, count: int) -> list[str]:
    paths = getattr(source, "image_paths", None)
    stems = [Path(p).stem for p in paths[:count]] if paths else []
    if len(set(stems)) != count:
        stems = [f"{i:06d}" for i in range(count)]
    return stems


def _label_png(label: np.ndarray) -> Image.Image:
    if label.max(initial=0) < 256 and label.min(initial=0) >= 0:
        return Image.fromarray(label.astype(np.uint8))
    return Image.fromarray(label.astype(np.uint16))


def _write_json(path: Path, content) -> None:
    path.write_text(json.dumps(content, indent=1))


def export(source, out: str | Path, layout: str, *, split: str = "val", class_names: Sequence[str] | None = None,
           seen: Sequence[str] | None = None, max_images: int | None = None) -> Path:
    """Write `source`'s examples (`[i] -> {"image": uint8 [H, W, 3], "label": int [H, W]}`, its
    `class_names` and `ignore_value`) as split `split` of `layout` under `out` -> `out`.
    `class_names` replace the source's (same count, e.g. renamed); `seen` goes to `dataset.json`."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: expected one of {LAYOUTS}")
    names = list(class_names if class_names is not None else source.class_names)
    if len(names) != len(source.class_names):
        raise ValueError(f"{len(names)} class names for a source with {len(source.class_names)} classes")
    out = Path(out)
    count = len(source) if max_images is None else min(max_images, len(source))
    stems = _stems(source, count)
    ignore = int(source.ignore_value)
    options = {"ignore_value": ignore, **({"seen": list(seen)} if seen is not None else {})}
    if layout == "coco":
        _export_coco(source, out, split, names, stems, ignore)
        if ignore != 255:
            options.pop("ignore_value")  # COCO panoptic marks unlabeled pixels by segment id 0
    else:
        image_dir, label_dir = out / "images" / split, out / "labels" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        label_dir.mkdir(parents=True, exist_ok=True)
        colours = palette_colours(len(names))
        for i, stem in enumerate(stems):
            example = source[i]
            Image.fromarray(example["image"]).save(image_dir / f"{stem}.png", compress_level=1)
            label = np.asarray(example["label"])
            if layout == "palette":
                rgb = np.where((label == ignore)[..., None], np.array(IGNORE_COLOUR, np.uint8),
                               colours[np.clip(label, 0, len(names) - 1)])
                Image.fromarray(rgb.astype(np.uint8)).save(label_dir / f"{stem}.png", compress_level=1)
            else:
                _label_png(label).save(label_dir / f"{stem}.png", compress_level=1)
        (out / "classes.txt").write_text("".join(f"{n}\n" for n in names))
        if layout == "palette":
            _write_json(out / "palette.json", {n: c.tolist() for n, c in zip(names, colours)})
            options["ignore_colors"] = [list(IGNORE_COLOUR)]
    _write_json(out / "dataset.json", options)
    return out


def _export_coco(source, out: Path, split: str, names: list[str], stems: list[str], ignore: int) -> None:
    if len(names) > 254:
        raise ValueError(f"the COCO export encodes up to 254 classes (one segment id per class); got {len(names)}")
    image_dir, png_dir = out / split, out / "annotations" / f"panoptic_{split}"
    image_dir.mkdir(parents=True, exist_ok=True)
    png_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i, stem in enumerate(stems):
        example = source[i]
        image, label = example["image"], np.asarray(example["label"], np.int64)
        Image.fromarray(image).save(image_dir / f"{stem}.png", compress_level=1)
        present = [int(c) for c in np.unique(label) if c != ignore]
        ids = np.where(label == ignore, 0, segment_id(np.clip(label, 0, None)))
        rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
        Image.fromarray(rgb).save(png_dir / f"{stem}.png", compress_level=1)
        images.append({"id": i + 1, "file_name": f"{stem}.png", "height": image.shape[0], "width": image.shape[1]})
        annotations.append({"image_id": i + 1, "file_name": f"{stem}.png", "segments_info": [
            {"id": segment_id(c), "category_id": category_id(c), "iscrowd": 0, "area": int((label == c).sum())}
            for c in present]})
    categories = [{"id": category_id(i), "name": n, "isthing": 1} for i, n in enumerate(names)]
    _write_json(out / "annotations" / f"panoptic_{split}.json",
                {"images": images, "annotations": annotations, "categories": categories})


def world_source(world: str | Path, split: str) -> SegmentationSource:
    """The synthetic world's `split` with all its classes labelled (its registry train source
    hides the unseen ones; this reads the files as written)."""
    world = Path(world)
    names = json.loads((world / "classes.json").read_text())["names"]
    return SegmentationSource(world / "images" / split, world / "annotations" / split, class_names=names,
                              ignore_value=255, image_ext=".png", label_ext=".png")


def export_world(world: str | Path, out: str | Path, layout: str, *, splits: Sequence[str] = ("train", "val"),
                 rename: Mapping[str, str] | None = None, max_images: int | None = None) -> Path:
    """The generated world (`ovseg_jax.data.synthetic`) in `layout` under `out` -> `out`: every
    split with all classes labelled, classes renamed by `rename` ({old: new}), the world's seen
    classes in `dataset.json`."""
    meta = json.loads((Path(world) / "classes.json").read_text())
    rename = dict(rename or {})
    unknown = sorted(set(rename) - set(meta["names"]))
    if unknown:
        raise ValueError(f"rename: {unknown} are not classes of the world ({', '.join(meta['names'])})")
    names = [rename.get(n, n) for n in meta["names"]]
    seen = [rename.get(n, n) for n in meta["seen"]]
    for split in splits:
        export(world_source(world, split), out, layout, split=split, class_names=names, seen=seen,
               max_images=max_images)
    return Path(out)


def parse_rename(items: Sequence[str]) -> dict[str, str]:
    """["plain red=crimson", ...] -> {"plain red": "crimson", ...}."""
    out = {}
    for item in items:
        old, sep, new = item.partition("=")
        if not sep or not old.strip() or not new.strip():
            raise ValueError(f"--rename {item!r}: expected OLD=NEW")
        out[old.strip()] = new.strip()
    return out


