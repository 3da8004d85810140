"""Mask-category pairs for CLIP adaptation (reference 1.8, 4.2-4.3): readers and the crop transform.

Two on-disk formats:
- the original's released CSV: tab-separated with a header `filepath<TAB>title`; each file is an
  already masked crop (background filled with the CLIP mean colour); paths relative to the CSV.
- our JSON lines: `{"image": path, "mask": PNG path (nonzero = region) or COCO RLE
  {"size": [H, W], "counts": list | str}, "noun": str, "source": str}`; paths relative to the file.

`pair_example` turns a record into `{"image": float32 [S, S, 3] CLIP-normalised, "region_mask":
float32 [S, S] 0/1, "text": str}`: crop to the mask's box, fill the background with 255 x CLIP
mean, RandomResizedCrop (scale 0.9-1.0, ratio 3/4-4/3, PIL bicubic), CLIP normalisation. The
region mask goes through the same crop with nearest resampling, so it is exact, not recovered
from colours after resampling (reference 4.3's pitfall). Released crops carry no mask: theirs is
recovered once, before any resampling, as the pixels not within 1.5 of the fill colour.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from ovseg_jax.data.sources import BadExampleError, DatasetLayoutError, read_image, read_label
from ovseg_jax.inference.masked_crops import CLIP_FILL, CLIP_MEAN, CLIP_STD

FILL_UINT8 = np.array([round(c) for c in CLIP_FILL], np.uint8)  # (123, 117, 104)
_MEAN = np.array(CLIP_MEAN, np.float32)
_STD = np.array(CLIP_STD, np.float32)


class PairRecord(NamedTuple):
    """One pair: the image file, its region (None: a pre-masked crop; a PNG path; a COCO RLE dict)
    and the text (the released `title` as is, or our `noun`)."""
    image: str
    mask: str | dict | None
    text: str


def rle_encode(mask: np.ndarray) -> dict:
    """bool `[H, W]` -> uncompressed COCO RLE `{"size": [H, W], "counts": [int, ...]}` (column-major,
    counts start with a run of zeros)."""
    flat = np.asarray(mask, bool).ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def _compressed_counts(text: str) -> list[int]:
    """Decode pycocotools' compressed RLE string (6-bit chunks, delta-coded from the 3rd count)."""
    counts: list[int] = []
    pos = 0
    while pos < len(text):
        value, shift, more = 0, 0, True
        while more:
            c = ord(text[pos]) - 48
            value |= (c & 0x1F) << (5 * shift)
            more = bool(c & 0x20)
            pos += 1
            shift += 1
            if not more and c & 0x10:
                value |= -1 << (5 * shift)
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def rle_decode(rle: dict, where: str = "RLE", shape: tuple[int, int] | None = None) -> np.ndarray:
    """COCO RLE (uncompressed list or compressed string counts) -> bool `[H, W]`; with `shape`, an RLE
    of another size is refused before anything is allocated."""
    try:
        h, w = (int(v) for v in rle["size"])
        counts = rle["counts"]
        if shape is None or (h, w) == tuple(shape):
            counts = _compressed_counts(counts) if isinstance(counts, str) else [int(c) for c in counts]
    except (KeyError, TypeError, ValueError) as e:
        raise BadExampleError(f"{where}: bad COCO RLE ({e!r}); expected {{'size': [H, W], 'counts': "
                              "list of ints or compressed string}") from e
    if shape is not None and (h, w) != tuple(shape):
        raise BadExampleError(f"{where}: RLE size {[h, w]} differs from the image size {list(shape)}")
    if sum(counts) != h * w or min(counts, default=0) < 0:
        raise BadExampleError(f"{where}: RLE counts sum to {sum(counts)}, expected H*W = {h * w}")
    values = np.zeros(len(counts), bool)
    values[1::2] = True
    return np.repeat(values, counts).reshape((h, w), order="F")


def read_pairs(path: str | Path) -> list[PairRecord]:
    """Records of a released `.csv` (tab-separated filepath/title) or our `.jsonl` pairs file."""
    path = Path(path)
    if not path.is_file():
        raise DatasetLayoutError(f"{path}: pairs file not found; expected the released tab-separated CSV "
                                 "(header 'filepath<TAB>title') or our JSON-lines pairs")
    base = path.parent
    records = []
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a text file ({e}); expected the released tab-separated CSV or our JSON-lines "
                         "pairs") from None
    if path.suffix == ".jsonl":
        for line_no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                mask = row["mask"]
                mask = str(base / mask) if isinstance(mask, str) else dict(mask)
                records.append(PairRecord(str(base / row["image"]), mask, str(row["noun"])))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{line_no}: bad pairs line ({e!r}); expected JSON with keys "
                                 "'image', 'mask' (PNG path or COCO RLE), 'noun', 'source'") from e
    else:
        with io.StringIO(text, newline="") as f:
            reader = csv.DictReader(f, delimiter="\t")
            if not reader.fieldnames or not {"filepath", "title"} <= set(reader.fieldnames):
                raise ValueError(f"{path}: header {reader.fieldnames}; expected tab-separated columns "
                                 "'filepath' and 'title'")
            for row in reader:
                records.append(PairRecord(str(base / row["filepath"]), None, row["title"]))
    if not records:
        raise DatasetLayoutError(f"{path}: no pairs in the file")
    return records


def region_of(record: PairRecord) -> tuple[np.ndarray, np.ndarray]:
    """Load a record -> (masked crop uint8 `[h, w, 3]` with the fill outside, region bool `[h, w]`)."""
    image = read_image(record.image)
    if record.mask is None:  # a released, already masked crop
        region = np.abs(image.astype(np.float32) - np.array(CLIP_FILL, np.float32)).max(-1) > 1.5
        if not region.any():
            raise BadExampleError(f"{record.image}: every pixel has the fill colour; expected a masked crop")
        return image, region
    if isinstance(record.mask, str):
        region = read_label(record.mask) != 0
        where = record.mask
    else:
        region = rle_decode(record.mask, where=f"mask of {record.image}", shape=image.shape[:2])
        where = f"RLE mask of {record.image}"
    if region.shape != image.shape[:2]:
        raise BadExampleError(f"{where}: mask size {region.shape} differs from the image size "
                              f"{image.shape[:2]} of {record.image}")
    ys, xs = np.nonzero(region)
    if ys.size == 0:
        raise BadExampleError(f"{where}: empty mask; expected at least one region pixel")
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop, region = image[y0:y1, x0:x1], region[y0:y1, x0:x1]
    return np.where(region[..., None], crop, FILL_UINT8), region


def random_resized_crop_box(rng: np.random.Generator, h: int, w: int, scale=(0.9, 1.0),
                            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision `RandomResizedCrop.get_params` -> (top, left, height, width)."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def resized_crop(image: np.ndarray, region: np.ndarray | None, rng: np.random.Generator, size: int,
                 scale=(0.9, 1.0)) -> tuple[np.ndarray, np.ndarray | None]:
    """RandomResizedCrop of uint8 `[h, w, 3]` (PIL bicubic) and its bool region (PIL nearest, the
    same window) -> (float32 `[S, S, 3]` CLIP-normalised, float32 `[S, S]` 0/1 or None)."""
    top, left, ch, cw = random_resized_crop_box(rng, image.shape[0], image.shape[1], scale)
    window = np.s_[top:top + ch, left:left + cw]
    out = np.asarray(Image.fromarray(image[window]).resize((size, size), Image.BICUBIC), np.float32)
    out = (out / 255.0 - _MEAN) / _STD
    if region is None:
        return out, None
    mask = Image.fromarray(region[window].astype(np.uint8)).resize((size, size), Image.NEAREST)
    return out, np.asarray(mask, np.float32)


def pair_example(record: PairRecord, rng: np.random.Generator, size: int = 224) -> dict:
    """A pair record -> `{"image": f32 [S,S,3], "region_mask": f32 [S,S], "text": str}`."""
    crop, region = region_of(record)
    image, mask = resized_crop(crop, region, rng, size)
    return {"image": image, "region_mask": mask, "text": record.text}
