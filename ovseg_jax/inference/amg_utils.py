"""Pieces of SAM's automatic mask generation (segment_anything's `utils/amg.py`), in numpy and JAX.

Host side (numpy, exact integer/float64 arithmetic as the reference): point grids, crop boxes,
uncropping, run-length encodings, small-region removal. Device side (jnp, static shapes, usable
inside `jax.jit`): stability scores, boxes around masks, the crop-edge test and a greedy box NMS
over a fixed number of candidates with validity flags. Boxes are XYXY with inclusive right/bottom
pixel indices (a one-pixel mask at (x, y) has the box (x, y, x, y)), as the reference's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import product
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

# ----------------------------------------------------------------------------------------------
# Point grids and crops (host)


def build_point_grid(n_per_side: int) -> np.ndarray:
    """`[n², 2]` float64 (x, y) points at the centres of an n x n grid of [0, 1]², row by row."""
    offset = 1 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    xs, ys = np.meshgrid(side, side)
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale_per_layer: int) -> list[np.ndarray]:
    """One grid per crop layer 0..n_layers; layer i has int(n_per_side / scale_per_layer**i) points a side."""
    return [build_point_grid(int(n_per_side / scale_per_layer**i)) for i in range(n_layers + 1)]


def generate_crop_boxes(im_size: tuple[int, int], n_layers: int, overlap_ratio: float
                        ) -> tuple[list[list[int]], list[int]]:
    """Image (H, W) -> (crop boxes XYXY in pixels, their layer indices): the whole image, then for
    layer i >= 1 a (2^i x 2^i) grid of overlapping crops (column-major: x outer, y inner)."""
    im_h, im_w = im_size
    boxes, layers = [[0, 0, im_w, im_h]], [0]
    for layer in range(1, n_layers + 1):
        n = 2**layer
        overlap = int(overlap_ratio * min(im_h, im_w) * (2 / n))
        crop_w = math.ceil((overlap * (n - 1) + im_w) / n)
        crop_h = math.ceil((overlap * (n - 1) + im_h) / n)
        for x0, y0 in product([int((crop_w - overlap) * i) for i in range(n)],
                              [int((crop_h - overlap) * i) for i in range(n)]):
            boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layers.append(layer)
    return boxes, layers


def uncrop_boxes_xyxy(boxes, crop_box: Sequence[int]):
    """`[..., 4]` boxes in a crop's frame -> the image's frame (numpy or jnp)."""
    x0, y0 = crop_box[:2]
    return boxes + np.array([x0, y0, x0, y0])


def uncrop_points(points, crop_box: Sequence[int]):
    """`[..., 2]` (x, y) points in a crop's frame -> the image's frame."""
    return points + np.array(crop_box[:2])


def uncrop_masks(masks: np.ndarray, crop_box: Sequence[int], orig_h: int, orig_w: int) -> np.ndarray:
    """`[..., h, w]` masks of a crop -> `[..., orig_h, orig_w]`, zero outside the crop."""
    x0, y0, x1, y1 = crop_box
    if (x0, y0, x1, y1) == (0, 0, orig_w, orig_h):
        return masks
    pad = [(0, 0)] * (masks.ndim - 2) + [(y0, orig_h - y1), (x0, orig_w - x1)]
    return np.pad(masks, pad)


def box_xyxy_to_xywh(box) -> list:
    """One XYXY box -> [x, y, w, h] as Python numbers."""
    x0, y0, x1, y1 = np.asarray(box).tolist()
    return [x0, y0, x1 - x0, y1 - y0]


# ----------------------------------------------------------------------------------------------
# Run-length encodings (host)


def mask_to_rle(masks: np.ndarray) -> list[dict[str, Any]]:
    """bool `[N, H, W]` -> N uncompressed COCO RLEs {"size": [H, W], "counts": [...]}: run lengths of
    the column-major (Fortran-order) pixels, starting with a run of zeros (0 when pixel 0 is set)."""
    n, h, w = masks.shape
    flat = np.ascontiguousarray(masks.transpose(0, 2, 1)).reshape(n, h * w)
    out = []
    for row in flat:
        edges = np.flatnonzero(row[1:] != row[:-1]) + 1
        counts = np.diff(np.concatenate([[0], edges, [h * w]])).tolist()
        out.append({"size": [h, w], "counts": ([0] if h * w and row[0] else []) + counts})
    return out


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """An uncompressed RLE -> bool `[H, W]`."""
    h, w = rle["size"]
    values = np.arange(len(rle["counts"])) % 2 == 1
    return np.repeat(values, rle["counts"]).reshape(w, h).T.copy()


def area_from_rle(rle: dict[str, Any]) -> int:
    """Pixels set in an uncompressed RLE."""
    return int(sum(rle["counts"][1::2]))


def coco_encode(rle: dict[str, Any]) -> dict[str, Any]:
    """An uncompressed RLE -> COCO's compressed RLE {"size": [H, W], "counts": str}, the string
    pycocotools' `frPyObjects` + `rleToString` write (runs as differences to the run two back, 5 bits
    a character from '0', 0x20 flags a continuation), so no pycocotools is needed."""
    counts, chars = rle["counts"], []
    for i, run in enumerate(counts):
        x = run - counts[i - 2] if i > 2 else run
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # arithmetic shift, as C's on a signed long
            more = x != -1 if c & 0x10 else x != 0
            chars.append(chr(c + 48 + (0x20 if more else 0)))
    return {"size": list(rle["size"]), "counts": "".join(chars)}


# ----------------------------------------------------------------------------------------------
# Small regions (host)

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> tuple[np.ndarray, bool]:
    """bool `[H, W]` -> (mask, changed): mode "holes" fills 8-connected background regions smaller
    than `area_thresh` pixels; mode "islands" drops foreground regions smaller than it (keeping the
    largest when all are small). Same as the reference's cv2 `connectedComponentsWithStats(·, 8)`."""
    if mode not in ("holes", "islands"):
        raise ValueError(f"remove_small_regions: mode must be 'holes' or 'islands'; got {mode!r}")
    holes = mode == "holes"
    labels, n = ndimage.label(mask ^ holes, structure=_EIGHT_CONNECTED)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    small = np.flatnonzero(sizes < area_thresh) + 1
    if len(small) == 0:
        return mask, False
    if holes:
        return mask | np.isin(labels, small), True
    large = np.setdiff1d(np.arange(1, n + 1), small)
    if len(large) == 0:
        large = [int(np.argmax(sizes)) + 1]
    return np.isin(labels, large), True


def masks_to_boxes_np(masks: np.ndarray) -> np.ndarray:
    """bool `[N, H, W]` -> int64 `[N, 4]` XYXY boxes (inclusive), [0, 0, 0, 0] for empty masks."""
    rows, cols = masks.any(-1), masks.any(-2)
    h, w = masks.shape[-2:]
    top, left = rows.argmax(-1), cols.argmax(-1)
    bottom, right = h - 1 - rows[:, ::-1].argmax(-1), w - 1 - cols[:, ::-1].argmax(-1)
    boxes = np.stack([left, top, right, bottom], axis=-1).astype(np.int64)
    return boxes * rows.any(-1)[:, None]


# ----------------------------------------------------------------------------------------------
# Device side (jnp)


def calculate_stability_score(mask_logits: jax.Array, mask_threshold: float, threshold_offset: float) -> jax.Array:
    """`[..., H, W]` logits -> `[...]` float32 IoU of the masks thresholded at threshold ± offset
    (the higher one lies inside the lower one: pixel counts suffice; 0/0 gives NaN as the reference)."""
    inter = jnp.sum(mask_logits > mask_threshold + threshold_offset, axis=(-2, -1), dtype=jnp.int32)
    union = jnp.sum(mask_logits > mask_threshold - threshold_offset, axis=(-2, -1), dtype=jnp.int32)
    return inter.astype(jnp.float32) / union.astype(jnp.float32)


def boxes_from_rows_cols(rows: jax.Array, cols: jax.Array) -> jax.Array:
    """`[..., H]` rows and `[..., W]` columns that hold a mask pixel -> int32 `[..., 4]` XYXY boxes
    (inclusive), [0, 0, 0, 0] for empty masks."""
    h, w = rows.shape[-1], cols.shape[-1]
    top, left = jnp.argmax(rows, -1), jnp.argmax(cols, -1)
    bottom, right = h - 1 - jnp.argmax(rows[..., ::-1], -1), w - 1 - jnp.argmax(cols[..., ::-1], -1)
    boxes = jnp.stack([left, top, right, bottom], axis=-1).astype(jnp.int32)
    return boxes * jnp.any(rows, -1, keepdims=True)


def batched_mask_to_box(masks: jax.Array) -> jax.Array:
    """bool `[..., H, W]` -> int32 `[..., 4]` XYXY boxes (inclusive), [0, 0, 0, 0] for empty masks."""
    return boxes_from_rows_cols(jnp.any(masks, -1), jnp.any(masks, -2))


def is_box_near_crop_edge(boxes: jax.Array, crop_box: Sequence[int], orig_box: Sequence[int],
                          atol: float = 20.0) -> jax.Array:
    """`[N, 4]` boxes in the crop's frame -> bool `[N]`: some side lies within `atol` pixels of a crop
    edge that is not also an image edge (such masks are likely cut by the crop)."""
    boxes = (boxes + jnp.asarray([crop_box[0], crop_box[1]] * 2)).astype(jnp.float32)
    near_crop = jnp.abs(boxes - jnp.asarray(crop_box, jnp.float32)) <= atol
    near_image = jnp.abs(boxes - jnp.asarray(orig_box, jnp.float32)) <= atol
    return jnp.any(near_crop & ~near_image, axis=-1)


def float32_floor(value: float) -> np.float32:
    """The largest float32 <= `value`: a float32 x satisfies x > value (compared in float64, as
    torchvision's NMS kernel compares its float IoUs with the double threshold) exactly when
    x > float32_floor(value) in float32 (plain rounding would move 0.3 up to 0.30000001)."""
    rounded = np.float32(value)
    return np.nextafter(rounded, np.float32(-np.inf)) if float(rounded) > value else rounded


def box_nms(boxes: jax.Array, scores: jax.Array, valid: jax.Array, iou_threshold) -> tuple[jax.Array, jax.Array]:
    """Greedy NMS over a fixed budget of candidates, as torchvision's `batched_nms` with one category.

    `[N, 4]` XYXY boxes, `[N]` scores, bool `[N]` validity, float32 threshold -> (int32 `[N]`
    candidate indices, the kept ones first by decreasing score (ties in index order, as
    torchvision's stable sort), int32 count kept). A candidate is dropped when its IoU (float32,
    box areas (x1-x0)(y1-y0)) with a kept higher-ranked one is > `iou_threshold`; pass
    `float32_floor(t)` for torchvision's threshold t. One loop step per kept box, none per candidate."""
    boxes, scores, valid = jnp.asarray(boxes), jnp.asarray(scores), jnp.asarray(valid)
    n = boxes.shape[0]
    key = jnp.where(valid, jnp.where(scores == 0, 0.0, scores.astype(jnp.float32)), -jnp.inf)
    order = jnp.argsort(key, descending=True, stable=True)
    boxes = boxes[order].astype(jnp.float32)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])

    def step(state):
        alive, kept = state
        i = jnp.argmax(alive)  # the best candidate not yet kept or suppressed
        top_left = jnp.maximum(boxes[i, :2], boxes[:, :2])
        bottom_right = jnp.minimum(boxes[i, 2:], boxes[:, 2:])
        inter = jnp.prod(jnp.maximum(bottom_right - top_left, 0.0), axis=-1)
        iou = inter / (area[i] + area - inter)
        return alive & ~(iou > iou_threshold) & (jnp.arange(n) != i), kept.at[i].set(True)

    _, kept = jax.lax.while_loop(lambda s: jnp.any(s[0]), step, (valid[order], jnp.zeros(n, bool)))
    ranked = order[jnp.argsort(~kept, stable=True)]
    return ranked.astype(jnp.int32), jnp.sum(kept, dtype=jnp.int32)
