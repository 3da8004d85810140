"""MaskFormer set-prediction losses with deep supervision (reference 3.3), fully on device.

For the final decoder output and each auxiliary one: Hungarian matching on the cost of reference
3.2 (no gradient; all outputs matched in one batched call), then
- `loss_ce`: cross-entropy over all queries, unmatched ones target the non-object class (the last
  logit), class weight `no_object_weight` for it, torch's weighted-mean reduction;
- `loss_mask`: sigmoid focal loss (alpha 0.25, gamma 2) of each matched mask, upsampled bilinearly
  to the target resolution, mean over pixels, summed over matches / `num_masks`;
- `loss_dice`: dice loss of each matched mask, summed / `num_masks`;
with `num_masks` = the number of valid ground-truth masks in the batch (at least 1).

The mask terms are taken at the full target resolution, as the original does (point sampling is
Mask2Former's, not MaskFormer's). That is most of the loss's work, so it is organised for speed
without changing the value or the gradient:
- one pass over the full-resolution pixels computes the focal and dice terms of every decoder
  output *and* their gradient with respect to the matched stride-4 logits (`jax.custom_vjp`): the
  backward pass only scales that stored low-resolution gradient, nothing full-resolution is kept
  for it or recomputed;
- the pass runs over the ground-truth slots a few at a time, in a `lax.while_loop` that stops
  after the last valid slot of the batch: the padding slots after it (the data pipeline puts the
  valid masks first and pads to `max_masks`) cost nothing;
- when the target size is an integer multiple f of the prediction size (stride-4 predictions of an
  input padded to a multiple of 32), the bilinear upsample is evaluated phase by phase: output
  pixel (f·i + r, f·j + s) is a blend of low-resolution pixel (i, j) with its neighbours with
  fixed weights, compared with the same phase of the target; no interleaved full-resolution
  array is built. Other sizes go through `image_ops.resize_bilinear`.

Called under `jax.jit` on global (sharded) arrays, every sum over the batch axis is a sum over the
global batch, which is what the original's all-reduced `num_masks` plus DDP gradient averaging
amounts to. (The CE's weighted mean is likewise taken over the global batch, where DDP averages
per-device weighted means; the two agree when the devices hold equal numbers of matches.) Inside
`shard_map` pass `axis_name` to `psum` the sums instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ovseg_jax.losses.matcher import LossWeights, hungarian_match, matching_cost, sigmoid_and_softplus
from ovseg_jax.utils.image_ops import resize_bilinear

__all__ = ["LossWeights", "maskformer_loss", "mask_loss_sums"]

FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0
# Ground-truth slots per image handled by one iteration of the full-resolution loop; with 6 decoder
# outputs, batch 4 per device and 640 px targets an iteration works on 6·4·4·640² ≈ 40M pixels.
MASK_CHUNK = 4


def _psum(x: jax.Array, axis_name: str | None) -> jax.Array:
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def _match_outputs(per_output: list[dict], targets: dict, weights: LossWeights) -> jax.Array:
    """Matching of every decoder output, without gradient, as one batched `hungarian_match` (one
    loop on the device instead of one per output) -> query_index `[L, B, G]`."""
    costs = jnp.stack([matching_cost(jax.lax.stop_gradient(out["pred_logits"]),
                                     jax.lax.stop_gradient(out["pred_masks"]), targets, weights)
                       for out in per_output])  # [L, B, Q, G]
    layers, batch, queries, gts = costs.shape
    query_index, _ = hungarian_match(costs.reshape(layers * batch, queries, gts),
                                     jnp.tile(targets["valid"], (layers, 1)))
    return query_index.reshape(layers, batch, gts)


def _class_sums(pred_logits: jax.Array, query_index: jax.Array, gt_classes: jax.Array, valid: jax.Array,
                no_object_weight: float) -> jax.Array:
    """Weighted CE of one decoder output: pred_logits `[B, Q, C+1]`, query_index `[B, G]` the query
    matched to each ground-truth slot -> `[2]`: sum of weighted NLLs, sum of class weights."""
    batch, _, num_logits = pred_logits.shape
    no_object = num_logits - 1  # unmatched queries -> non-object (the last logit)
    rows = jnp.arange(batch)[:, None]
    target_classes = jnp.full(pred_logits.shape[:2], no_object, jnp.int32)
    target_classes = target_classes.at[rows, query_index].set(jnp.where(valid, gt_classes, no_object))
    log_probs = jax.nn.log_softmax(pred_logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, target_classes[..., None], axis=-1)[..., 0]
    class_weight = jnp.where(target_classes == no_object, no_object_weight, 1.0)
    return jnp.stack([jnp.sum(class_weight * nll), jnp.sum(class_weight)])


# ---------------------------------------------------------------------------------------------
# Full-resolution focal + dice terms with their gradient in the same pass


def _upsample_phases(logits: jax.Array, factor: int) -> jax.Array:
    """torch `interpolate(mode="bilinear", align_corners=False)` by an integer `factor` f, by phase:
    `[..., h, w]` -> `[..., f, f, h, w]` with output pixel (f·i + r, f·j + s) at `[..., r, s, i, j]`.

    Along an axis, phase r of pixel i is `x[i] + |d| (x[i - 1 or i + 1] - x[i])` with
    `d = (2r + 1 - f) / 2f` (the source offset; negative blends with the previous pixel), border
    pixels repeated (torch clamps the source index)."""
    def phases(x, axis):
        n = x.shape[axis]
        first = jax.lax.slice_in_dim(x, 0, 1, axis=axis)
        last = jax.lax.slice_in_dim(x, n - 1, n, axis=axis)
        prev = jnp.concatenate([first, jax.lax.slice_in_dim(x, 0, n - 1, axis=axis)], axis=axis)
        nxt = jnp.concatenate([jax.lax.slice_in_dim(x, 1, n, axis=axis), last], axis=axis)
        offsets = [(2 * r + 1 - factor) / (2 * factor) for r in range(factor)]
        return jnp.stack([x + abs(d) * ((prev if d < 0 else nxt) - x) for d in offsets], axis=-3)

    return phases(phases(logits, logits.ndim - 2), logits.ndim)  # rows [..., f, h, w], then columns


def _target_phases(targets: jax.Array, factor: int) -> jax.Array:
    """`[..., f·h, f·w]` -> `[..., f, f, h, w]`, the pixel layout of `_upsample_phases`."""
    *lead, height, width = targets.shape
    t = targets.reshape(*lead, height // factor, factor, width // factor, factor)
    n = t.ndim
    return t.transpose(*range(n - 4), n - 3, n - 1, n - 4, n - 2)


def _upsample_and_targets(logits: jax.Array, targets: jax.Array):
    """Matched logits `[..., h, w]` and 0/1 targets `[..., H, W]` -> (upsample function, targets
    rearranged like its output): the upsample gives `[..., f, f, h, w]` phases when H, W are f·h, f·w
    (integer f), else the `[..., 1, 1, H, W]` resized map."""
    (h, w), (height, width) = logits.shape[-2:], targets.shape[-2:]
    factor = height // h
    if height == factor * h and width == factor * w:
        return (lambda x: _upsample_phases(x, factor)), _target_phases(targets, factor)
    return (lambda x: resize_bilinear(x, (height, width), axes=(-2, -1))[..., None, None, :, :],
            targets[..., None, None, :, :])


def _chunk_terms(logits: jax.Array, targets: jax.Array, with_grad: bool):
    """Focal and dice terms of matched masks: logits `[L, B, c, h, w]` (float32), targets
    `[B, c, H, W]` 0/1 -> (focal `[L, B, c]` (mean over pixels), dice `[L, B, c]`, and with
    `with_grad` their gradients w.r.t. `logits`, each `[L, B, c, h, w]`)."""
    upsample, t = _upsample_and_targets(logits, targets)
    t = t.astype(jnp.float32)
    x = upsample(logits)  # [L, B, c, f, f, h, w]
    pixels = targets.shape[-1] * targets.shape[-2]
    reduce = lambda a: jnp.sum(a, axis=(-4, -3, -2, -1))  # noqa: E731  (over the pixels of each mask)
    prob, softplus, softplus_neg, e = sigmoid_and_softplus(x)
    # Focal loss, with z = x for negatives and -x for positives: BCE = softplus(z), 1 - p_t = sigmoid(z).
    positive = t > 0
    bce = jnp.where(positive, softplus_neg, softplus)
    one_minus_pt = jnp.where(positive, 1 - prob, prob)
    alpha_t = jnp.where(positive, FOCAL_ALPHA, 1 - FOCAL_ALPHA)
    modulator = one_minus_pt**FOCAL_GAMMA
    focal = reduce(alpha_t * bce * modulator) / pixels
    # Dice: 1 - N / D with N = 2 Σ p t + 1, D = Σ p + Σ t + 1.
    numerator = 2 * reduce(prob * t) + 1
    denominator = reduce(prob) + reduce(t) + 1
    dice = 1 - numerator / denominator
    if not with_grad:
        return focal, dice
    # d focal / dz = alpha_t (1 - p_t)^gamma ((1 - p_t) + gamma BCE p_t); dz/dx = -1 for positives.
    d_focal = alpha_t * modulator * (one_minus_pt + FOCAL_GAMMA * bce * (1 - one_minus_pt))
    d_focal = jnp.where(positive, -d_focal, d_focal) / pixels
    # d dice / dp = N / D^2 - 2 t / D; dp/dx = p (1 - p) = e / (1 + e)^2.
    expand = lambda a: a[..., None, None, None, None]  # noqa: E731
    sigmoid_slope = e / (1 + e) ** 2
    d_dice = (expand(numerator / denominator**2) - expand(2 / denominator) * t) * sigmoid_slope
    _, transpose = jax.vjp(upsample, logits)  # the upsample is linear: its VJP is its transpose
    return focal, dice, transpose(d_focal)[0], transpose(d_dice)[0]


def _mask_loss_loop(matched: jax.Array, gt_masks: jax.Array, valid: jax.Array, with_grad: bool):
    """The loop over chunks of ground-truth slots -> (focal sums `[L]`, dice sums `[L]`[, gradient
    `[2, L, B, G, h, w]` of the focal and dice sums w.r.t. `matched`]). It stops after the chunk
    holding the last valid slot of the batch (the data pipeline puts the valid slots first)."""
    layers, batch, gts, h, w = matched.shape
    chunk = max(c for c in range(1, MASK_CHUNK + 1) if gts % c == 0)  # chunks tile the slots exactly
    slots_in_use = jnp.max(jnp.where(valid, jnp.arange(1, gts + 1), 0), initial=0)

    def body(i, carry):
        start = i * chunk
        keep = jax.lax.dynamic_slice_in_dim(valid, start, chunk, axis=1).astype(jnp.float32)  # [B, c]
        terms = _chunk_terms(jax.lax.dynamic_slice_in_dim(matched, start, chunk, axis=2),
                             jax.lax.dynamic_slice_in_dim(gt_masks, start, chunk, axis=1), with_grad)
        sums = (carry[0] + jnp.sum(terms[0] * keep, axis=(1, 2)), carry[1] + jnp.sum(terms[1] * keep, axis=(1, 2)))
        if not with_grad:
            return sums
        grads = jnp.stack(terms[2:]) * keep[None, None, :, :, None, None]  # [2, L, B, c, h, w]
        return sums + (jax.lax.dynamic_update_index_in_dim(carry[2], grads, i, axis=0),)

    # `*_like` of the input: the carries then vary over the same `shard_map` axes as the body's results.
    zeros = jnp.zeros_like(matched, shape=(layers,))
    init = (zeros, zeros)
    if with_grad:  # chunk-major, so that each iteration writes one contiguous block
        init += (jnp.zeros_like(matched, shape=(gts // chunk, 2, layers, batch, chunk, h, w)),)
    out = jax.lax.fori_loop(0, (slots_in_use + chunk - 1) // chunk, body, init)
    if not with_grad:
        return out
    focal, dice, grads = out  # grads [G / c, 2, L, B, c, h, w] -> [2, L, B, G, h, w]
    return focal, dice, grads.transpose(1, 2, 3, 0, 4, 5, 6).reshape(2, layers, batch, gts, h, w)


@jax.custom_vjp
def mask_loss_sums(matched: jax.Array, gt_masks: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sums over valid matches of the focal and dice losses at the target resolution.

    matched `[L, B, G, h, w]` float32 mask logits of the query matched to each ground-truth slot
    (L decoder outputs), gt_masks `[B, G, H, W]` 0/1, valid `[B, G]` bool -> (focal sum `[L]`, dice
    sum `[L]`): `Σ_{valid (b, g)} mean_pixels focal(up(matched[l, b, g]), gt[b, g])` and likewise the
    dice loss, `up` = torch's bilinear upsample to `H, W` (align_corners=False). Differentiable in
    `matched` (the gradient is computed in the forward pass, see the module docstring)."""
    return _mask_loss_loop(matched, gt_masks, valid, with_grad=False)


def _mask_loss_sums_fwd(matched, gt_masks, valid):
    focal, dice, grads = _mask_loss_loop(matched, gt_masks, valid, with_grad=True)
    return (focal, dice), grads


def _mask_loss_sums_bwd(grads, cotangents):
    d_focal, d_dice = cotangents  # [L] each
    return (d_focal[:, None, None, None, None] * grads[0] + d_dice[:, None, None, None, None] * grads[1],
            None, None)


mask_loss_sums.defvjp(_mask_loss_sums_fwd, _mask_loss_sums_bwd)


# ---------------------------------------------------------------------------------------------


def _check_shapes(per_output: list[dict], targets: dict) -> None:
    """Clear errors for inputs that do not fit the documented layout (trace-time, shapes only)."""
    missing = sorted({"masks", "classes", "valid"} - set(targets))
    if missing:
        raise ValueError(f"maskformer_loss: targets lack {missing}; expected masks [B, G, H, W], classes [B, G], "
                         "valid [B, G]")
    logits, masks = per_output[0]["pred_logits"], per_output[0]["pred_masks"]
    if logits.ndim != 3 or masks.ndim != 4 or masks.shape[:2] != logits.shape[:2]:
        raise ValueError(f"maskformer_loss: expected pred_logits [B, Q, C+1] and pred_masks [B, Q, h, w]; got "
                         f"{logits.shape} and {masks.shape}")
    for i, out in enumerate(per_output[1:]):
        if out["pred_logits"].shape != logits.shape or out["pred_masks"].shape != masks.shape:
            raise ValueError(f"maskformer_loss: aux[{i}] has shapes {out['pred_logits'].shape}, "
                             f"{out['pred_masks'].shape}; expected those of the final output {logits.shape}, "
                             f"{masks.shape}")
    batch, gts = targets["valid"].shape
    if (batch != logits.shape[0] or targets["classes"].shape != (batch, gts) or targets["masks"].ndim != 4
            or targets["masks"].shape[:2] != (batch, gts)):
        raise ValueError(f"maskformer_loss: targets masks {targets['masks'].shape}, classes "
                         f"{targets['classes'].shape}, valid {targets['valid'].shape} do not fit masks [B, G, H, W], "
                         f"classes [B, G], valid [B, G] with B = {logits.shape[0]} from pred_logits")


def maskformer_loss(outputs: dict, targets: dict, *, weights: LossWeights = LossWeights(),
                    no_object_weight: float = 0.1, axis_name: str | None = None) -> tuple[jax.Array, dict]:
    """Deep-supervised MaskFormer loss -> (weighted total, metrics).

    outputs: the segmenter's `{"pred_logits" [B, Q, C+1], "pred_masks" [B, Q, h, w], "aux": [...]}`.
    targets: `{"masks": [B, G, H, W] 0/1, "classes": [B, G] int, "valid": [B, G] bool}`.
    Metrics hold the unweighted terms: `loss_ce`, `loss_mask`, `loss_dice` for the final output and
    `loss_ce_{i}`, ... for auxiliary output i.
    """
    per_output = [outputs] + list(outputs.get("aux", []))
    _check_shapes(per_output, targets)
    valid = targets["valid"]
    num_masks = jnp.maximum(_psum(jnp.sum(valid.astype(jnp.float32)), axis_name), 1.0)
    query_index = _match_outputs(per_output, targets, weights)  # [L, B, G]
    class_sums = jax.vmap(_class_sums, in_axes=(0, 0, None, None, None))(
        jnp.stack([out["pred_logits"] for out in per_output]), query_index, targets["classes"], valid,
        no_object_weight)  # [L, 2]
    pred_masks = jnp.stack([out["pred_masks"] for out in per_output])  # [L, B, Q, h, w]
    matched = jnp.take_along_axis(pred_masks, query_index[..., None, None], axis=2)  # [L, B, G, h, w]
    focal, dice = mask_loss_sums(matched.astype(jnp.float32), targets["masks"], valid)
    sums = _psum(jnp.concatenate([class_sums, focal[:, None], dice[:, None]], axis=1), axis_name)  # [L, 4]
    loss_ce, loss_mask, loss_dice = sums[:, 0] / sums[:, 1], sums[:, 2] / num_masks, sums[:, 3] / num_masks
    total = jnp.sum(weights.ce * loss_ce + weights.mask * loss_mask + weights.dice * loss_dice)
    metrics: dict[str, jax.Array] = {}
    for i in range(len(per_output)):
        suffix = "" if i == 0 else f"_{i - 1}"
        metrics.update({"loss_ce" + suffix: loss_ce[i], "loss_mask" + suffix: loss_mask[i],
                        "loss_dice" + suffix: loss_dice[i]})
    return total, metrics
