"""OVSeg's inference: segmenter proposals, CLIP on their masked crops, and the geometric ensemble of
the two class predictions (reference 1.6-1.10).

    predictor = Predictor(segmenter, clip, mask_threshold=0.4, ensemble_weight=0.7)
    labels = predictor.predict(image, class_names, resized_hw=(h, w), original_hw=(H0, W0))

`image` is the resized image (short side 640 as reference 1.1, uint8 `[Hp, Wp, 3]`), possibly
padded at the bottom/right beyond `resized_hw` (e.g. to a shape bucket). Pixels outside
`resized_hw` are zero in the segmenter's normalised input, exactly as the original's own padding,
and masks are cut to `resized_hw` before cropping and scoring; so a bucket equal to the
multiple-of-32 padded size reproduces the original. One compilation per padded shape; the final
resize to the original size (a small jitted function) compiles once per original size.
`Predictor(..., resize=(640, 2560))` makes `predict(image, names)` resize a raw image as reference
1.1 first and return labels at its size.

Accepted images (`as_rgb_uint8`): uint8 `[H, W, 3]` (the normal path); grayscale `[H, W]` /
`[H, W, 1]` (repeated to RGB); RGBA `[H, W, 4]` (alpha dropped, as PIL's `convert("RGB")`);
other integer types with values in 0..255; floating point with values in [0, 1], converted with
`round(255 * x)` (a float image on the 0-255 scale is refused: pass it as uint8). NaN/inf, empty
images, other shapes, empty / blank / duplicate class names, and inputs of more than `max_pixels`
pixels raise `ValueError` saying what was expected.

The pure array functions (`ensemble_class_probs`, `semantic_scores`, `predict_labels`) are what
`Predictor` runs; they hold static shapes: all Q proposals go through CLIP and the invalid ones (no
pixel above the mask threshold) are masked out, instead of the original's data-dependent subset.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ovseg_jax.clip import Clip
from ovseg_jax.data.transforms import resize_image, resized_hw as reference_resized_hw
from ovseg_jax.image_ops import resize_bilinear, window_interpolation_matrix
from ovseg_jax.masked_crops import masked_crops
from ovseg_jax.models.maskformer import TEMPERATURE, Segmenter, normalize_images


def upsample_masks(mask_logits: jax.Array, resized_hw: tuple[int, int]) -> jax.Array:
    """`[Q, h4, w4]` stride-4 mask logits of the padded input -> `[Q, h, w]` logits of the resized
    image: bilinear x4 to the padded size (align_corners=False), then cropped (reference 1.6)."""
    q, h4, w4 = mask_logits.shape
    padded = resize_bilinear(mask_logits, (4 * h4, 4 * w4), axes=(-2, -1))
    h, w = resized_hw
    if h > 4 * h4 or w > 4 * w4:
        raise ValueError(f"resized size {resized_hw} exceeds the padded size {(4 * h4, 4 * w4)}")
    return padded[:, :h, :w]


def ensemble_class_probs(pred_logits: jax.Array, clip_logits: jax.Array | None, valid: jax.Array | None,
                         ensemble_weight: float) -> jax.Array:
    """Geometric ensemble `p_mf^(1-λ) · P_clip^λ` -> `[Q, C]` (reference 1.7 steps 1-5).

    pred_logits, clip_logits: `[Q, C+1]` (last column = non-object). `valid`: `[Q]` bool.
    Invalid proposals keep `P_clip = 1`, i.e. `p_mf^(1-λ)`, as in the original.
    `clip_logits=None` gives the MaskFormer-only prediction; `ensemble_weight=0` with CLIP logits
    gives the original's "CLIP only" mode (`p_clip` for valid proposals, 0 for the others).
    """
    p_mf = jax.nn.softmax(pred_logits, axis=-1)[:, :-1]
    if clip_logits is None:
        return p_mf
    p_clip = jax.nn.softmax(clip_logits[:, :-1], axis=-1)  # non-object column dropped before softmax
    valid = valid[:, None]
    if ensemble_weight == 0:
        return jnp.where(valid, p_clip, 0.0)
    p_clip = jnp.where(valid, p_clip, 1.0)
    return p_mf ** (1.0 - ensemble_weight) * p_clip ** ensemble_weight


def semantic_scores(pred_logits: jax.Array, mask_logits: jax.Array, clip_logits: jax.Array | None,
                    valid: jax.Array | None, *, resized_hw: tuple[int, int], ensemble_weight: float) -> jax.Array:
    """Score map `[h, w, C]` at the resized resolution: `Σ_q p[q, c] · sigmoid(M[q])` (no normalisation).

    mask_logits: `[Q, h4, w4]` at stride 4 of the padded input; resized_hw: the un-padded size.
    """
    probs = ensemble_class_probs(pred_logits, clip_logits, valid, ensemble_weight)
    masks = jax.nn.sigmoid(upsample_masks(mask_logits, resized_hw))
    return jnp.einsum("qc,qhw->hwc", probs, masks, precision="highest")


def predict_labels(scores: jax.Array, original_hw: tuple[int, int]) -> jax.Array:
    """`[h, w, C]` scores -> `[H0, W0]` int32 labels: bilinear resize to the original size, argmax."""
    return jnp.argmax(resize_bilinear(scores, original_hw), axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("seg_graph", "clip_graph", "mask_threshold", "ensemble_weight",
                                             "mask_prompts"))
def _scores(seg_graph, seg_state, clip_graph, clip_state, image, text_bank, resized_hw, *, mask_threshold: float,
            ensemble_weight: float | None, mask_prompts: bool) -> jax.Array:
    """`[Hp, Wp, C]` scores (zero outside `resized_hw`) for one padded image `[Hp, Wp, 3]` 0-255."""
    segmenter = nnx.merge(seg_graph, seg_state)
    clip = nnx.merge(clip_graph, clip_state)
    hp, wp = image.shape[:2]
    inside = (jnp.arange(hp)[:, None] < resized_hw[0]) & (jnp.arange(wp)[None, :] < resized_hw[1])
    x = jnp.where(inside[..., None], normalize_images(image[None])[0], 0.0)
    out = segmenter(x[None], text_bank)
    pred_logits, mask_logits = out["pred_logits"][0], out["pred_masks"][0]  # [Q, C+1], [Q, Hq/4, Wq/4]
    mask_probs = jnp.where(inside, jax.nn.sigmoid(upsample_masks(mask_logits, (hp, wp))), 0.0)
    if ensemble_weight is None:
        probs = ensemble_class_probs(pred_logits, None, None, 0.0)
    else:
        size = clip.config.image_size
        crops = masked_crops(image.astype(jnp.float32), mask_probs, threshold=mask_threshold, size=size)
        feats = clip.encode_image(crops.images, crops.region_masks if mask_prompts else None)
        feats = feats / jnp.linalg.norm(feats, axis=-1, keepdims=True)
        clip_logits = TEMPERATURE * feats @ text_bank.T  # the non-object column is dropped anyway
        clip_logits = jnp.concatenate([clip_logits, jnp.zeros_like(clip_logits[:, :1])], axis=-1)
        probs = ensemble_class_probs(pred_logits, clip_logits, crops.valid, ensemble_weight)
    return jnp.einsum("qc,qhw->hwc", probs, mask_probs, precision="highest")


@functools.partial(jax.jit, static_argnames="original_hw")
def _labels(scores: jax.Array, resized_hw: jax.Array, original_hw: tuple[int, int]) -> jax.Array:
    """Bilinear resize of the `resized_hw` window of `[Hp, Wp, C]` scores to `original_hw`, argmax."""
    hp, wp = scores.shape[:2]
    rows = window_interpolation_matrix(0, resized_hw[0], hp, original_hw[0], "bilinear")
    cols = window_interpolation_matrix(0, resized_hw[1], wp, original_hw[1], "bilinear")
    full = jnp.einsum("oh,hwc,pw->opc", rows, scores, cols, precision="highest")
    return jnp.argmax(full, axis=-1).astype(jnp.int32)


def as_rgb_uint8(image) -> np.ndarray:
    """An image in any accepted form (see the module docstring) -> uint8 `[H, W, 3]`; else ValueError."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 3 and image.shape[-1] == 4:
        image = image[..., :3]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be RGB [H, W, 3], RGBA [H, W, 4] or grayscale [H, W]; got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image is empty ({image.shape[0]} x {image.shape[1]} pixels)")
    if image.dtype == np.uint8:
        return image
    if np.issubdtype(image.dtype, np.floating):
        bad = ~np.isfinite(image)
        if bad.any():
            raise ValueError(f"image has {int(bad.any(axis=-1).sum())} pixels with NaN or inf values")
        lo, hi = float(image.min()), float(image.max())
        if lo < 0 or hi > 1:
            raise ValueError(f"a floating-point image must hold values in [0, 1] (scaled by 255); got {lo:g}..{hi:g}. "
                             "For 0-255 values pass the image as uint8")
        return np.round(image * 255).astype(np.uint8)
    if np.issubdtype(image.dtype, np.integer):
        lo, hi = int(image.min()), int(image.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"an integer image must hold values in 0..255; got {lo}..{hi} ({image.dtype}). "
                             "A 16-bit image: pass (image >> 8).astype(np.uint8)")
        return image.astype(np.uint8)
    raise ValueError(f"image dtype {image.dtype} not supported; expected uint8 (or float in [0, 1])")


def check_class_names(class_names: Sequence[str]) -> list[str]:
    """The names as a list; ValueError for an empty list, blank names or names equal after stripping
    (CLIP embeds `name.strip()`, so "cat" and "cat " would be one class twice)."""
    if isinstance(class_names, str):
        raise ValueError(f"class_names must be a list of names, not the string {class_names!r}")
    names = list(class_names)
    if not names:
        raise ValueError("class_names is empty; give at least one class name")
    blank = [i for i, n in enumerate(names) if not isinstance(n, str) or not n.strip()]
    if blank:
        raise ValueError(f"class names at positions {blank} are blank or not strings: {[names[i] for i in blank]}")
    seen: dict[str, int] = {}
    duplicates = [f"{n!r} (positions {seen[n.strip()]} and {i})" for i, n in enumerate(names)
                  if seen.setdefault(n.strip(), i) != i]
    if duplicates:
        raise ValueError(f"duplicate class names: {', '.join(duplicates)}")
    return names


def _check_hw(hw, what: str) -> tuple[int, int]:
    hw = tuple(int(v) for v in hw)
    if len(hw) != 2 or min(hw) <= 0:
        raise ValueError(f"{what} must be two positive sizes (H, W); got {hw}")
    return hw


# The largest input the reference's resize gives is 640 x 2560; twice that leaves room for bucket
# padding and larger `short` settings. 100 proposals' float32 mask probabilities at this size: 1.3 GB.
MAX_PIXELS = 2 * 640 * 2560


class Predictor:
    """Segmenter + (mask-adapted) CLIP -> per-pixel labels over any class names.

    mask_threshold: 0.4 (Swin-B model), 0.5 (R101c). ensemble_weight: λ of reference 1.7
    (0.7 A-150/A-847, 0.6 PC-59/PC-459, 0.45 PAS-20; 0 = CLIP only; None = segmenter only).
    mask_prompts: feed region masks to CLIP (reference `MASK_PROMPT_FWD`) when it has prompts.
    templates: prompt templates of the class-name embeddings ("vild" = the 14 ViLD templates).
    resize: `(short, max_size)`, e.g. (640, 2560) (R101c: (512, 2048)): `predict` without `resized_hw`
        resizes the image as reference 1.1 (PIL bilinear) and returns labels at the image's size.
        None: the image is the model input as given.
    max_pixels: larger model inputs are refused (ValueError) instead of allocating gigabytes.
    """

    def __init__(self, segmenter: Segmenter, clip: Clip, *, mask_threshold: float = 0.4,
                 ensemble_weight: float | None = 0.7, mask_prompts: bool = True,
                 templates: str | Sequence[str] = "vild", resize: tuple[int, int] | None = None,
                 max_pixels: int = MAX_PIXELS):
        self.segmenter, self.clip, self.templates = segmenter, clip, templates
        self.mask_threshold, self.ensemble_weight = mask_threshold, ensemble_weight
        self.mask_prompts = mask_prompts and clip.config.mask_prompt_depth > 0
        self.resize = None if resize is None else _check_hw(resize, "resize (short, max_size)")
        self.max_pixels = max_pixels

    def scores(self, image, class_names: Sequence[str], resized_hw: tuple[int, int] | None = None) -> jax.Array:
        """`[Hp, Wp, 3]` uint8 resized (+ padded) image -> `[Hp, Wp, C]` scores (0 outside `resized_hw`)."""
        class_names = check_class_names(class_names)
        h, w = (np.shape(image) + (1, 1))[:2]  # checked before any copy is made
        if h * w > self.max_pixels:
            raise ValueError(
                f"image of {h} x {w} pixels is larger than max_pixels={self.max_pixels} (the model runs at "
                "the reference's test size, short side 640 and long side <= 2560): resize it first, e.g. "
                "Predictor(..., resize=(640, 2560)), or raise max_pixels")
        image = as_rgb_uint8(image)
        resized_hw = image.shape[:2] if resized_hw is None else _check_hw(resized_hw, "resized_hw")
        if resized_hw[0] > image.shape[0] or resized_hw[1] > image.shape[1]:
            raise ValueError(f"resized_hw {resized_hw} exceeds the image {image.shape[:2]}")
        seg_graph, seg_state = nnx.split(self.segmenter)
        clip_graph, clip_state = nnx.split(self.clip.model)
        return _scores(seg_graph, seg_state, clip_graph, clip_state, image.astype(jnp.float32),
                       self.clip.class_embeddings(class_names, self.templates), jnp.asarray(resized_hw, jnp.int32),
                       mask_threshold=self.mask_threshold, ensemble_weight=self.ensemble_weight,
                       mask_prompts=self.mask_prompts)

    def predict(self, image, class_names: Sequence[str], *, resized_hw: tuple[int, int] | None = None,
                original_hw: tuple[int, int] | None = None) -> np.ndarray:
        """-> `[H0, W0]` int32 class indices into `class_names` at the original resolution.

        `original_hw` defaults to `resized_hw`, or with `resize` set and no `resized_hw`, to the size
        of the image, which is then resized as reference 1.1 before the model sees it."""
        if resized_hw is None and self.resize is not None:
            image = as_rgb_uint8(image)
            original_hw = image.shape[:2] if original_hw is None else original_hw
            image = resize_image(image, reference_resized_hw(*image.shape[:2], *self.resize))
        resized_hw = None if resized_hw is None else _check_hw(resized_hw, "resized_hw")
        original_hw = None if original_hw is None else _check_hw(original_hw, "original_hw")
        scores = self.scores(image, class_names, resized_hw)
        resized_hw = scores.shape[:2] if resized_hw is None else resized_hw
        original_hw = resized_hw if original_hw is None else original_hw
        return np.asarray(_labels(scores, jnp.asarray(resized_hw, jnp.int32), original_hw))
