"""Your own labelled data, by path: `registry.get("path/to/data")` (and so `--dataset PATH`,
`config.data.dataset=PATH`, `gt.dataset=PATH`) reads any of these layouts, detected from the disk:

folder (`images/` + `labels/` + `classes.txt`)::

    PATH/classes.txt                      one class per line; `name: synonym, synonym` -> "name, synonym, synonym"
    PATH/dataset.json                     optional: ignore_value (255), ensemble_weight (0.7), seen [names],
                                          label_offset (0; 1 for 1-based maps such as ADE's raw files:
                                          value v is class v - 1, 0 is ignored), ignore_colors [[r, g, b]]
    PATH/images/<split>/**/<stem>.{jpg,jpeg,png,bmp,tif,tiff,webp}
    PATH/labels/<split>/**/<stem>.png     8- or 16-bit class indices, the ignore value, same size as the image
    PATH/palette.json                     optional: colour labels. {"name": [r, g, b], ...} (class order;
                                          classes.txt may then be left out) or [[r, g, b], ...] in
                                          classes.txt's order; RGB or palette PNG labels are read by colour.
                                          Without it a palette ("P") PNG's indices are the class indices.

A folder with images and labels directly in `images/` and `labels/` has one split, "all".

COCO panoptic / COCO-Stuff-style JSON + PNGs::

    PATH/annotations/<kind>_<split>.json  {"images": [{id, file_name}], "annotations": [{image_id, file_name,
                                          segments_info: [{id, category_id}]}], "categories": [{id, name}]}
    PATH/annotations/<kind>_<split>/<annotation file_name>.png
    PATH/<split>/<image file_name>        (or PATH/images/<split>/...)

`categories` give the class names (in their order). An RGB annotation PNG is a panoptic map
(segment id = R + 256 G + 256² B; 0 is unlabeled) turned semantic through `segments_info`; a
single-channel one holds category ids directly (COCO-Stuff style; 0 and `ignore_value` unlabeled).

Cityscapes::

    PATH/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png
    PATH/gtFine/<split>/<city>/<name>_gtFine_labelIds.png    label ids 0..33 -> the 19 train classes

Each split is listed once and the listing cached beside the data (`ovseg_jax.data.index`), so a
100k-image dataset is not listed at every start. `open_dataset(path)` says which layout it found;
a folder that matches none raises `DatasetLayoutError` naming what it holds and what was expected.
`python -m ovseg_jax.data check PATH` (`ovseg_jax.data.check`) inspects every file before training.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
from PIL import Image

from ovseg_jax.data import index
from ovseg_jax.data.sources import BadExampleError, DatasetLayoutError, read_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
INVALID = -1  # a label value that maps to no class and is not ignored
DEFAULT_IGNORE = 255
DEFAULT_ENSEMBLE_WEIGHT = 0.7
DATASET_FIELDS = ("ignore_value", "ensemble_weight", "seen", "label_offset", "ignore_colors")

# Cityscapes' 19 evaluation classes and their label ids (cityscapesScripts' labels table: the ids
# with a trainId other than 255); every other id 0..33 is ignored.
CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                      "motorcycle", "bicycle")
CITYSCAPES_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
CITYSCAPES_NUM_IDS = 34

EXPECTED = """expected one of these layouts:
  folder:     PATH/classes.txt, PATH/images/<split>/<stem>.jpg|png..., PATH/labels/<split>/<stem>.png
              (optional PATH/dataset.json, PATH/palette.json for colour labels)
  COCO:       PATH/annotations/panoptic_<split>.json + PATH/annotations/panoptic_<split>/*.png,
              images in PATH/<split>/ or PATH/images/<split>/
  Cityscapes: PATH/leftImg8bit/<split>/<city>/*_leftImg8bit.png + PATH/gtFine/<split>/<city>/*_gtFine_labelIds.png
(see docs/own-data.md)"""


def is_path(name: str) -> bool:
    """Whether a dataset name means a folder on disk: it exists, or it contains a path separator."""
    return os.sep in name or "/" in name or Path(name).exists()


class Files(NamedTuple):
    """One split's files, relative to the dataset folder."""
    pairs: list[tuple[str, str]]  # (image, label), sorted by the pairing key
    orphan_images: list[str]  # images without a label
    orphan_labels: list[str]  # labels without an image
    extra: dict  # layout data per label (COCO: its segment -> class table)


class Label(NamedTuple):
    """A decoded label map: int32 `[H, W]` class ids (the ignore value; `INVALID` where the file's
    value maps to no class) and the offending values with their pixel counts."""
    ids: np.ndarray
    invalid: dict[str, int]


def parse_classes(path: Path) -> list[str]:
    """`classes.txt` -> names: one class per line (`#` comments and blank lines skipped);
    `name: synonym, synonym` becomes "name, synonym, synonym" (OVSeg's comma-separated synonyms)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DatasetLayoutError(f"{path}: not UTF-8 text; expected one class name per line") from None
    names = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, synonyms = line.partition(":")
        names.append(", ".join([name.strip()] + [s.strip() for s in synonyms.split(",") if s.strip()]))
    if not names:
        raise DatasetLayoutError(f"{path}: no class names (the file is empty); expected one class name per line")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DatasetLayoutError(f"{path}: duplicate class names {duplicates}")
    return names


def read_options(path: Path) -> dict:
    """`dataset.json` (absent: {}) -> its fields, checked."""
    if not path.is_file():
        return {}
    try:
        options = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DatasetLayoutError(f"{path}: not JSON ({e})") from None
    if not isinstance(options, dict):
        raise DatasetLayoutError(f"{path}: expected a JSON object with some of {list(DATASET_FIELDS)}")
    unknown = sorted(set(options) - set(DATASET_FIELDS))
    if unknown:
        raise DatasetLayoutError(f"{path}: unknown field(s) {unknown}; known: {list(DATASET_FIELDS)}")
    for key, kind in (("ignore_value", int), ("label_offset", int), ("ensemble_weight", (int, float))):
        if key in options and (isinstance(options[key], bool) or not isinstance(options[key], kind)):
            raise DatasetLayoutError(f"{path}: {key}={options[key]!r}: expected a number")
    seen = options.get("seen", [])
    if not (isinstance(seen, list) and all(isinstance(s, str) for s in seen)):
        raise DatasetLayoutError(f"{path}: seen must be a list of class names")
    return options


def _listing(root: Path, folder: str, keep: Callable[[str], bool]) -> tuple[dict[str, str], list[str]]:
    """Files under `root/folder` (recursive) that `keep` accepts -> ({relative path without
    extension, under folder: path relative to root}, the folders listed, relative to root)."""
    found, folders = {}, []
    for current, dirs, files in os.walk(root / folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel_dir = os.path.relpath(current, root)
        folders.append(rel_dir)
        for name in files:
            if keep(name):
                rel = os.path.join(rel_dir, name)
                found[os.path.splitext(os.path.relpath(rel, folder))[0]] = rel
    return found, folders


def _pair(images: dict[str, str], labels: dict[str, str]) -> tuple[list, list, list]:
    keys = sorted(images.keys() & labels.keys())
    return ([(images[k], labels[k]) for k in keys], sorted(images[k] for k in images.keys() - labels.keys()),
            sorted(labels[k] for k in labels.keys() - images.keys()))


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS and not name.startswith(".")


def _open_label(path: Path) -> Image.Image:
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise BadExampleError(f"{path}: label file not found") from None
    except Exception as e:  # PIL raises several types for corrupt files
        raise BadExampleError(f"{path}: cannot decode label map ({type(e).__name__}: {e})") from None


def _pixels(img: Image.Image, path: Path) -> np.ndarray:
    try:
        return np.asarray(img)
    except Exception as e:  # truncated data surfaces when decoding
        raise BadExampleError(f"{path}: cannot decode label map ({type(e).__name__}: {e})") from None


def _invalid_counts(values: np.ndarray, bad: np.ndarray, describe: Callable[[int], str]) -> dict[str, int]:
    found, counts = np.unique(values[bad], return_counts=True)
    return {describe(int(v)): int(c) for v, c in zip(found, counts)}


class Layout:
    """What a layout tells about a dataset folder; subclasses list splits and decode labels."""
    name = ""

    def __init__(self, path: Path):
        self.path = path
        self.options = read_options(path / "dataset.json")
        self.ignore_value = int(self.options.get("ignore_value", DEFAULT_IGNORE))
        self.class_names: tuple[str, ...] = ()

    def describe(self) -> str:
        return self.name

    def splits(self) -> tuple[str, ...]:
        raise NotImplementedError

    def list_files(self, split: str) -> tuple[Files, list[str]]:
        """Listing of one split -> (its files, the paths the listing depends on)."""
        raise NotImplementedError

    def decode(self, label_path: Path, extra) -> Label:
        raise NotImplementedError


class FolderLayout(Layout):
    """`images/<split>` + `labels/<split>` + `classes.txt` (or `palette.json` names)."""
    name = "folder"

    def __init__(self, path: Path):
        super().__init__(path)
        self.offset = int(self.options.get("label_offset", 0))
        self.colours = None  # [C, 3] when labels are read by colour
        names = parse_classes(path / "classes.txt") if (path / "classes.txt").is_file() else None
        if (path / "palette.json").is_file():
            names, self.colours = self._palette(path / "palette.json", names)
        if names is None:
            raise DatasetLayoutError(f"{path / 'classes.txt'}: not found (and no palette.json with class names)."
                                     f"\n{EXPECTED}")
        self.class_names = tuple(names)
        ignore = self.options.get("ignore_colors", [])
        self.ignore_colours = np.asarray(ignore, np.int64).reshape(-1, 3)

    @staticmethod
    def _palette(path: Path, names: list[str] | None) -> tuple[list[str], np.ndarray]:
        try:
            palette = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise DatasetLayoutError(f"{path}: not JSON ({e})") from None
        if isinstance(palette, dict):
            listed = list(palette)
            if names is not None and sorted(names) != sorted(listed):
                raise DatasetLayoutError(f"{path}: class names differ from classes.txt's: "
                                         f"{sorted(set(names) ^ set(listed))}")
            names = names or listed
            colours = [palette[n] for n in names]
        elif isinstance(palette, list) and names is not None:
            colours = palette
            if len(colours) != len(names):
                raise DatasetLayoutError(f"{path}: {len(colours)} colours for the {len(names)} classes of classes.txt")
        else:
            raise DatasetLayoutError(f"{path}: expected {{class name: [r, g, b]}} or a list of [r, g, b] in "
                                     "classes.txt's order")
        try:
            array = np.asarray(colours, np.int64).reshape(len(names), 3)
        except ValueError:
            raise DatasetLayoutError(f"{path}: every colour must be [r, g, b]") from None
        keys = array @ np.array([65536, 256, 1])
        if len(set(keys.tolist())) != len(keys):
            raise DatasetLayoutError(f"{path}: two classes share a colour")
        return names, array

    def describe(self) -> str:
        labels = "colour labels (palette.json)" if self.colours is not None else "index labels"
        return f"folder layout, {labels}" + (f", label_offset {self.offset}" if self.offset else "")

    def splits(self) -> tuple[str, ...]:
        images, labels = self.path / "images", self.path / "labels"
        subdirs = sorted(d.name for d in images.iterdir() if d.is_dir() and (labels / d.name).is_dir())
        if subdirs:
            return tuple(subdirs)
        if any(_is_image(p.name) for p in images.iterdir()):
            return ("all",)
        raise DatasetLayoutError(f"{images}: no split folders with a partner in {labels}, and no images.\n{EXPECTED}")

    def _dirs(self, split: str) -> tuple[str, str]:
        return ("images", "labels") if split == "all" else (f"images/{split}", f"labels/{split}")

    def list_files(self, split: str) -> tuple[Files, list[str]]:
        image_dir, label_dir = self._dirs(split)
        flat = split == "all"
        images, image_folders = _listing(self.path, image_dir, _is_image)
        labels, label_folders = _listing(self.path, label_dir, lambda n: n.lower().endswith(".png"))
        if flat:  # only the files directly in images/ and labels/
            images = {k: v for k, v in images.items() if "/" not in k}
            labels = {k: v for k, v in labels.items() if "/" not in k}
        pairs, orphan_images, orphan_labels = _pair(images, labels)
        watched = image_folders + label_folders + ["classes.txt", "dataset.json", "palette.json"]
        return Files(pairs, orphan_images, orphan_labels, {}), watched

    def decode(self, label_path: Path, extra) -> Label:
        with _open_label(label_path) as img:
            if self.colours is not None:
                return self._by_colour(_pixels(img if img.mode == "RGB" else img.convert("RGB"), label_path))
            if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
                raise BadExampleError(f"{label_path}: label map has PIL mode {img.mode!r}; expected a single-channel "
                                      "8- or 16-bit PNG of class indices (colour labels need a palette.json)")
            raw = _pixels(img, label_path).astype(np.int64)
        ignored = raw == self.ignore_value
        ids = raw - self.offset
        if self.offset:
            ignored |= ids < 0
        bad = ~ignored & ((ids < 0) | (ids >= len(self.class_names)))
        out = np.where(ignored, self.ignore_value, np.where(bad, INVALID, ids)).astype(np.int32)
        return Label(out, _invalid_counts(raw, bad, lambda v: f"value {v}"))

    def _by_colour(self, rgb: np.ndarray) -> Label:
        keys = rgb.astype(np.int64) @ np.array([65536, 256, 1])
        table = self.colours @ np.array([65536, 256, 1])
        order = np.argsort(table)
        pos = np.clip(np.searchsorted(table[order], keys), 0, len(table) - 1)
        found = table[order][pos] == keys
        ignored = np.isin(keys, self.ignore_colours @ np.array([65536, 256, 1]))
        ids = np.where(found, order[pos], np.where(ignored, self.ignore_value, INVALID)).astype(np.int32)
        bad = ~found & ~ignored
        return Label(ids, _invalid_counts(keys, bad, lambda k: f"colour {[k >> 16, (k >> 8) & 255, k & 255]}"))


class CocoLayout(Layout):
    """COCO panoptic (or COCO-Stuff-style semantic PNG) annotations: `annotations/<kind>_<split>.json`."""
    name = "coco"

    def __init__(self, path: Path):
        super().__init__(path)
        self._jsons = self._annotation_files(path)
        if not self._jsons:
            raise DatasetLayoutError(f"{path / 'annotations'}: no <kind>_<split>.json with a <kind>_<split>/ PNG "
                                     f"folder beside it.\n{EXPECTED}")
        first = self._jsons[sorted(self._jsons)[0]]
        watched = [os.path.relpath(first, path)]
        self._categories = index.cached(path, "coco/categories", lambda: (self._read_categories(first), watched))
        self.class_names = tuple(c["name"] for c in self._categories)

    @staticmethod
    def _annotation_files(path: Path) -> dict[str, Path]:
        out = {}
        for file in sorted((path / "annotations").glob("*_*.json")):
            if (file.parent / file.stem).is_dir():
                out[file.stem.split("_", 1)[1]] = file
        return out

    @staticmethod
    def _read_categories(file: Path) -> list[dict]:
        content = _load_json(file)
        categories = content.get("categories")
        if not categories or not all(isinstance(c, dict) and "id" in c and "name" in c for c in categories):
            raise DatasetLayoutError(f"{file}: 'categories' must be a non-empty list of {{id, name}}")
        return categories

    def describe(self) -> str:
        return "COCO layout (annotations/*.json + PNGs)"

    def splits(self) -> tuple[str, ...]:
        return tuple(sorted(self._jsons))

    def _image_dir(self, split: str) -> str:
        for candidate in (split, f"images/{split}"):
            if (self.path / candidate).is_dir():
                return candidate
        raise DatasetLayoutError(f"{self.path / split}: image folder not found (nor {self.path / 'images' / split})")

    def list_files(self, split: str) -> tuple[Files, list[str]]:
        json_path = self._jsons[split]
        content = _load_json(json_path)
        if [(c.get("id"), c.get("name")) for c in content.get("categories", [])] != \
                [(c["id"], c["name"]) for c in self._categories]:
            raise DatasetLayoutError(f"{json_path}: categories differ from those of the other splits")
        index_of = {c["id"]: i for i, c in enumerate(self._categories)}
        png_dir = os.path.relpath(json_path.parent / json_path.stem, self.path)
        image_dir = self._image_dir(split)
        try:
            files = {im["id"]: im["file_name"] for im in content["images"]}
            annotations = content["annotations"]
        except (KeyError, TypeError) as e:
            raise DatasetLayoutError(f"{json_path}: expected 'images' [{{id, file_name}}] and 'annotations' "
                                     f"[{{image_id, file_name, segments_info}}] ({type(e).__name__}: {e})") from None
        images, image_folders = _listing(self.path, image_dir, _is_image)
        labels, label_folders = _listing(self.path, png_dir, lambda n: n.lower().endswith(".png"))
        pairs, extra, orphan_labels, used_images, used_labels = [], {}, [], set(), set()
        for ann in sorted(annotations, key=lambda a: str(files.get(a.get("image_id"), ""))):
            image_name, label_key = files.get(ann.get("image_id")), os.path.splitext(ann["file_name"])[0]
            image_key = None if image_name is None else os.path.splitext(image_name)[0]
            if image_key in images and label_key in labels:
                used_images.add(image_key)
                used_labels.add(label_key)
                pairs.append((images[image_key], labels[label_key]))
                extra[labels[label_key]] = {str(s["id"]): index_of.get(s["category_id"], INVALID)
                                            for s in ann.get("segments_info", [])}
            elif label_key in labels:  # an annotation whose image is missing
                used_labels.add(label_key)
                orphan_labels.append(labels[label_key])
        orphan_images = sorted(v for k, v in images.items() if k not in used_images)  # no annotation or no PNG
        orphan_labels += [v for k, v in labels.items() if k not in used_labels]  # PNGs no annotation names
        watched = image_folders + label_folders + [os.path.relpath(json_path, self.path), "dataset.json"]
        return Files(pairs, orphan_images, sorted(orphan_labels), extra), watched

    def decode(self, label_path: Path, extra) -> Label:
        with _open_label(label_path) as img:
            raw = _pixels(img, label_path).astype(np.int64)
        if raw.ndim == 3:  # panoptic: segment ids
            ids_map = raw[..., 0] + 256 * raw[..., 1] + 65536 * raw[..., 2]
            segments = {int(k): v for k, v in extra.items()}
            keys = np.array(sorted(segments) or [0], np.int64)
            values = np.array([segments[k] for k in sorted(segments)] or [INVALID], np.int64)
            pos = np.clip(np.searchsorted(keys, ids_map), 0, len(keys) - 1)
            known = keys[pos] == ids_map
            ignored = ids_map == 0
            ids = np.where(ignored, self.ignore_value, np.where(known, values[pos], INVALID))
            bad = ids == INVALID
            return Label(ids.astype(np.int32), _invalid_counts(ids_map, bad, lambda v: f"segment id {v}"))
        index_of = {c["id"]: i for i, c in enumerate(self._categories)}
        lut = np.full(max(max(index_of), int(raw.max(initial=0)), self.ignore_value) + 1, INVALID, np.int64)
        lut[list(index_of)] = list(index_of.values())
        lut[0] = lut[self.ignore_value] = self.ignore_value
        ids = lut[raw]
        return Label(ids.astype(np.int32), _invalid_counts(raw, ids == INVALID, lambda v: f"category id {v}"))


class CityscapesLayout(Layout):
    """`leftImg8bit/<split>/<city>/*_leftImg8bit.png` + `gtFine/.../*_gtFine_labelIds.png`."""
    name = "cityscapes"

    def __init__(self, path: Path):
        super().__init__(path)
        self.class_names = CITYSCAPES_CLASSES
        self.ignore_value = DEFAULT_IGNORE
        self._lut = np.full(CITYSCAPES_NUM_IDS, DEFAULT_IGNORE, np.int64)
        self._lut[list(CITYSCAPES_LABEL_IDS)] = np.arange(len(CITYSCAPES_CLASSES))

    def describe(self) -> str:
        return "Cityscapes layout (gtFine labelIds -> 19 classes)"

    def splits(self) -> tuple[str, ...]:
        return tuple(sorted(d.name for d in (self.path / "leftImg8bit").iterdir()
                            if d.is_dir() and (self.path / "gtFine" / d.name).is_dir()))

    def list_files(self, split: str) -> tuple[Files, list[str]]:
        images, image_folders = _listing(self.path, f"leftImg8bit/{split}", lambda n: n.endswith("_leftImg8bit.png"))
        labels, label_folders = _listing(self.path, f"gtFine/{split}", lambda n: n.endswith("_gtFine_labelIds.png"))
        images = {k[: -len("_leftImg8bit")]: v for k, v in images.items()}
        labels = {k[: -len("_gtFine_labelIds")]: v for k, v in labels.items()}
        pairs, orphan_images, orphan_labels = _pair(images, labels)
        return Files(pairs, orphan_images, orphan_labels, {}), image_folders + label_folders

    def decode(self, label_path: Path, extra) -> Label:
        with _open_label(label_path) as img:
            raw = _pixels(img, label_path).astype(np.int64)
        if raw.ndim != 2:
            raise BadExampleError(f"{label_path}: expected a single-channel labelIds PNG; got shape {raw.shape}")
        bad = (raw < 0) | (raw >= CITYSCAPES_NUM_IDS)
        ids = np.where(bad, INVALID, self._lut[np.clip(raw, 0, CITYSCAPES_NUM_IDS - 1)])
        return Label(ids.astype(np.int32), _invalid_counts(raw, bad, lambda v: f"label id {v}"))


def _load_json(path: Path) -> dict:
    try:
        content = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise DatasetLayoutError(f"{path}: cannot read JSON ({type(e).__name__}: {e})") from None
    if not isinstance(content, dict):
        raise DatasetLayoutError(f"{path}: expected a JSON object")
    return content


def detect(path: str | Path) -> Layout:
    """The layout of the folder `path` -> its `Layout`; `DatasetLayoutError` naming what the folder
    holds and the layouts expected."""
    path = Path(path)
    if not path.is_dir():
        raise DatasetLayoutError(f"{path}: no such dataset folder (a dataset given by path must be a folder)."
                                 f"\n{EXPECTED}")
    if (path / "leftImg8bit").is_dir() and (path / "gtFine").is_dir():
        return CityscapesLayout(path)
    if (path / "images").is_dir() and (path / "labels").is_dir():
        return FolderLayout(path)
    if (path / "annotations").is_dir() and CocoLayout._annotation_files(path):
        return CocoLayout(path)
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir() if not p.name.startswith("."))
    shown = ", ".join(entries[:12]) + (f", ... ({len(entries)} entries)" if len(entries) > 12 else "")
    hint = ("\n(this looks like the generated synthetic world: use --dataset synthetic --root PATH)"
            if (path / "classes.json").is_file() and (path / "annotations").is_dir() else "")
    raise DatasetLayoutError(f"{path}: no dataset layout recognised; found {shown or 'an empty folder'}.\n{EXPECTED}"
                             + hint)


class CustomSource:
    """grain random-access source of one split: `[i] -> {"image": uint8 [H, W, 3], "label": int32
    [H, W]}` with class ids `0..C-1` and the dataset's ignore value (as `sources.SegmentationSource`).
    Bad examples raise `BadExampleError` naming the file."""

    def __init__(self, dataset: "CustomDataset", split: str, files: Files):
        self.dataset, self.split = dataset, split
        root = str(dataset.path)  # (strings: pathlib's "/" costs ~50 µs a path, seconds for 100k files)
        self.image_paths = [f"{root}/{image}" for image, _ in files.pairs]
        self.label_paths = [f"{root}/{label}" for _, label in files.pairs]
        self._extra = [files.extra.get(label) for _, label in files.pairs]
        self.class_names = dataset.class_names
        self.ignore_value = dataset.ignore_value

    def __len__(self) -> int:
        return len(self.image_paths)

    def __repr__(self) -> str:
        return (f"CustomSource({self.dataset.path}, {self.split!r}: {len(self)} examples, "
                f"{len(self.class_names)} classes)")

    def read_label(self, index: int) -> Label:
        """The decoded label of example `index` (invalid values marked, not raised)."""
        return self.dataset.layout.decode(Path(self.label_paths[index]), self._extra[index])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        image_path, label_path = self.image_paths[index], self.label_paths[index]
        image, label = read_image(image_path), self.read_label(index)
        if image.shape[:2] != label.ids.shape:
            raise BadExampleError(f"{label_path}: label size {label.ids.shape[1]}x{label.ids.shape[0]} (WxH) differs "
                                  f"from image {image_path} size {image.shape[1]}x{image.shape[0]}")
        if label.invalid:
            shown = ", ".join(list(label.invalid)[:8])
            raise BadExampleError(f"{label_path}: {shown} outside the {len(self.class_names)} classes "
                                  f"(ignore value {self.ignore_value})")
        return {"image": image, "label": label.ids}


@dataclasses.dataclass(frozen=True)
class CustomDataset:
    """A dataset folder: its layout, classes, ignore value, λ, seen classes and splits."""
    path: Path
    layout: Layout
    class_names: tuple[str, ...]
    ignore_value: int
    ensemble_weight: float
    seen: tuple[str, ...] | None
    splits: tuple[str, ...]

    @property
    def name(self) -> str:
        return str(self.path)

    def files(self, split: str, *, refresh: bool = False) -> Files:
        """The split's files (from the cached index; `refresh` lists the folders again)."""
        self._check_split(split)
        data = index.cached(self.path, f"{self.layout.name}/{split}", lambda: _as_json(self.layout.list_files(split)),
                            refresh=refresh)
        return Files([tuple(p) for p in data["pairs"]], data["orphan_images"], data["orphan_labels"], data["extra"])

    def _check_split(self, split: str) -> None:
        if split not in self.splits:
            raise DatasetLayoutError(f"{self.path}: split {split!r} not found; this {self.layout.describe()} "
                                     f"has {', '.join(self.splits)}")

    def make_source(self, root: str | Path | None = None, split: str = "val") -> CustomSource:
        """The split's source (`root` is ignored: the dataset is its folder; the signature is
        `registry.DatasetSpec.make_source`'s)."""
        del root
        files = self.files(split)
        if not files.pairs:
            raise DatasetLayoutError(f"{self.path}: split {split!r} has no image/label pairs "
                                     f"({len(files.orphan_images)} images, {len(files.orphan_labels)} labels unpaired)")
        return CustomSource(self, split, files)

    def unseen(self, class_names: Sequence[str] | None = None) -> list[str] | None:
        """The classes not in `dataset.json`'s `seen` list (None when it has none)."""
        if self.seen is None:
            return None
        return [n for n in (class_names or self.class_names) if n not in self.seen]


def _as_json(listed: tuple[Files, list[str]]) -> tuple[dict, list[str]]:
    files, watched = listed
    return files._asdict(), watched


def open_dataset(path: str | Path) -> CustomDataset:
    """The dataset folder `path` (layout detected) -> `CustomDataset`."""
    path = Path(path)
    layout = detect(path)
    options = layout.options
    seen = options.get("seen")
    if seen is not None:
        unknown = [n for n in seen if n not in layout.class_names]
        if unknown:
            raise DatasetLayoutError(f"{path / 'dataset.json'}: seen classes {unknown} are not in the class list")
    weight = float(options.get("ensemble_weight", DEFAULT_ENSEMBLE_WEIGHT))
    if not 0.0 <= weight <= 1.0:
        raise DatasetLayoutError(f"{path / 'dataset.json'}: ensemble_weight={weight}: expected a value in [0, 1]")
    splits = layout.splits()
    if not splits:
        raise DatasetLayoutError(f"{path}: {layout.describe()} without any split.\n{EXPECTED}")
    return CustomDataset(path, layout, tuple(layout.class_names), layout.ignore_value, weight,
                         None if seen is None else tuple(seen), splits)


def class_names_of(path: str | Path) -> tuple[str, ...]:
    """The class list of the dataset folder `path` (without listing its files)."""
    return detect(path).class_names


def split_name(text: str) -> str:
    """A name safe for output folders from a dataset path (its last component)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(text).resolve().name) or "dataset"
