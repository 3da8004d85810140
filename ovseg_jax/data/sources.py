"""Random-access segmentation sources: image + label files paired by file name stem.

`SegmentationSource(image_dir, label_dir, ...)[i] -> {"image": uint8 [H, W, 3] RGB,
"label": int32 [H, W]}` with class ids `0..C-1` and the dataset's ignore value. Images are decoded
with PIL (EXIF orientation applied, as detectron2's `read_image`; 16-bit images keep their high
byte); labels are single-channel 8/16-bit PNG or 16-bit TIFF read as stored, optionally remapped by
`label_map`. File extensions match in any case (`.JPG`, `.PNG`).

`index_by="image"`: every image must have a label (ADE); `index_by="label"`: the label folder
lists the examples (COCO-Stuff and VOC skip all-ignore labels, Pascal Context labels 5K of
`JPEGImages`). Bad input raises `BadExampleError` (one example) or `DatasetLayoutError` (missing
or empty folders), naming the file and what was expected.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


class DatasetLayoutError(FileNotFoundError):
    """A dataset folder or list file is missing, empty or misnamed; the message gives the layout."""


class BadExampleError(ValueError):
    """One example cannot be used (unreadable, missing partner file, size mismatch, bad label values)."""


_GRAY16 = ("I;16", "I;16B", "I;16L", "I;16N")


def _rgb_uint8(img: Image.Image, path) -> np.ndarray:
    """A decoded PIL image -> uint8 `[H, W, 3]`. 16-bit images keep their high byte (v >> 8): PIL
    does so itself for 16-bit RGB(A) PNGs, and we do the same for 16-bit grayscale, which PIL's
    `convert("RGB")` would clip to white."""
    if img.mode in _GRAY16 or img.mode == "I":  # "I": how older Pillow opens 16-bit grayscale PNGs
        gray = np.asarray(img).astype(np.int64)
        if gray.size and (gray.min() < 0 or gray.max() > 65535):
            raise BadExampleError(f"{path}: 32-bit integer image (values {gray.min()}..{gray.max()}); expected an "
                                  "8-bit or 16-bit RGB or grayscale image")
        return np.repeat((gray >> 8).astype(np.uint8)[..., None], 3, axis=-1)
    if img.mode == "F":
        raise BadExampleError(f"{path}: floating-point image (PIL mode 'F'); expected an 8-bit or 16-bit RGB or "
                              "grayscale image")
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def read_image(path: str | Path) -> np.ndarray:
    """Image file -> uint8 `[H, W, 3]` RGB (EXIF orientation applied; 16-bit images reduced to their
    high byte; alpha dropped, as PIL's `convert("RGB")`)."""
    try:
        with Image.open(path) as img:
            return _rgb_uint8(ImageOps.exif_transpose(img), path)
    except FileNotFoundError:
        raise BadExampleError(f"{path}: image file not found") from None
    except BadExampleError:
        raise
    except Exception as e:  # PIL raises several types for corrupt or truncated files
        raise BadExampleError(f"{path}: cannot decode image ({type(e).__name__}: {e}); "
                              "expected a readable JPEG/PNG") from None


def read_label(path: str | Path) -> np.ndarray:
    """Label map (single-channel 8-bit PNG or 16-bit TIFF, values as stored) -> int32 `[H, W]`."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise BadExampleError(f"{path}: label map has PIL mode {img.mode!r}; expected a "
                                      "single-channel 8-bit PNG or 16-bit TIFF of class ids")
            return np.asarray(img).astype(np.int32)
    except FileNotFoundError:
        raise BadExampleError(f"{path}: label file not found") from None
    except BadExampleError:
        raise
    except Exception as e:
        raise BadExampleError(f"{path}: cannot decode label map ({type(e).__name__}: {e})") from None


def _stems(directory: Path, ext: str) -> dict[str, Path]:
    """`{stem: path}` of the files in `directory` whose extension is `ext` in any case (`.JPG` too)."""
    with os.scandir(directory) as entries:
        names = sorted(e.name for e in entries if e.is_file() and os.path.splitext(e.name)[1].lower() == ext.lower())
    return {os.path.splitext(n)[0]: directory / n for n in names}


class SegmentationSource:
    """grain random-access source over `image_dir/<stem><image_ext>` + `label_dir/<stem><label_ext>`."""

    def __init__(self, image_dir: str | Path, label_dir: str | Path, *, class_names, ignore_value: int,
                 image_ext: str = ".jpg", label_ext: str = ".png", index_by: str = "image", layout: str = "",
                 label_map: np.ndarray | None = None):
        image_dir, label_dir = Path(image_dir), Path(label_dir)
        where = f"\nExpected layout:\n{layout}" if layout else ""
        for d in (image_dir, label_dir):
            if not d.is_dir():
                raise DatasetLayoutError(f"{d}: folder not found.{where}")
        if index_by not in ("image", "label"):
            raise ValueError(f"index_by must be 'image' or 'label', got {index_by!r}")
        # Both folders are listed, so `a.JPG` pairs with `a.png`; a missing partner keeps its expected name.
        images, labels = _stems(image_dir, image_ext), _stems(label_dir, label_ext)
        listed, ext, stems = ((image_dir, image_ext, sorted(images)) if index_by == "image"
                              else (label_dir, label_ext, sorted(labels)))
        if not stems:
            raise DatasetLayoutError(f"{listed}: no *{ext} files (any case).{where}")
        self.image_paths = [str(images.get(s, image_dir / f"{s}{image_ext}")) for s in stems]
        self.label_paths = [str(labels.get(s, label_dir / f"{s}{label_ext}")) for s in stems]
        self.class_names = tuple(class_names)
        self.ignore_value = int(ignore_value)
        self.label_map = None if label_map is None else np.asarray(label_map, np.int32)

    def __len__(self) -> int:
        return len(self.image_paths)

    def __repr__(self) -> str:
        return f"SegmentationSource({len(self)} examples, {len(self.class_names)} classes)"

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        image_path, label_path = self.image_paths[index], self.label_paths[index]
        if not Path(label_path).is_file():
            raise BadExampleError(f"{label_path}: label file not found (for image {image_path})")
        if not Path(image_path).is_file():
            raise BadExampleError(f"{image_path}: image file not found (for label {label_path})")
        image, label = read_image(image_path), read_label(label_path)
        if image.shape[:2] != label.shape:
            raise BadExampleError(f"{label_path}: label size {label.shape[1]}x{label.shape[0]} (WxH) differs "
                                  f"from image {image_path} size {image.shape[1]}x{image.shape[0]}")
        num_raw = len(self.class_names) if self.label_map is None else len(self.label_map)
        bad = (label != self.ignore_value) & ((label < 0) | (label >= num_raw))
        if bad.any():
            raise BadExampleError(f"{label_path}: label values {np.unique(label[bad])[:8].tolist()} outside "
                                  f"0..{num_raw - 1} (ignore value {self.ignore_value})")
        if self.label_map is not None:
            label = np.where(label == self.ignore_value, self.ignore_value,
                             self.label_map[np.clip(label, 0, num_raw - 1)]).astype(np.int32)
        return {"image": image, "label": label}
