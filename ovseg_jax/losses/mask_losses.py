"""MaskFormer set-prediction losses with deep supervision (reference 3.3), fully on device.

For the final decoder output and each auxiliary one: Hungarian matching on the cost of reference
3.2 (no gradient; all outputs matched in one batched call), then
- `loss_ce`: cross-entropy over all queries, unmatched ones target the non-object class (the last
  logit), class weight `no_object_weight` for it, torch's weighted-mean reduction;
- `loss_mask`: sigmoid focal loss (alpha 0.25, gamma 2) of each matched mask, upsampled bilinearly
  to the target resolution, mean over pixels, summed over matches / `num_masks`;
- `loss_dice`: dice loss of each matched mask, summed / `num_masks`;
with `num_masks` = the number of valid ground-truth masks in the batch (at least 1).

Called under `jax.jit` on global (sharded) arrays, every sum over the batch axis is a sum over the
global batch, which is what the original's all-reduced `num_masks` plus DDP gradient averaging
amounts to. (The CE's weighted mean is likewise taken over the global batch, where DDP averages
per-device weighted means; the two agree when the devices hold equal numbers of matches.) Inside
`shard_map` pass `axis_name` to `psum` the sums instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ovseg_jax.image_ops import resize_bilinear
from ovseg_jax.losses.matcher import LossWeights, hungarian_match, matching_cost

__all__ = ["LossWeights", "maskformer_loss", "sigmoid_focal_loss", "dice_loss"]


def sigmoid_focal_loss(logits: jax.Array, targets: jax.Array, alpha: float = 0.25, gamma: float = 2.0) -> jax.Array:
    """`[..., H, W]` logits and 0/1 targets -> `[...]` focal loss, mean over the pixels."""
    prob = jax.nn.sigmoid(logits)
    ce = jax.nn.softplus(logits) - logits * targets  # BCE with logits
    one_minus_p_t = prob + targets - 2 * prob * targets
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return jnp.mean(alpha_t * ce * one_minus_p_t**gamma, axis=(-2, -1))


def dice_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """`[..., H, W]` logits and 0/1 targets -> `[...]` `1 - (2 Σ σ·t + 1) / (Σ σ + Σ t + 1)`."""
    prob = jax.nn.sigmoid(logits)
    numerator = 2 * jnp.sum(prob * targets, axis=(-2, -1))
    return 1 - (numerator + 1) / (jnp.sum(prob, axis=(-2, -1)) + jnp.sum(targets, axis=(-2, -1)) + 1)


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


def _output_sums(pred_logits: jax.Array, pred_masks: jax.Array, query_index: jax.Array, targets: dict,
                 no_object_weight: float) -> jax.Array:
    """Unnormalised loss sums of one decoder output: pred_logits `[B, Q, C+1]`, pred_masks
    `[B, Q, h, w]` logits, query_index `[B, G]` the query matched to each ground-truth slot ->
    `[4]`: weighted CE sum, sum of CE weights, focal sum, dice sum over valid matches."""
    gt_masks, gt_classes, valid = targets["masks"], targets["classes"], targets["valid"]
    batch, _, num_logits = pred_logits.shape

    # Classification: every query, unmatched ones -> non-object (the last logit).
    no_object = num_logits - 1
    rows = jnp.arange(batch)[:, None]
    target_classes = jnp.full(pred_logits.shape[:2], no_object, jnp.int32)
    target_classes = target_classes.at[rows, query_index].set(jnp.where(valid, gt_classes, no_object))
    log_probs = jax.nn.log_softmax(pred_logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, target_classes[..., None], axis=-1)[..., 0]
    class_weight = jnp.where(target_classes == no_object, no_object_weight, 1.0)

    # Masks: matched predictions upsampled to the target resolution.
    matched = jnp.take_along_axis(pred_masks, query_index[:, :, None, None], axis=1)  # [B, G, h, w]
    logits = resize_bilinear(matched.astype(jnp.float32), gt_masks.shape[-2:], axes=(-2, -1))
    target = gt_masks.astype(jnp.float32)
    focal = jnp.sum(jnp.where(valid, sigmoid_focal_loss(logits, target), 0))
    dice = jnp.sum(jnp.where(valid, dice_loss(logits, target), 0))
    return jnp.stack([jnp.sum(class_weight * nll), jnp.sum(class_weight), focal, dice])


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
    num_masks = jnp.maximum(_psum(jnp.sum(targets["valid"].astype(jnp.float32)), axis_name), 1.0)
    query_index = _match_outputs(per_output, targets, weights)
    stacked = (jnp.stack([out["pred_logits"] for out in per_output]),
               jnp.stack([out["pred_masks"] for out in per_output]), query_index)
    # One output at a time, recomputed in the backward pass: the full-resolution upsampled masks
    # ([B, G, H, W] per output) are never held for all outputs at once.
    sums = jax.lax.map(jax.checkpoint(lambda args: _output_sums(*args, targets, no_object_weight)), stacked)
    sums = _psum(sums, axis_name)  # [L, 4]
    loss_ce, loss_mask, loss_dice = sums[:, 0] / sums[:, 1], sums[:, 2] / num_masks, sums[:, 3] / num_masks
    total = jnp.sum(weights.ce * loss_ce + weights.mask * loss_mask + weights.dice * loss_dice)
    metrics: dict[str, jax.Array] = {}
    for i in range(len(per_output)):
        suffix = "" if i == 0 else f"_{i - 1}"
        metrics.update({"loss_ce" + suffix: loss_ce[i], "loss_mask" + suffix: loss_mask[i],
                        "loss_dice" + suffix: loss_dice[i]})
    return total, metrics
