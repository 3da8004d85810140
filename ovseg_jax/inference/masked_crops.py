"""Masked crops of mask proposals, the input of OVSeg's CLIP branch (reference 1.8), on device.

The original loops over proposals on the host, crops each to its box and resizes it with
`F.interpolate`. Here every proposal is processed with static shapes: its box becomes a pair of
`[size, H]` / `[size, W]` interpolation matrices built from traced box coordinates, so the whole
batch of proposals is one jit-compiled computation with exactly torch's resize semantics.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ovseg_jax.utils.image_ops import window_interpolation_matrix

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # RGB, 0-1 scale
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_FILL = tuple(255.0 * m for m in CLIP_MEAN)  # background fill on the 0-255 scale


class MaskedCrops(NamedTuple):
    images: jax.Array  # [Q, S, S, 3] CLIP-normalised crops (background exactly 0)
    region_masks: jax.Array  # [Q, S, S] float32 0/1, the binary mask resized with legacy nearest
    valid: jax.Array  # [Q] bool, proposals with at least one pixel above the threshold


def mask_boxes(binary: jax.Array, expand_ratio: float = 1.0) -> jax.Array:
    """`[Q, H, W]` bool -> `[Q, 4]` int32 boxes `(left, top, right, bottom)`, end exclusive.

    The tight box `[x_min, y_min, x_max + 1, y_max + 1]` is scaled about its centre by
    `expand_ratio`, truncated to integers and clipped to the image, as the original's
    `expand_box` + `crop_with_mask`. Empty masks get the whole image.
    """
    height, width = binary.shape[-2:]

    def extent(any_along: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
        first = jnp.argmax(any_along, axis=-1)
        last_exclusive = size - jnp.argmax(any_along[..., ::-1], axis=-1)
        return first.astype(jnp.float32), last_exclusive.astype(jnp.float32)

    x1, x2 = extent(binary.any(axis=-2), width)
    y1, y2 = extent(binary.any(axis=-1), height)
    cx, cy = 0.5 * (x1 + x2), 0.5 * (y1 + y2)
    half_w, half_h = 0.5 * (x2 - x1) * expand_ratio, 0.5 * (y2 - y1) * expand_ratio
    box = jnp.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=-1)
    box = jnp.trunc(box).astype(jnp.int32)  # python int(): towards zero
    limits = jnp.asarray([width, height, width, height], jnp.int32)
    return jnp.clip(box, 0, limits)


CROPS = ("masked", "box")


def masked_crops(image: jax.Array, mask_probs: jax.Array, *, threshold: float, size: int = 224,
                 expand_ratio: float = 1.0, chunk: int = 16, crop: str = "masked") -> MaskedCrops:
    """Crop every proposal for CLIP.

    image: `[H, W, 3]` RGB on the 0-255 scale (float). mask_probs: `[Q, H, W]` mask probabilities
    (sigmoid of the mask logits) at the image's resolution. A pixel is foreground when its
    probability exceeds `threshold` (0.4 Swin-B, 0.5 R101c). Each crop is the box of its binary
    mask, background filled with 255 x CLIP mean, CLIP-normalised, then resized to `size` x `size`
    with torch's bicubic (images) and legacy nearest (masks). `chunk` proposals are processed
    at a time to bound memory (`[chunk, H, W, 3]` intermediates).

    `crop="box"` is the appendix A ablation: the plain box crop, background kept (not filled), and
    region masks of all ones (the whole crop is the region, so mask prompts replace nothing).
    """
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}; got {crop!r}")
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be [H, W, 3]; got {image.shape}")
    if mask_probs.ndim != 3 or mask_probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"mask_probs must be [Q, H, W] with H, W = {image.shape[:2]}; got {mask_probs.shape}")
    height, width = image.shape[:2]
    binary = mask_probs > threshold
    boxes = mask_boxes(binary, expand_ratio)
    mean = jnp.asarray(CLIP_FILL, jnp.float32)
    std = 255.0 * jnp.asarray(CLIP_STD, jnp.float32)
    normalised = (image.astype(jnp.float32) - mean) / std  # the fill value normalises to exactly 0

    def crop_one(args):
        mask, box = args
        left, top, right, bottom = box[0], box[1], box[2], box[3]
        rows_cubic = window_interpolation_matrix(top, bottom - top, height, size, "bicubic")
        cols_cubic = window_interpolation_matrix(left, right - left, width, size, "bicubic")
        maskf = mask.astype(jnp.float32)
        shown = normalised * maskf[..., None] if crop == "masked" else normalised
        crop_image = jnp.einsum("oh,hwc,pw->opc", rows_cubic, shown, cols_cubic, precision="highest")
        if crop == "box":
            return crop_image, jnp.ones((size, size), jnp.float32)
        rows_near = window_interpolation_matrix(top, bottom - top, height, size, "nearest")
        cols_near = window_interpolation_matrix(left, right - left, width, size, "nearest")
        crop_mask = jnp.einsum("oh,hw,pw->op", rows_near, maskf, cols_near, precision="highest")
        return crop_image, crop_mask

    images, region_masks = jax.lax.map(crop_one, (binary, boxes), batch_size=chunk)
    return MaskedCrops(images, region_masks, binary.any(axis=(-2, -1)))
