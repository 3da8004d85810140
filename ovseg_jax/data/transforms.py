"""Host-side (numpy/PIL) segmentation transforms: training augmentation (reference 3.1), matcher
targets, and the evaluation resize with bucketed padding (reference 1.1).

All randomness comes from the `np.random.Generator` passed in, which the pipeline derives from
(seed, example position), so a run is reproducible example by example.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np
from PIL import Image

from ovseg_jax.utils.image_ops import interpolation_matrix

# MaskFormer's MIN_SIZE_TRAIN: int(640 * x / 10) for x in 5..20 (0.5x-2.0x of 640).
TRAIN_SCALES = tuple(range(320, 1281, 64))
IMAGE_PAD = 128


def resized_hw(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    """detectron2 ResizeShortestEdge: short side -> `short`, long side capped at `max_size`,
    each side rounded with int(x + 0.5)."""
    scale = short / min(h, w)
    nh, nw = h * scale, w * scale
    if max(nh, nw) > max_size:
        scale = max_size / max(nh, nw)
        nh, nw = nh * scale, nw * scale
    return int(nh + 0.5), int(nw + 0.5)


def resize_image(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """uint8 `[H, W, 3]` -> `[h, w, 3]`, PIL bilinear (antialiased when downscaling), as detectron2."""
    if image.shape[:2] == tuple(hw):
        return image
    return np.asarray(Image.fromarray(image).resize((hw[1], hw[0]), Image.BILINEAR))


def _nearest_index(in_size: int, out_size: int) -> np.ndarray:
    """Source index of each of `out_size` samples under torch's legacy nearest resize."""
    return np.argmax(interpolation_matrix(in_size, out_size, "nearest"), axis=1)


def resize_label(label: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """int32 `[H, W]` -> `[h, w]` with torch's legacy nearest (source index floor(dst * in / out)).

    MaskFormer's dataset mapper reads labels as float64, so detectron2's `ResizeTransform` resizes
    them with `F.interpolate(mode="nearest")`, not PIL's centred nearest used for uint8 images."""
    if label.shape == tuple(hw):
        return label
    rows, cols = _nearest_index(label.shape[0], hw[0]), _nearest_index(label.shape[1], hw[1])
    return label[rows[:, None], cols[None, :]].astype(np.int32)


def _resized_crop(image: np.ndarray, label: np.ndarray, hw: tuple[int, int], window: tuple[int, int, int, int]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The window `(y0, x0, h, w)` of `resize_image(image, hw)` and `resize_label(label, hw)`, without
    materialising the rest of the resized arrays (only the label's crop is gathered, and the image's
    crop is taken before leaving PIL)."""
    y0, x0, ch, cw = window
    if image.shape[:2] == tuple(hw):
        image = image[y0:y0 + ch, x0:x0 + cw]
    else:
        resized = Image.fromarray(image).resize((hw[1], hw[0]), Image.BILINEAR)
        image = np.asarray(resized.crop((x0, y0, x0 + cw, y0 + ch)))
    rows = _nearest_index(label.shape[0], hw[0])[y0:y0 + ch]
    cols = _nearest_index(label.shape[1], hw[1])[x0:x0 + cw]
    return image, label[rows[:, None], cols[None, :]].astype(np.int32)


# --- SSD photometric distortion (MaskFormer's ColorAugSSDTransform) on OpenCV's 8-bit HSV ---
#
# The conversions are float32 formulas of a few small integers per pixel (the hue of the maximum
# channel, the difference of the other two and the spread; the spread and the maximum for the
# saturation; hue and saturation for the three RGB factors). The formulas are evaluated once over
# every value of those integers into tables and each pixel does lookups: bit-identical to
# evaluating the same float32 formulas per pixel, about 3x faster.

@functools.cache
def _rgb_to_hsv_tables() -> tuple[np.ndarray, np.ndarray]:
    """-> (hue uint8 `[3 * 511 * 256]` indexed by (max channel r/g/b, numerator + 255, spread),
    saturation uint8 `[256 * 256]` indexed by (spread, max))."""
    num = np.arange(-255, 256, dtype=np.float32)[:, None]  # g - b, b - r or r - g
    diff = np.arange(256, dtype=np.float32)[None, :]  # max - min
    d = np.maximum(diff, 1e-6)
    h = np.stack([60.0 * num / d, 120.0 + 60.0 * num / d, 240.0 + 60.0 * num / d])
    h = np.where(diff == 0, 0.0, np.mod(h, 360.0))
    hue = np.mod(np.rint(h / 2.0), 180.0).astype(np.uint8)
    v = np.arange(256, dtype=np.float32)[None, :]
    sat = np.rint(np.where(v > 0, diff.T * 255.0 / np.maximum(v, 1), 0.0)).astype(np.uint8)
    return hue.ravel(), sat.ravel()


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB `[..., 3]` -> uint8 HSV as OpenCV's 8-bit conversion: H in [0, 180), S, V in [0, 255]."""
    hue, sat = _rgb_to_hsv_tables()
    r, g, b = (rgb[..., i].astype(np.int32) for i in range(3))
    v = np.maximum(np.maximum(r, g), b)  # (reductions over a length-3 axis are slow in numpy)
    diff = v - np.minimum(np.minimum(r, g), b)
    # The maximum channel (ties: red, then green, as the reference formula) and its numerator, as
    # one table row: red (g - b), green (b - r) + 511, blue (r - g) + 1022.
    is_r = v == r
    is_g = ~is_r & (v == g)
    is_b = ~(is_r | is_g)
    row = is_r * (g - b) + is_g * (b - r + 511) + is_b * (r - g + 1022) + 255
    out = np.empty(rgb.shape, np.uint8)
    out[..., 0] = hue[row * 256 + diff]
    out[..., 1] = sat[diff * 256 + v]
    out[..., 2] = v
    return out


@functools.cache
def _hsv_to_rgb_factors() -> np.ndarray:
    """float32 `[3, 256 * 256]`: per RGB channel, the factor of V for each (H, S): 1 (V itself),
    1 - s, 1 - s f or 1 - s (1 - f) by the hue's sector."""
    h = np.arange(256, dtype=np.float32)[:, None] * 2.0 / 60.0
    s = np.arange(256, dtype=np.float32)[None, :] / 255.0
    sector = np.floor(h)
    f = h - sector
    sector = np.broadcast_to(sector.astype(np.int32) % 6, (256, 256))
    one = np.ones((256, 256), np.float32)
    p, q, t = 1 - s * one, 1 - s * f, 1 - s * (1 - f)
    rgb = [np.choose(sector, (one, q, p, p, t, one)), np.choose(sector, (t, one, one, q, p, p)),
           np.choose(sector, (p, p, t, one, one, q))]
    return np.stack(rgb).reshape(3, -1)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """uint8 OpenCV HSV `[..., 3]` -> uint8 RGB."""
    factors = _hsv_to_rgb_factors()
    index = hsv[..., 0].astype(np.int32) * 256 + hsv[..., 1]
    v = hsv[..., 2].astype(np.float32) / 255.0
    out = np.empty(hsv.shape, np.uint8)
    for c in range(3):
        out[..., c] = np.clip(np.rint(v * factors[c][index] * 255.0), 0, 255)
    return out


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)  # truncates, as the original


def photometric_distort(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """SSD colour jitter: brightness +-32 (p 0.5), then contrast->saturation->hue or
    saturation->hue->contrast (equal chance), each p 0.5; contrast/saturation x U(0.5, 1.5), hue
    +U{-18..18} on the 0-180 scale. Brightness and contrast act on all channels alike, and HSV does
    not depend on the channel order, so working in RGB equals the original's BGR."""
    if rng.integers(2):
        image = _convert(image, beta=rng.uniform(-32, 32))

    def contrast(img):
        return _convert(img, alpha=rng.uniform(0.5, 1.5)) if rng.integers(2) else img

    def saturation(img):
        if not rng.integers(2):
            return img
        hsv = rgb_to_hsv(img)
        hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(0.5, 1.5))
        return hsv_to_rgb(hsv)

    def hue(img):
        if not rng.integers(2):
            return img
        hsv = rgb_to_hsv(img)
        hsv[..., 0] = (hsv[..., 0].astype(np.int32) + rng.integers(-18, 19)) % 180
        return hsv_to_rgb(hsv)

    order = (contrast, saturation, hue) if rng.integers(2) else (saturation, hue, contrast)
    for op in order:
        image = op(image)
    return image


# --- targets ---

def class_targets(label: np.ndarray, max_masks: int, ignore_value: int) -> dict[str, np.ndarray]:
    """int32 `[H, W]` -> the classes present (ignore excluded), sorted, padded to `max_masks`:
    `{"classes": int32 [G], "valid": bool [G]}` (padding: class 0). With more classes than
    `max_masks`, the largest `max_masks` by area are kept."""
    ids, counts = np.unique(label, return_counts=True)
    keep = ids != ignore_value
    ids, counts = ids[keep], counts[keep]
    if ids.size > max_masks:
        ids = np.sort(ids[np.argsort(-counts, kind="stable")[:max_masks]])
    classes = np.zeros(max_masks, np.int32)
    classes[:ids.size] = ids
    return {"classes": classes, "valid": np.arange(max_masks) < ids.size}


def masks_of(label: np.ndarray, classes: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Binary masks of `classes`: label int `[..., H, W]`, classes `[..., G]`, valid bool `[..., G]`
    -> uint8 `[..., G, H, W]` (1 where the label is the class; padding entries empty). Works on one
    example or a batch."""
    masks = np.zeros((*classes.shape, *label.shape[-2:]), np.uint8)
    flat_masks, flat_labels = masks.reshape(-1, *label.shape[-2:]), label.reshape(-1, *label.shape[-2:])
    num_masks = classes.shape[-1]
    for i in np.flatnonzero(valid):  # (only the valid ones: the padding stays zero, never written)
        np.equal(flat_labels[i // num_masks], classes.flat[i], out=flat_masks[i].view(bool))
    return masks


def mask_targets(label: np.ndarray, max_masks: int, ignore_value: int) -> dict[str, np.ndarray]:
    """int32 `[H, W]` -> one binary mask per class present (ignore excluded), padded to `max_masks`:
    `{"masks": uint8 [G, H, W], "classes": int32 [G], "valid": bool [G]}` (padding: class 0, empty).
    With more classes than `max_masks`, the largest `max_masks` by area are kept."""
    targets = class_targets(label, max_masks, ignore_value)
    return {"masks": masks_of(label, targets["classes"], targets["valid"]), **targets}


# --- full transforms ---

def train_transform(example: dict, rng: np.random.Generator, *, crop_size: int = 640,
                    scales: Sequence[int] = TRAIN_SCALES, max_size: int = 2560, ignore_value: int = 255,
                    max_masks: int = 32, photometric: bool = True, flip: bool = True,
                    masks: bool = True) -> dict[str, np.ndarray]:
    """`{"image" uint8 [H,W,3], "label" int32 [H,W]}` -> the segmentation training example
    `{"image": uint8 [S,S,3] (pad 128), "label": int32 [S,S] (pad ignore), "masks": uint8 [G,S,S],
    "classes": int32 [G], "valid": bool [G]}` with S = crop_size (reference 3.1). `masks=False`
    leaves out "masks" (`masks_of(label, classes, valid)` rebuilds them, e.g. after batching)."""
    image, label = example["image"], example["label"]
    hw = resized_hw(*label.shape, int(scales[rng.integers(len(scales))]), max_size)
    ch, cw = min(crop_size, hw[0]), min(crop_size, hw[1])
    y0, x0 = int(rng.integers(hw[0] - ch + 1)), int(rng.integers(hw[1] - cw + 1))
    image, label = _resized_crop(image, label, hw, (y0, x0, ch, cw))
    if photometric:
        image = photometric_distort(image, rng)
    if flip and rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    out_image = np.full((crop_size, crop_size, 3), IMAGE_PAD, np.uint8)
    out_label = np.full((crop_size, crop_size), ignore_value, np.int32)
    out_image[:ch, :cw], out_label[:ch, :cw] = image, label
    targets = mask_targets if masks else class_targets
    return {"image": out_image, "label": out_label, **targets(out_label, max_masks, ignore_value)}


def bucket_size(n: int, divisibility: int = 32, bucket: int = 128) -> int:
    """Pad length for a side of `n`: the next multiple of `bucket` (itself a multiple of `divisibility`)."""
    if bucket % divisibility:
        raise ValueError(f"bucket={bucket} must be a multiple of size_divisibility={divisibility}")
    return int(math.ceil(n / bucket) * bucket)


def eval_transform(example: dict, *, short: int = 640, max_size: int = 2560, divisibility: int = 32,
                   bucket: int = 128) -> dict[str, np.ndarray]:
    """Reference 1.1: resize (short side `short`, long side <= `max_size`, PIL bilinear) and pad
    bottom/right with 0 to a multiple of `bucket` per side, so that at most
    `2 * ceil((max_size - short) / bucket + 1)` padded shapes occur -> `{"image": uint8 [H', W', 3],
    "label": int32 [H, W] (original), "orig_size": int32 [2], "resized_size": int32 [2]}`."""
    image, label = example["image"], example["label"]
    hw = resized_hw(*image.shape[:2], short, max_size)
    resized = resize_image(image, hw)
    padded = np.zeros((bucket_size(hw[0], divisibility, bucket), bucket_size(hw[1], divisibility, bucket), 3), np.uint8)
    padded[:hw[0], :hw[1]] = resized
    return {"image": padded, "label": label, "orig_size": np.array(image.shape[:2], np.int32),
            "resized_size": np.array(hw, np.int32)}
