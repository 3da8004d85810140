"""Datasets of the TFDS catalog, read by random access (ArrayRecord) without TensorFlow.

Both sources are grain random-access sources (`len`, `source[i]`) over a dataset that
`tfds build NAME --file_format=array_record` prepared under `data_dir` (default: TFDS's,
`~/tensorflow_datasets` or `$TFDS_DATA_DIR`). Preparing needs TensorFlow once; reading does not:
the prepared `features.json` / `dataset_info.json` rebuild the dataset without its builder code.

`TfdsSegmentationSource(name, split, data_dir=None)` has `SegmentationSource`'s interface:
`source[i] -> {"image": uint8 [H, W, 3] RGB, "label": int32 [H, W]}`, `.class_names`,
`.ignore_value`; bad examples raise `BadExampleError`. Splits are named as in the registry
("train", "val"); a TFDS split string (`"test[:100]"`) is passed through. Datasets:

- `scene_parse150` (version 1.0.0; "train" 20,210 images, "val" = TFDS "test", ADE20K's 2,000
  validation images). Caution: TFDS builds it from the Places Challenge 2017 *instance* annotations
  (`annotations_instance/`), not the A-150 semantic maps: the annotation's red channel is one of 100
  thing categories (0 = unlabelled) and its green channel an instance id; stuff (wall, floor, sky,
  ...) and 15 thing classes of A-150 are never labelled. Labels are prepared as A-150's rule on the
  ADE-150 id of each category: category k -> `INSTANCE_TO_ADE150[k - 1]` (0-based ADE-150 id), 0 ->
  255 (ignore). Class names are the registry's 150 ADE-150 names, so ids agree with `ade20k_150`,
  but a score on this source is a things-only score, not the A-150 benchmark number (that needs
  ADEChallengeData2016's `annotations/`, the `ade20k_150` folder layout).

`TfdsCaptionSource(split="val", data_dir=None)` reads `coco_captions` (COCO 2014 images with the
Karpathy splits "train" 82,783, "val" 5,000, "test" 5,000, "restval" 30,504; version 1.1.0):
`source[i] -> {"image": uint8 [H, W, 3] RGB, "captions": list[str] (the image's captions in TFDS
order, UTF-8 decoded, as written by the annotators; usually 5), "id": str (the COCO image id in
decimal, e.g. "391895"), "filename": str (the COCO file name, e.g.
"COCO_val2014_000000391895.jpg")}`. A record that cannot be read or decoded raises
`BadExampleError` naming the dataset, split and index.

Without tensorflow-datasets installed both raise ImportError naming the `tfds` extra; a dataset not
prepared (or prepared as TFRecord, which has no random access) raises `DatasetLayoutError` with the
command that prepares it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from ovseg_jax.data.classes import class_names as registry_class_names
from ovseg_jax.data.sources import BadExampleError, DatasetLayoutError

IGNORE = 255

# 0-based ADE-150 id of each of the 100 instance categories of the Places Challenge 2017 annotations
# (instanceInfo100 order): the names of instanceInfo100 matched to objectInfo150, equal to the 100
# "thing" classes of ADE-150 in increasing order (Mask2Former's panoptic ADE-150 metadata).
INSTANCE_TO_ADE150 = np.array([
    7, 8, 10, 12, 14, 15, 18, 19, 20, 22, 23, 24, 27, 30, 31, 32, 33, 35, 36, 37, 38, 39, 41, 42, 43,
    44, 45, 47, 49, 50, 53, 55, 56, 57, 58, 62, 64, 65, 66, 67, 69, 70, 71, 72, 73, 74, 75, 76, 78,
    80, 81, 82, 83, 85, 86, 87, 88, 89, 90, 92, 93, 95, 97, 98, 102, 103, 104, 107, 108, 110, 111, 112,
    115, 116, 118, 119, 120, 121, 123, 124, 125, 126, 127, 129, 130, 132, 133, 134, 135, 136, 137, 138,
    139, 142, 143, 144, 146, 147, 148, 149], np.int32)


def _import_tfds():
    try:
        import tensorflow_datasets  # noqa: PLC0415  (optional dependency)
    except ImportError as e:
        raise ImportError(f"reading TFDS datasets needs tensorflow-datasets ({e}); install the extra: "
                          "pip install 'ovseg_jax[tfds]' (TensorFlow is not needed to read)") from None
    return tensorflow_datasets


def _data_dir(tfds, data_dir) -> Path:
    return Path(data_dir if data_dir else tfds.core.constants.DATA_DIR).expanduser()


def _layout_error(name: str, version: str, root: Path, error: BaseException) -> DatasetLayoutError:
    """Why `name` cannot be read from `root`: not prepared, another version, or not ArrayRecord."""
    found = []
    for info in sorted((root / name).glob("**/dataset_info.json")) if (root / name).is_dir() else []:
        try:
            file_format = json.loads(info.read_text()).get("fileFormat", "tfrecord")
        except (OSError, ValueError):
            file_format = "unreadable dataset_info.json"
        found.append(f"{info.parent} ({file_format})")
    what = (f"found only {', '.join(found)}" if found else f"nothing under {root / name}")
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return DatasetLayoutError(
        f"TFDS dataset {name} {version} is not prepared as array_record in {root} ({what}). Reading needs "
        f"{root}/{name}/[config/]{version}/ with dataset_info.json, features.json and *.array_record-* "
        f"files. Prepare it once where TensorFlow is installed:\n  tfds build {name} --data_dir={root} "
        f"--file_format=array_record\n(TFDS said: {type(error).__name__}: {reason})")


def _open(name: str, version: str, split: str, data_dir) -> Any:
    """`tfds.data_source` of a prepared dataset, read from its files (no builder code, no TensorFlow)."""
    tfds = _import_tfds()
    root = _data_dir(tfds, data_dir)
    try:
        return tfds.data_source(name, split=split, data_dir=None if data_dir is None else str(root),
                                download=False, builder_kwargs={"version": version})
    except ValueError as e:
        if "Unknown split" not in str(e):
            raise
        raise ValueError(f"TFDS {name} {version} in {root}: {e}") from None
    # Not prepared: TFDS falls back to the builder code, which fails on needing TensorFlow
    # (ImportError), the TFRecord default (NotImplementedError) or another version (AssertionError).
    except (ImportError, NotImplementedError, AssertionError, FileNotFoundError) as e:
        raise _layout_error(name, version, root, e) from None


class _TfdsSource:
    """Shared part: the open TFDS data source, its length and guarded record reads."""

    def __init__(self, name: str, version: str, split: str, data_dir):
        self.name, self.version, self.split = name, version, split
        self._records = _open(name, version, split, data_dir)

    def __len__(self) -> int:
        return len(self._records)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name} {self.version}, split {self.split!r}, {len(self)} examples)"

    def _where(self, index: int) -> str:
        return f"TFDS {self.name} {self.version} split {self.split!r} example {index}"

    def _record(self, index: int) -> dict:
        index = range(len(self))[index]  # IndexError past the end, negative indices as lists
        try:
            return self._records[index]
        except Exception as e:  # ArrayRecord read or image decode failure
            raise BadExampleError(f"{self._where(index)}: cannot be read ({type(e).__name__}: {e})") from None

    def _image(self, index: int, value, key: str = "image") -> np.ndarray:
        image = np.asarray(value)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3 or 0 in image.shape:
            raise BadExampleError(f"{self._where(index)}: {key!r} is {image.dtype} {list(image.shape)}; "
                                  "expected uint8 [H, W, 3]")
        return image


def _ade150_from_instances(annotation: np.ndarray) -> np.ndarray:
    """scene_parse150 `annotation` uint8 [H, W, 3] (red: category 0..100) -> int32 [H, W] ADE-150 ids, 0 -> 255."""
    lookup = np.full(256, IGNORE, np.int32)
    lookup[1:1 + len(INSTANCE_TO_ADE150)] = INSTANCE_TO_ADE150
    return lookup[annotation[..., 0]]


@dataclasses.dataclass(frozen=True)
class _Segmentation:
    version: str
    splits: dict  # registry split name -> TFDS split name
    classes: str  # registry class list
    num_raw: int  # raw category ids are 0..num_raw (0 = unlabelled)


SEGMENTATION = {"scene_parse150": _Segmentation("1.0.0", {"train": "train", "val": "test"}, "ade20k_150", 100)}


class TfdsSegmentationSource(_TfdsSource):
    """`source[i] -> {"image": uint8 [H, W, 3], "label": int32 [H, W]}` from a TFDS segmentation
    dataset (see the module docstring for each dataset's label preparation)."""

    def __init__(self, name: str = "scene_parse150", split: str = "val", data_dir: str | Path | None = None):
        if name not in SEGMENTATION:
            raise ValueError(f"TFDS segmentation dataset {name!r} unknown; expected one of {sorted(SEGMENTATION)}")
        spec = SEGMENTATION[name]
        super().__init__(name, spec.version, spec.splits.get(split, split), data_dir)
        self._num_raw = spec.num_raw
        self.class_names = registry_class_names(spec.classes)
        self.ignore_value = IGNORE

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        record = self._record(index)
        image = self._image(index, record["image"])
        annotation = self._image(index, record["annotation"], "annotation")
        if annotation.shape != image.shape:
            raise BadExampleError(f"{self._where(index)}: annotation size {annotation.shape[1]}x{annotation.shape[0]} "
                                  f"(WxH) differs from the image's {image.shape[1]}x{image.shape[0]}")
        bad = annotation[..., 0] > self._num_raw
        if bad.any():
            raise BadExampleError(f"{self._where(index)}: annotation categories "
                                  f"{np.unique(annotation[..., 0][bad])[:8].tolist()} outside 0..{self._num_raw}")
        return {"image": image, "label": _ade150_from_instances(annotation)}


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TfdsCaptionSource(_TfdsSource):
    """`source[i] -> {"image": uint8 [H, W, 3], "captions": [str, ...], "id": str, "filename": str}`
    from TFDS `coco_captions` (COCO 2014, Karpathy splits "train", "val", "test", "restval")."""

    def __init__(self, split: str = "val", data_dir: str | Path | None = None):
        super().__init__("coco_captions", "1.1.0", split, data_dir)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._record(index)
        try:
            captions = [_text(t) for t in record["captions"]["text"]]
            image_id, filename = str(int(record["image/id"])), _text(record["image/filename"])
        except (KeyError, TypeError, ValueError) as e:  # (UnicodeDecodeError is a ValueError)
            raise BadExampleError(f"{self._where(index)}: bad caption record ({type(e).__name__}: {e}); expected "
                                  "'captions'/'text', 'image/id' and 'image/filename'") from None
        return {"image": self._image(index, record["image"]), "captions": captions, "id": image_id,
                "filename": filename}
