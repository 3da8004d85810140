"""Per-image semantic inference with the CLIP ensemble (reference 1.6-1.7), as pure array functions.

    scores = semantic_scores(pred_logits, mask_logits, clip_logits, valid, resized_hw=(h, w),
                             ensemble_weight=0.7)                      # [h, w, C]
    labels = predict_labels(scores, original_hw)                       # [H0, W0] int32

Everything has static shapes: all Q proposals go through CLIP and the invalid ones (no pixel
above the mask threshold) are masked out, instead of the original's data-dependent subset.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ovseg_jax.image_ops import resize_bilinear


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
