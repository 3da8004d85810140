"""Dataset names -> class names, ignore value, default CLIP ensemble weight and a source factory.

    spec = registry.get("ade20k_150")
    source = spec.make_source("/data/datasets", "val")   # the DETECTRON2_DATASETS root

Layouts are those OVSeg's `datasets/prepare_*.py` scripts write under the datasets root
(reference 5); class lists are `ovseg_jax/data/classes/<name>.txt`, copied from the original's
registration code (detectron2's list for ADE20K-150; its trailing space in "window " dropped,
which the tokenizer drops anyway). Where the image folder may hold images without labels
(COCO, shared VOC folders) the label folder lists the examples; ADE lists its images. Ensemble weights: 0.7 (config default; A-150, A-847),
0.6 (PC-59, PC-459) and 0.45 (PAS-20), as in the README's evaluation commands.

Names with a `tfds:` prefix read a TFDS catalog dataset prepared as ArrayRecord (`ovseg_jax.data.tfds`,
extra `tfds`); their `make_source(root, split)` takes the TFDS data_dir as `root` (None or "": TFDS's
default). `tfds:scene_parse150` carries ADE's instance annotations (100 thing classes, stuff ignored),
not the A-150 semantic maps: its scores are not A-150 benchmark numbers (see that module).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import numpy as np

from ovseg_jax.data import custom, synthetic
from ovseg_jax.data.classes import class_names
from ovseg_jax.data.sources import DatasetLayoutError, SegmentationSource


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """`make_source(root, split) -> SegmentationSource`; `class_names` are the evaluation classes."""
    name: str
    class_names: tuple[str, ...]
    ignore_value: int
    ensemble_weight: float
    make_source: Callable[[str | Path, str], SegmentationSource]
    splits: tuple[str, ...]


def _layout(root: Path, image_dir: str, label_dir: str, image_ext: str, label_ext: str) -> str:
    return (f"  {root / image_dir}/<name>{image_ext}\n  {root / label_dir}/<name>{label_ext}\n"
            "(see OVSeg's datasets/README.md and prepare_*.py scripts)")


def _folder_source(name: str, ignore: int, dirs: dict[str, tuple[str, str]], image_ext: str = ".jpg",
                   label_ext: str = ".png", index_by: str = "image"):
    names = class_names(name)

    def make(root: str | Path, split: str) -> SegmentationSource:
        if split not in dirs:
            raise ValueError(f"{name}: split {split!r} unknown; expected one of {sorted(dirs)}")
        root = Path(root)
        image_dir, label_dir = dirs[split]
        return SegmentationSource(root / image_dir, root / label_dir, class_names=names, ignore_value=ignore,
                                  image_ext=image_ext, label_ext=label_ext, index_by=index_by,
                                  layout=_layout(root, image_dir, label_dir, image_ext, label_ext))

    return make


def _synthetic_source(root: str | Path, split: str) -> SegmentationSource:
    """The generated world: `train` labels only its seen classes (unseen -> 255), `val` all classes."""
    root = Path(root)
    if split not in ("train", "val"):
        raise ValueError(f"synthetic: split {split!r} unknown; expected 'train' or 'val'")
    layout = _layout(root, f"images/{split}", f"annotations/{split}", ".png", ".png") + \
        f"\n  {root}/classes.json  (python -m ovseg_jax.data.synthetic --out {root})"
    meta_path = root / "classes.json"
    if not meta_path.is_file():
        raise DatasetLayoutError(f"{meta_path}: not found.\nExpected layout:\n{layout}")
    try:
        meta = json.loads(meta_path.read_text())
        names, seen_names = list(meta["names"]), list(meta["seen"])
    except (ValueError, KeyError, TypeError) as e:  # (JSONDecodeError and UnicodeDecodeError are ValueErrors)
        raise DatasetLayoutError(f"{meta_path}: not a synthetic-world class file ({type(e).__name__}: {e}); "
                                 "expected JSON with lists 'names' and 'seen'") from None
    label_map = None
    if split == "train":
        seen = {n: i for i, n in enumerate(seen_names)}
        label_map = np.array([seen.get(n, synthetic.IGNORE) for n in names], np.int32)
        names = seen_names
    return SegmentationSource(root / "images" / split, root / "annotations" / split, class_names=names,
                              ignore_value=synthetic.IGNORE, image_ext=".png", label_ext=".png",
                              label_map=label_map, layout=layout)


def _tfds_source(name: str):
    """`make_source(data_dir, split)` for the TFDS dataset `name` (imports tensorflow-datasets when called)."""

    def make(root: str | Path | None, split: str):
        from ovseg_jax.data.tfds import TfdsSegmentationSource  # noqa: PLC0415  (optional dependency)

        return TfdsSegmentationSource(name, split, data_dir=root or None)

    return make


_ADE150 = ("ADEChallengeData2016/images/{}", "ADEChallengeData2016/annotations_detectron2/{}")
_ADE847 = ("ADE20K_2021_17_01/images_detectron2/{}", "ADE20K_2021_17_01/annotations_detectron2/{}")


def _ade(pattern: tuple[str, str]) -> dict[str, tuple[str, str]]:
    return {split: (pattern[0].format(d), pattern[1].format(d))
            for split, d in (("train", "training"), ("val", "validation"))}


_SPECS: dict[str, DatasetSpec] = {}


def _register(name: str, ignore: int, weight: float, make, splits: tuple[str, ...], names=None) -> None:
    _SPECS[name] = DatasetSpec(name, tuple(names or class_names(name)), ignore, weight, make, splits)


_register("coco_stuff_171", 255, 0.7, _folder_source(
    "coco_stuff_171", 255, {s: (f"coco/{s}2017", f"coco/stuffthingmaps_detectron2/{s}2017") for s in ("train", "val")},
    index_by="label"), ("train", "val"))
_register("ade20k_150", 255, 0.7, _folder_source("ade20k_150", 255, _ade(_ADE150)), ("train", "val"))
_register("ade20k_847", 65535, 0.7, _folder_source("ade20k_847", 65535, _ade(_ADE847), label_ext=".tif"),
          ("train", "val"))
_register("pascal_context_59", 255, 0.6, _folder_source(
    "pascal_context_59", 255, {"val": ("VOCdevkit/VOC2010/JPEGImages", "VOCdevkit/VOC2010/annotations_detectron2/pc59_val")},
    index_by="label"), ("val",))
_register("pascal_context_459", 65535, 0.6, _folder_source(
    "pascal_context_459", 65535,
    {"val": ("VOCdevkit/VOC2010/JPEGImages", "VOCdevkit/VOC2010/annotations_detectron2/pc459_val")},
    label_ext=".tif", index_by="label"), ("val",))
_register("pascal_voc_20", 255, 0.45, _folder_source(
    "pascal_voc_20", 255, {"val": ("VOCdevkit/VOC2012/JPEGImages", "VOCdevkit/VOC2012/annotations_detectron2/val")},
    index_by="label"), ("val",))
_register("synthetic", synthetic.IGNORE, 0.7, _synthetic_source, ("train", "val"), names=synthetic.CLASS_NAMES)
_register("tfds:scene_parse150", 255, 0.7, _tfds_source("scene_parse150"), ("train", "val"),
          names=class_names("ade20k_150"))


def names() -> tuple[str, ...]:
    return tuple(_SPECS)


def get(name: str) -> DatasetSpec:
    """The registered dataset `name` (see `names()`), or a dataset folder given by path (anything
    that exists on disk or contains a path separator; layouts in `ovseg_jax.data.custom`)."""
    if name in _SPECS:
        return _SPECS[name]
    if custom.is_path(name):
        dataset = custom.open_dataset(name)
        return DatasetSpec(dataset.name, dataset.class_names, dataset.ignore_value, dataset.ensemble_weight,
                           dataset.make_source, dataset.splits)
    raise KeyError(f"unknown dataset {name!r}; registered: {', '.join(_SPECS)}, or a dataset folder by path")
