"""OVSeg's inference: segmenter proposals, CLIP on their masked crops, and the geometric ensemble of
the two class predictions (reference 1.6-1.10).

    predictor = Predictor(segmenter, clip, mask_threshold=0.4, ensemble_weight=0.7)
    labels = predictor.predict(image, class_names, resized_hw=(h, w), original_hw=(H0, W0))
    results = predictor.predict_batch(images, class_names, resized_hw=[...], original_hw=[...])

`image` is the resized image (short side 640 as reference 1.1, uint8 `[Hp, Wp, 3]`), possibly
padded at the bottom/right beyond `resized_hw` (e.g. to a shape bucket). Pixels outside
`resized_hw` are zero in the segmenter's normalised input, exactly as the original's own padding,
and masks are cut to `resized_hw` before cropping and scoring; so a bucket equal to the
multiple-of-32 padded size reproduces the original. One compilation per padded shape and batch
size; the final resize to the original size runs on an output padded to a multiple of
`OUTPUT_BUCKET` (so a folder of mixed sizes compiles it a few times, not once per size).
`Predictor(..., resize=(640, 2560))` makes `predict(image, names)` resize a raw image as reference
1.1 first and return labels at its size.

Class lists are bucketed too: the text bank `[C, D]` is zero-padded to a multiple of
`CLASS_BUCKET` (16) names and the padded classes' logits are set to -inf before every softmax
(`mask_padded_classes`), so they get probability exactly 0, never win a pixel, and the real classes'
probabilities are those of the unpadded bank; a new class list of another length thus reuses the
compiled program (one compilation per padded shape, not per class count). The mask threshold and
λ are traced as well: a `Predictor` with other values of them reuses the program too.

Two modes:
- "semantic" (the evaluation path, reference 1.7): every pixel gets the argmax class of
  `Σ_q p[q, c] · M[q]` with the ensemble `p = p_mf^(1-λ) · p_clip^λ` and soft masks `M`.
- "demo" (the original's `OVSegDEMO`, reference 1.10): for each class the one valid proposal
  that scores it highest is kept, with its whole probability row, over its hard mask
  (`M > mask_threshold`); pixels no kept proposal covers are `UNLABELED`. A single class name gets
  the competitor "others" (its own pick dropped; pixels it wins are `UNLABELED`). The original
  uses CLIP only (λ=0) here and crashes for λ>0 (upstream issue #18); here λ>0 is the ensemble
  with the proposal picked among the valid ones. The original also paints a pixel unlabeled when
  the score of class 0 alone is 0 (a quirk); here it is when no class scores above 0.

Accepted images (`as_rgb_uint8`): uint8 `[H, W, 3]` (the normal path); grayscale `[H, W]` /
`[H, W, 1]` (repeated to RGB); RGBA `[H, W, 4]` (alpha dropped, as PIL's `convert("RGB")`);
other integer types with values in 0..255; floating point with values in [0, 1], converted with
`round(255 * x)` (a float image on the 0-255 scale is refused: pass it as uint8). NaN/inf, empty
images, other shapes, empty / blank / duplicate class names, and inputs of more than `max_pixels`
pixels raise `ValueError` saying what was expected.

The pure array functions (`mask_probabilities`, `ensemble_class_probs`, `semantic_scores`,
`demo_scores`, `combine`) are what `Predictor` runs; evaluation sweeps and pair mining call them on
`Predictor.proposals` / `Predictor.classify_crops`. Shapes are static: all Q proposals go through
CLIP and the invalid ones (no pixel above the mask threshold) are masked out, instead of the
original's data-dependent subset.

`Predictor(..., proposals="sam" | "both", sam=SamProposals(...))` classifies SAM's automatic masks
instead of, or besides, the segmenter's proposals (`inference.sam_proposals`: the rules, and the
original Space's SAM demo as demo mode with `granularity`).

`Predictor(..., clip_top_k=k)` (off by default: the paper runs CLIP on every valid proposal) runs
CLIP on the k valid proposals the segmenter ranks highest (`proposal_ranking`) only, gathered into a
static `[k, ...]` batch and scattered back; for the other valid proposals CLIP abstains (a uniform
`P_clip`, `filtered_clip_logits`), so the segmenter's probabilities alone rank their classes.
Semantic mode only (demo mode picks one proposal per class among all valid ones).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ovseg_jax.clip import Clip
from ovseg_jax.data.transforms import resize_image, resized_hw as reference_resized_hw
from ovseg_jax.inference.masked_crops import CROPS, masked_crops
from ovseg_jax.models.layers import inference_split
from ovseg_jax.models.maskformer import Segmenter, TEMPERATURE, normalize_images
from ovseg_jax.utils.image_ops import resize_bilinear, window_interpolation_matrix

MODES = ("semantic", "demo")
PROPOSALS = ("maskformer", "sam", "both")  # where the masks CLIP classifies come from (inference.sam_proposals)
UNLABELED = -1  # demo mode: no proposal covers the pixel
OTHERS = "others"  # demo mode: the competitor of a single class name (reference 1.10)
OUTPUT_BUCKET = 64  # final score maps are resized into outputs padded to a multiple of this
CLASS_BUCKET = 16  # text banks are padded to a multiple of this many classes (one compilation per bucket)


class Proposals(NamedTuple):
    """The segmenter's output for one padded image."""
    pred_logits: jax.Array  # [Q, C+1] open-vocabulary class logits (last column: non-object)
    mask_probs: jax.Array  # [Q, Hp, Wp] sigmoid mask probabilities, 0 outside the resized window


class Segmentation(NamedTuple):
    """One image's result at its original size."""
    labels: np.ndarray  # [H0, W0] int32 indices into the class names; UNLABELED (-1) in demo mode
    confidence: np.ndarray  # [H0, W0] float32 score of the winning class (Σ_q p[q, c] · M[q])


# ---------------------------------------------------------------------------------------------
# Pure array functions


def upsample_masks(mask_logits: jax.Array, resized_hw: tuple[int, int]) -> jax.Array:
    """`[Q, h4, w4]` stride-4 mask logits of the padded input -> `[Q, h, w]` logits of the resized
    image: bilinear x4 to the padded size (align_corners=False), then cropped (reference 1.6)."""
    q, h4, w4 = mask_logits.shape
    padded = resize_bilinear(mask_logits, (4 * h4, 4 * w4), axes=(-2, -1))
    h, w = resized_hw
    if h > 4 * h4 or w > 4 * w4:
        raise ValueError(f"resized size {resized_hw} exceeds the padded size {(4 * h4, 4 * w4)}")
    return padded[:, :h, :w]


def inside_window(padded_hw: tuple[int, int], resized_hw: jax.Array) -> jax.Array:
    """`[Hp, Wp]` bool: pixels of the (traced) `resized_hw` window at the top left of the padded image."""
    hp, wp = padded_hw
    return (jnp.arange(hp)[:, None] < resized_hw[0]) & (jnp.arange(wp)[None, :] < resized_hw[1])


def mask_probabilities(mask_logits: jax.Array, padded_hw: tuple[int, int], resized_hw: jax.Array) -> jax.Array:
    """`[Q, h4, w4]` stride-4 mask logits -> `[Q, Hp, Wp]` probabilities, 0 outside the resized
    window (reference 1.6: bilinear x4, sigmoid, cut to the resized image)."""
    probs = jax.nn.sigmoid(upsample_masks(mask_logits, padded_hw))
    return jnp.where(inside_window(padded_hw, resized_hw), probs, 0.0)


def pad_classes(text_bank: jax.Array, bucket: int = CLASS_BUCKET) -> jax.Array:
    """`[C, D]` class embeddings -> `[Cp, D]`, zero rows appended up to the next multiple of `bucket`
    (on the host: eager `jnp.pad` / `jnp.asarray` would compile a small program per class count)."""
    bank = np.asarray(text_bank)
    return jax.device_put(np.pad(bank, ((0, -len(bank) % bucket), (0, 0))))


def mask_padded_classes(logits: jax.Array, num_classes: jax.Array | int) -> jax.Array:
    """`[..., Cp+1]` class logits of a padded text bank (last column: non-object) -> the same with the
    padded columns `num_classes..Cp-1` at -inf, so that a softmax gives them exactly 0 and the real
    classes what the unpadded logits give."""
    column = jnp.arange(logits.shape[-1])
    padded = (column >= num_classes) & (column < logits.shape[-1] - 1)
    return jnp.where(padded, -jnp.inf, logits)


def ensemble_class_probs(pred_logits: jax.Array, clip_logits: jax.Array | None, valid: jax.Array | None,
                         ensemble_weight: float | jax.Array) -> jax.Array:
    """Geometric ensemble `p_mf^(1-λ) · P_clip^λ` -> `[Q, C]` (reference 1.7 steps 1-5).

    pred_logits, clip_logits: `[Q, C+1]` (last column = non-object). `valid`: `[Q]` bool.
    Invalid proposals keep `P_clip = 1`, i.e. `p_mf^(1-λ)`, as in the original.
    `clip_logits=None` gives the MaskFormer-only prediction; `ensemble_weight=0` with CLIP logits
    gives the original's "CLIP only" mode (`p_clip` for valid proposals, 0 for the others).
    `ensemble_weight` may be a traced scalar: one compiled program then serves every λ, 0 included.
    """
    p_mf = jax.nn.softmax(pred_logits, axis=-1)[:, :-1]
    if clip_logits is None:
        return p_mf
    p_clip = jax.nn.softmax(clip_logits[:, :-1], axis=-1)  # non-object column dropped before softmax
    valid = valid[:, None]
    clip_only = jnp.where(valid, p_clip, 0.0)
    traced = isinstance(ensemble_weight, jax.Array)
    if not traced and ensemble_weight == 0:
        return clip_only
    mixed = p_mf ** (1.0 - ensemble_weight) * jnp.where(valid, p_clip, 1.0) ** ensemble_weight
    return jnp.where(ensemble_weight == 0, clip_only, mixed) if traced else mixed


def proposal_ranking(pred_logits: jax.Array, mask_probs: jax.Array) -> jax.Array:
    """`[Q, C+1]` segmenter logits, `[Q, H, W]` mask probabilities -> `[Q]` ranking score of the
    CLIP top-k filter: the segmenter's confidence `max_c p_mf[q, c]` times the soft mask area
    `Σ M[q]` (pixels), an upper bound of the score mass the proposal can add to the map in the
    segmenter-only prediction."""
    confidence = jnp.max(jax.nn.softmax(pred_logits, axis=-1)[:, :-1], axis=-1)
    return confidence * jnp.sum(mask_probs, axis=(-2, -1))


def top_proposals(ranking: jax.Array, valid: jax.Array, k: int) -> jax.Array:
    """`[Q]` ranking scores and valid flags -> `[k]` int32 indices of the k best valid proposals, in
    increasing index order (invalid ones fill up only when fewer than k are valid)."""
    _, chosen = jax.lax.top_k(jnp.where(valid, ranking, -jnp.inf), k)
    return jnp.sort(chosen)


def filtered_clip_logits(chosen: jax.Array, chosen_clip_logits: jax.Array, num_proposals: int) -> jax.Array:
    """CLIP logits of the `chosen` proposals (`[k]` indices, `[k, C+1]` logits) scattered into
    `[num_proposals, C+1]` logits for the ensemble, zero in the rows CLIP did not see.

    A valid proposal CLIP skipped thus gets a uniform `P_clip = 1/C` (CLIP abstains), so its ensemble
    probability is `p_mf^(1-λ) · C^-λ`: the segmenter's own preference, weighted down by `C^-λ` against
    the proposals CLIP scored (whose `P_clip` is near 1 for their class). With λ = 0 (CLIP only) it
    adds the same `1/C · M[q]` to every class of a pixel, which changes no pixel's winner.
    The alternative stand-in, the segmenter's class distribution `softmax(pred_logits[:, :C])`
    (`p = p_mf · (1 - p_no)^-λ`, "as if CLIP agreed"), lost 5 mIoU at k = 8 of 16 on the synthetic
    world where this lost 0.4: the segmenter's confident class errors (unseen classes above all)
    are what CLIP is there to correct. Invalid proposals are unaffected (`P_clip = 1`, or 0 when
    λ = 0).
    """
    zeros = jnp.zeros((num_proposals, chosen_clip_logits.shape[-1]), chosen_clip_logits.dtype)
    return zeros.at[chosen].set(chosen_clip_logits)


def semantic_scores(class_probs: jax.Array, mask_probs: jax.Array) -> jax.Array:
    """`[Q, C]` class probabilities, `[Q, H, W]` mask probabilities -> `[H, W, C]` scores
    `Σ_q p[q, c] · M[q]` (reference 1.7 step 6, no normalisation)."""
    return jnp.einsum("qc,qhw->hwc", class_probs, mask_probs, precision="highest")


def demo_scores(class_probs: jax.Array, mask_probs: jax.Array, valid: jax.Array, *, mask_threshold: float,
                num_named: jax.Array | int) -> jax.Array:
    """The original demo's score map (reference 1.10) -> `[H, W, C]`.

    For each of the first `num_named` classes, the valid proposal with the highest probability
    for it is kept with its whole row of `class_probs` `[Q, C]`; the others are zeroed. The map is
    the sum of the kept rows over their hard masks `mask_probs > mask_threshold` `[Q, H, W]`.
    Classes from `num_named` on (the appended "others", padded classes) compete but pick nothing;
    `num_named` may be traced.
    """
    q, c = class_probs.shape
    best = jnp.argmax(jnp.where(valid[:, None], class_probs, -jnp.inf), axis=0)  # [C]
    picks = jax.nn.one_hot(best, q, dtype=jnp.int32) * (jnp.arange(c) < num_named)[:, None]  # [C, Q]
    kept = (picks.sum(axis=0) > 0) & valid
    hard = (mask_probs > mask_threshold).astype(class_probs.dtype)
    return jnp.einsum("qc,qhw->hwc", jnp.where(kept[:, None], class_probs, 0.0), hard, precision="highest")


def combine(proposals: Proposals, clip_logits: jax.Array | None, valid: jax.Array | None, *,
            ensemble_weight: float | None, mode: str = "semantic", mask_threshold: float = 0.4,
            num_named: jax.Array | int | None = None) -> jax.Array:
    """One image's `[Hp, Wp, C]` score map from its proposals and CLIP logits (`None` with
    `ensemble_weight=None`: the segmenter alone)."""
    if ensemble_weight is None:
        probs = ensemble_class_probs(proposals.pred_logits, None, None, 0.0)
    else:
        probs = ensemble_class_probs(proposals.pred_logits, clip_logits, valid, ensemble_weight)
    if mode == "semantic":
        return semantic_scores(probs, proposals.mask_probs)
    if valid is None:
        raise ValueError("demo mode needs the CLIP branch (ensemble_weight is None)")
    num_named = probs.shape[1] if num_named is None else num_named
    return demo_scores(probs, proposals.mask_probs, valid, mask_threshold=mask_threshold, num_named=num_named)


def scores_at_original(scores: jax.Array, resized_hw: jax.Array, original_hw: jax.Array,
                       out_hw: tuple[int, int]) -> jax.Array:
    """Bilinear resize (align_corners=False) of the `resized_hw` window of `[Hp, Wp, C]` scores to
    `original_hw`, written into an `[*out_hw, C]` output whose rows/columns beyond `original_hw` are
    zero padding (reference 1.7 step 7; traced sizes, static `out_hw`)."""
    hp, wp = scores.shape[:2]
    rows = window_interpolation_matrix(0, resized_hw[0], hp, out_hw[0], "bilinear", original_hw[0])
    cols = window_interpolation_matrix(0, resized_hw[1], wp, out_hw[1], "bilinear", original_hw[1])
    return jnp.einsum("oh,hwc,pw->opc", rows, scores, cols, precision="highest")


def _labels_and_confidence(scores: jax.Array, resized_hw: jax.Array, original_hw: jax.Array, num_classes: jax.Array,
                           num_named: jax.Array, out_hw: tuple[int, int],
                           unlabeled: bool) -> tuple[jax.Array, jax.Array]:
    """`scores_at_original`, then argmax over the first `num_classes` classes (the others are a
    padded bank's). With `unlabeled` (demo mode), pixels without a positive score or won by a class
    from `num_named` on are UNLABELED."""
    full = scores_at_original(scores, resized_hw, original_hw, out_hw)
    full = jnp.where(jnp.arange(full.shape[-1]) < num_classes, full, -jnp.inf)
    labels = jnp.argmax(full, axis=-1).astype(jnp.int32)
    confidence = jnp.max(full, axis=-1)
    if unlabeled:
        labels = jnp.where((confidence <= 0) | (labels >= num_named), UNLABELED, labels)
    return labels, confidence


@functools.partial(jax.jit, static_argnames=("out_hw", "unlabeled"))
def _batch_labels(scores, resized_hw, original_hw, num_classes, num_named, *, out_hw, unlabeled):
    one = functools.partial(_labels_and_confidence, num_classes=num_classes, num_named=num_named, out_hw=out_hw,
                            unlabeled=unlabeled)
    return jax.vmap(one)(scores, resized_hw, original_hw)


def output_bucket(sizes: np.ndarray) -> tuple[int, int]:
    top = np.max(np.asarray(sizes).reshape(-1, 2), axis=0)
    return tuple(int(-(-v // OUTPUT_BUCKET) * OUTPUT_BUCKET) for v in top)


def predict_labels(scores: jax.Array, original_hw: tuple[int, int], resized_hw: tuple[int, int] | None = None,
                   num_named: int | None = None) -> np.ndarray:
    """`[Hp, Wp, C]` scores -> `[H0, W0]` int32 labels: the `resized_hw` window (default: all)
    bilinearly resized to `original_hw`, argmax (reference 1.7 step 7). `num_named`: demo mode's
    UNLABELED pixels (see `_labels_and_confidence`)."""
    scores = jnp.asarray(scores)
    resized_hw = scores.shape[:2] if resized_hw is None else resized_hw
    h, w = resized_hw
    if min(h, w, *original_hw) <= 0:
        raise ValueError(f"cannot resize {h}x{w} to {original_hw[0]}x{original_hw[1]}: both sizes must be positive")
    num_classes = scores.shape[-1]
    labels, _ = _batch_labels(scores[None], jnp.asarray([resized_hw], jnp.int32),
                              jnp.asarray([original_hw], jnp.int32), jnp.int32(num_classes),
                              jnp.int32(num_classes if num_named is None else num_named),
                              out_hw=output_bucket(original_hw), unlabeled=num_named is not None)
    return np.asarray(labels[0, :original_hw[0], :original_hw[1]])


# ---------------------------------------------------------------------------------------------
# The networks, jitted


def _segment(segmenter: Segmenter, images: jax.Array, text_bank: jax.Array, resized_hw: jax.Array) -> Proposals:
    """`[B, Hp, Wp, 3]` 0-255 padded images, `[B, 2]` resized sizes -> batched `Proposals`."""
    padded_hw = images.shape[1:3]
    inside = jax.vmap(functools.partial(inside_window, padded_hw))(resized_hw)  # [B, Hp, Wp]
    x = jnp.where(inside[..., None], normalize_images(images), 0.0)
    out = segmenter(x, text_bank)
    masks = jax.vmap(functools.partial(mask_probabilities, padded_hw=padded_hw))(out["pred_masks"], resized_hw=resized_hw)
    return Proposals(out["pred_logits"], masks)


def _classify_crops(clip, image: jax.Array, mask_probs: jax.Array, text_bank: jax.Array, *, mask_threshold: float,
                    mask_prompts: bool, crop: str = "masked", pred_logits: jax.Array | None = None,
                    top_k: int | None = None) -> tuple[jax.Array, jax.Array]:
    """CLIP on the masked (or plain box, `crop="box"`) crops of one image (reference 1.8-1.9) ->
    (`[Q, C+1]` logits with a zero non-object column, `[Q]` valid).

    `top_k`: CLIP sees only the `top_k` valid proposals `proposal_ranking` puts first (needs the
    segmenter's `[Q, C+1]` `pred_logits`); the others get `filtered_clip_logits`' zero rows."""
    if top_k is None:
        crops = masked_crops(image, mask_probs, threshold=mask_threshold, size=clip.config.image_size, crop=crop)
        feats = clip.encode_image(crops.images, crops.region_masks if mask_prompts else None)
        feats = feats / jnp.linalg.norm(feats, axis=-1, keepdims=True)
        logits = TEMPERATURE * feats @ text_bank.T  # the non-object column is dropped by the ensemble
        return jnp.concatenate([logits, jnp.zeros_like(logits[:, :1])], axis=-1), crops.valid
    valid = (mask_probs > mask_threshold).any(axis=(-2, -1))
    chosen = top_proposals(proposal_ranking(pred_logits, mask_probs), valid, min(top_k, mask_probs.shape[0]))
    logits, _ = _classify_crops(clip, image, mask_probs[chosen], text_bank, mask_threshold=mask_threshold,
                                mask_prompts=mask_prompts, crop=crop)
    return filtered_clip_logits(chosen, logits, mask_probs.shape[0]), valid


@functools.partial(jax.jit, static_argnums=0)
def _proposals_jit(seg_graph, seg_state, images, text_bank, resized_hw):
    return _segment(nnx.merge(seg_graph, seg_state), images, text_bank, resized_hw)


@functools.partial(jax.jit, static_argnames=("clip_graph", "mask_threshold", "mask_prompts", "crop", "top_k"))
def _crops_jit(clip_graph, clip_state, images, mask_probs, pred_logits, text_bank, *, mask_threshold, mask_prompts,
               crop, top_k):
    clip = nnx.merge(clip_graph, clip_state)
    return jax.lax.map(lambda a: _classify_crops(clip, a[0], a[1], text_bank, mask_threshold=mask_threshold,
                                                 mask_prompts=mask_prompts, crop=crop, pred_logits=a[2], top_k=top_k),
                       (images, mask_probs, pred_logits))


@functools.partial(jax.jit, static_argnames=("seg_graph", "clip_graph", "use_clip", "mask_prompts", "mode", "crop",
                                             "top_k"))
def _scores_jit(seg_graph, seg_state, clip_graph, clip_state, images, text_bank, resized_hw, num_classes, num_named,
                mask_threshold, ensemble_weight, *, use_clip, mask_prompts, mode, crop, top_k):
    """`[B, Hp, Wp, 3]` 0-255, a `[Cp, D]` text bank of which the first `num_classes` rows are real
    -> `[B, Hp, Wp, Cp]` scores (zero outside each `resized_hw`). The class counts, the mask
    threshold and λ are traced (a new value does not recompile); `use_clip=False` is the segmenter
    alone."""
    proposals = _segment(nnx.merge(seg_graph, seg_state), images, text_bank, resized_hw)
    clip = nnx.merge(clip_graph, clip_state)

    def one(args):
        image, pred_logits, mask_probs = args
        pred_logits = mask_padded_classes(pred_logits, num_classes)
        one_image = Proposals(pred_logits, mask_probs)
        if not use_clip:
            return combine(one_image, None, None, ensemble_weight=None)
        clip_logits, valid = _classify_crops(clip, image, mask_probs, text_bank, mask_threshold=mask_threshold,
                                             mask_prompts=mask_prompts, crop=crop, pred_logits=pred_logits,
                                             top_k=top_k)
        return combine(one_image, mask_padded_classes(clip_logits, num_classes), valid,
                       ensemble_weight=ensemble_weight, mode=mode, mask_threshold=mask_threshold, num_named=num_named)

    return jax.lax.map(one, (images, proposals.pred_logits, proposals.mask_probs))


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

    mask_threshold: 0.4 (Swin-B model), 0.5 (R101c), 0.35 (the original demo).
    ensemble_weight: λ of reference 1.7 (0.7 A-150/A-847, 0.6 PC-59/PC-459, 0.45 PAS-20; 0 = CLIP
        only; None = segmenter only).
    mask_prompts: feed region masks to CLIP (reference `MASK_PROMPT_FWD`) when it has prompts.
    crop: "masked" (reference 1.8) or "box" (appendix A: the plain box crop, background kept).
    templates: prompt templates of the class-name embeddings ("vild" = the 14 ViLD templates).
    mode: "semantic" (evaluation: every pixel gets a class) or "demo" (see the module docstring).
    resize: `(short, max_size)`, e.g. (640, 2560) (R101c: (512, 2048)): `predict` without `resized_hw`
        resizes the image as reference 1.1 (PIL bilinear) and returns labels at the image's size.
        None: the image is the model input as given.
    max_pixels: larger model inputs are refused (ValueError) instead of allocating gigabytes.
    clip_top_k: run CLIP on the k valid proposals the segmenter ranks highest only (see
        `filtered_clip_logits` for the others; semantic mode); None (default): on all, as the paper.
    class_bucket: the text bank is padded to a multiple of this many classes (`pad_classes`), so
        class lists of up to that length share one compilation; 1: no padding.
    proposals: "maskformer" (the segmenter's, the paper), "sam" (SAM's automatic masks; the
        segmenter is not used and may be None) or "both" (the union); see `inference.sam_proposals`.
    sam: the SAM proposal source (`sam_proposals.SamProposals`) for proposals "sam" / "both"
        (ignored by "maskformer": a predictor may carry it for a copy with other proposals).
    granularity: demo mode with SAM proposals, the Space's option: each class keeps every mask
        scoring above this fraction of its best (1: the best only).
    """

    def __init__(self, segmenter: Segmenter, clip: Clip, *, mask_threshold: float = 0.4,
                 ensemble_weight: float | None = 0.7, mask_prompts: bool = True,
                 templates: str | Sequence[str] = "vild", mode: str = "semantic",
                 resize: tuple[int, int] | None = None, max_pixels: int = MAX_PIXELS, crop: str = "masked",
                 clip_top_k: int | None = None, class_bucket: int = CLASS_BUCKET, proposals: str = "maskformer",
                 sam=None, granularity: float = 1.0):
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} unknown; expected one of {MODES}")
        if crop not in CROPS:
            raise ValueError(f"crop {crop!r} unknown; expected one of {CROPS}")
        if mode == "demo" and ensemble_weight is None:
            raise ValueError("demo mode classifies with CLIP: give an ensemble_weight (the original demo uses 0)")
        if ensemble_weight is not None and not 0.0 <= ensemble_weight <= 1.0:
            raise ValueError(f"ensemble_weight must lie in [0, 1] (or be None); got {ensemble_weight}")
        self.segmenter, self.clip, self.templates, self.mode = segmenter, clip, templates, mode
        if clip_top_k is not None and (isinstance(clip_top_k, bool) or not isinstance(clip_top_k, (int, np.integer))
                                       or clip_top_k <= 0):
            raise ValueError(f"clip_top_k must be a positive number of proposals (or None); got {clip_top_k!r}")
        if clip_top_k is not None and mode == "demo":
            raise ValueError("clip_top_k is for the semantic mode: demo mode picks one proposal per class among all "
                             "valid ones, so every proposal needs CLIP's probabilities")
        self.mask_threshold, self.ensemble_weight, self.crop = mask_threshold, ensemble_weight, crop
        self.clip_top_k = None if clip_top_k is None else int(clip_top_k)
        self.mask_prompts = mask_prompts and clip.config.mask_prompt_depth > 0
        self.resize = None if resize is None else _check_hw(resize, "resize (short, max_size)")
        self.max_pixels = max_pixels
        if isinstance(class_bucket, bool) or not isinstance(class_bucket, (int, np.integer)) or class_bucket <= 0:
            raise ValueError(f"class_bucket must be a positive number of classes; got {class_bucket!r}")
        self.class_bucket = int(class_bucket)
        self._check_proposals(proposals, sam, granularity)
        # `proposal_source`, not `proposals`: that is the method giving the segmenter's proposals
        self.proposal_source, self.sam, self.granularity = proposals, sam, float(granularity)

    def _check_proposals(self, proposals: str, sam, granularity: float) -> None:
        if proposals not in PROPOSALS:
            raise ValueError(f"proposals {proposals!r} unknown; expected one of {PROPOSALS}")
        if isinstance(granularity, bool) or not isinstance(granularity, (int, float)) or not 0 < granularity <= 1:
            raise ValueError(f"granularity must lie in (0, 1] (1: each class keeps its best mask); got {granularity!r}")
        if proposals == "maskformer":
            if self.segmenter is None:
                raise ValueError("the segmenter's proposals need a segmenter (proposals='sam' runs without one)")
            if granularity != 1:
                raise ValueError("granularity selects among SAM's masks: pass proposals='sam' or 'both'")
            return
        if sam is None:
            raise ValueError(f"proposals={proposals!r} needs sam= (ovseg_jax.inference.sam_proposals.SamProposals)")
        if self.ensemble_weight is None:
            raise ValueError("SAM's masks are classified by CLIP: give an ensemble_weight (0: CLIP only)")
        if self.clip_top_k is not None:
            raise ValueError("clip_top_k ranks the segmenter's proposals: it is for proposals='maskformer'")
        if granularity != 1 and self.mode != "demo":
            raise ValueError("granularity is the demo mode's mask selection: pass mode='demo'")
        if self.segmenter is None and proposals == "both":
            raise ValueError("proposals='both' needs the segmenter")

    # -- inputs ------------------------------------------------------------------------------

    def _names(self, class_names: Sequence[str]) -> tuple[list[str], int]:
        """(the names the model scores, how many of them are the user's): demo mode adds "others"
        to a single name."""
        names = check_class_names(class_names)
        if self.mode == "demo" and len(names) == 1 and names[0].strip() != OTHERS:
            return names + [OTHERS], 1
        return names, len(names)

    def text_bank(self, class_names: Sequence[str]) -> jax.Array:
        """`[C, D]` unit-norm class embeddings with this predictor's templates."""
        return self.clip.class_embeddings(class_names, self.templates)

    def _images(self, images, resized_hw) -> tuple[np.ndarray, np.ndarray]:
        """A padded image `[Hp, Wp, 3]` or a batch `[B, Hp, Wp, 3]` (+ sizes) -> (`[B, Hp, Wp, 3]`
        uint8, `[B, 2]` int32 resized sizes), checked."""
        single = not (isinstance(images, (list, tuple)) or np.ndim(images) == 4)
        batch = [images] if single else list(images)
        if not batch:
            raise ValueError("no images")
        for image in batch:
            h, w = (np.shape(image) + (1, 1))[:2]  # checked before any copy is made
            if h * w > self.max_pixels:
                raise ValueError(
                    f"image of {h} x {w} pixels is larger than max_pixels={self.max_pixels} (the model runs at "
                    "the reference's test size, short side 640 and long side <= 2560): resize it first, e.g. "
                    "Predictor(..., resize=(640, 2560)), or raise max_pixels")
        batch = [as_rgb_uint8(image) for image in batch]
        if len({image.shape for image in batch}) > 1:
            raise ValueError(f"a batch must hold images of one padded shape; got {sorted({i.shape for i in batch})}")
        if resized_hw is None:
            sizes = [batch[0].shape[:2]] * len(batch)
        else:
            sizes = [resized_hw] if single else list(resized_hw)
            if len(sizes) != len(batch):
                raise ValueError(f"{len(sizes)} resized sizes for {len(batch)} images")
            sizes = [_check_hw(hw, "resized_hw") for hw in sizes]
        for hw in sizes:
            if hw[0] > batch[0].shape[0] or hw[1] > batch[0].shape[1]:
                raise ValueError(f"resized_hw {hw} exceeds the image {batch[0].shape[:2]}")
        return np.stack(batch), np.asarray(sizes, np.int32)

    # -- the pieces (for sweeps and mining) --------------------------------------------------

    def proposals(self, images, class_names: Sequence[str], resized_hw=None) -> Proposals:
        """The segmenter's proposals of one padded image (`[Q, ...]` arrays) or a batch (`[B, Q, ...]`)."""
        batch, sizes = self._images(images, resized_hw)
        seg_graph, seg_state = inference_split(self.segmenter)
        out = _proposals_jit(seg_graph, seg_state, jnp.asarray(batch, jnp.float32),
                             self.text_bank(check_class_names(class_names)), jnp.asarray(sizes))
        return Proposals(*(x[0] for x in out)) if np.ndim(images) == 3 else out

    def classify_crops(self, images, mask_probs: jax.Array, class_names: Sequence[str],
                       mask_threshold: float | None = None,
                       pred_logits: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """CLIP on the masked crops of `proposals(...).mask_probs` -> (`[(B,) Q, C+1]` logits with a
        zero non-object column, `[(B,) Q]` valid). With `clip_top_k` set, `pred_logits`
        (`proposals(...).pred_logits`) is required: the segmenter ranks the proposals, and the
        rows CLIP skips are zero (`filtered_clip_logits`)."""
        if self.clip_top_k is not None and pred_logits is None:
            raise ValueError("this Predictor has clip_top_k set: pass pred_logits=proposals.pred_logits to "
                             "classify_crops (the segmenter's scores choose the proposals CLIP sees)")
        batch, _ = self._images(images, None)
        single = mask_probs.ndim == 3
        add_batch = (lambda x: x[None]) if single else (lambda x: x)
        clip_graph, clip_state = inference_split(self.clip.model)
        logits, valid = _crops_jit(clip_graph, clip_state, jnp.asarray(batch, jnp.float32), add_batch(mask_probs),
                                   None if self.clip_top_k is None else add_batch(pred_logits),
                                   self.text_bank(check_class_names(class_names)),
                                   mask_threshold=self.mask_threshold if mask_threshold is None else mask_threshold,
                                   mask_prompts=self.mask_prompts, crop=self.crop, top_k=self.clip_top_k)
        return (logits[0], valid[0]) if single else (logits, valid)

    # -- predictions -------------------------------------------------------------------------

    def _batch_scores(self, batch: np.ndarray, sizes: np.ndarray, names: list[str], num_named: int) -> jax.Array:
        """-> `[B, Hp, Wp, Cp]` scores over the padded class list (`class_bucket`); columns from
        `len(names)` on are padding."""
        if self.proposal_source != "maskformer":
            return self.sam.batch_scores(self, batch, sizes, names, num_named)
        seg_graph, seg_state = inference_split(self.segmenter)
        clip_graph, clip_state = inference_split(self.clip.model)
        return _scores_jit(seg_graph, seg_state, clip_graph, clip_state, jnp.asarray(batch, jnp.float32),
                           pad_classes(self.text_bank(names), self.class_bucket), jnp.asarray(sizes),
                           jnp.int32(len(names)), jnp.int32(num_named), jnp.float32(self.mask_threshold),
                           jnp.float32(self.ensemble_weight or 0.0), use_clip=self.ensemble_weight is not None,
                           mask_prompts=self.mask_prompts, mode=self.mode, crop=self.crop, top_k=self.clip_top_k)

    def scores(self, image, class_names: Sequence[str], resized_hw: tuple[int, int] | None = None) -> jax.Array:
        """`[Hp, Wp, 3]` uint8 resized (+ padded) image -> `[Hp, Wp, C]` scores (0 outside `resized_hw`).
        In demo mode with one class name, C = 2 (the name and "others")."""
        names, num_named = self._names(class_names)
        batch, sizes = self._images(image, resized_hw)
        return self._batch_scores(batch, sizes, names, num_named)[0, ..., :len(names)]

    def predict_batch(self, images, class_names: Sequence[str], *, resized_hw=None,
                      original_hw=None) -> list[Segmentation]:
        """A batch of padded images of one shape `[B, Hp, Wp, 3]` (or a list), their resized sizes
        (default: the whole padded image) and original sizes (default: the resized ones) -> one
        `Segmentation` per image, at its original size. One device call for the whole batch."""
        names, num_named = self._names(class_names)
        batch, sizes = self._images(images, resized_hw)
        original = sizes if original_hw is None else np.asarray([_check_hw(hw, "original_hw") for hw in original_hw],
                                                                np.int32)
        if len(original) != len(batch):
            raise ValueError(f"{len(original)} original sizes for {len(batch)} images")
        scores = self._batch_scores(batch, sizes, names, num_named)
        labels, confidence = _batch_labels(scores, jnp.asarray(sizes), jnp.asarray(original), jnp.int32(len(names)),
                                           jnp.int32(num_named), out_hw=output_bucket(original),
                                           unlabeled=self.mode == "demo")
        labels, confidence = np.asarray(labels), np.asarray(confidence)
        return [Segmentation(labels[i, :h, :w], confidence[i, :h, :w]) for i, (h, w) in enumerate(original)]

    def predict(self, image, class_names: Sequence[str], *, resized_hw: tuple[int, int] | None = None,
                original_hw: tuple[int, int] | None = None) -> np.ndarray:
        """-> `[H0, W0]` int32 class indices into `class_names` at the original resolution
        (`UNLABELED` where demo mode labels nothing).

        `original_hw` defaults to `resized_hw`, or with `resize` set and no `resized_hw`, to the size
        of the image, which is then resized as reference 1.1 before the model sees it."""
        return self.segment(image, class_names, resized_hw=resized_hw, original_hw=original_hw).labels

    def segment(self, image, class_names: Sequence[str], *, resized_hw: tuple[int, int] | None = None,
                original_hw: tuple[int, int] | None = None) -> Segmentation:
        """`predict` with the winning score of each pixel."""
        if resized_hw is None and self.resize is not None:
            image = as_rgb_uint8(image)
            original_hw = image.shape[:2] if original_hw is None else original_hw
            image = resize_image(image, reference_resized_hw(*image.shape[:2], *self.resize))
        resized_hw = None if resized_hw is None else [resized_hw]
        original_hw = resized_hw if original_hw is None else [original_hw]
        return self.predict_batch([image], class_names, resized_hw=resized_hw, original_hw=original_hw)[0]
