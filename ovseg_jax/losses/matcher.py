"""Hungarian matching of queries to ground-truth masks, on device (reference 3.2).

The original runs `scipy.optimize.linear_sum_assignment` on the host for every image and every
decoder layer. `hungarian_match` solves the same problem exactly inside `jax.jit`: the
shortest-augmenting-path algorithm with row/column potentials (Kuhn-Munkres in O(G·Q²) per
image), one ground-truth row at a time, with `lax.while_loop`s over static shapes and `vmap`
over the batch. Padded ground truth (validity mask) gets zero cost against every query, which
cannot change the optimum of the valid rows because Q >= G.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ovseg_jax.utils.image_ops import resize_nearest_torch


_COST_LIMIT = 1e8


def _assign(cost: jax.Array) -> jax.Array:
    """`[n, m]` finite cost, n <= m -> `[n]` int32 column of each row in a minimum-cost assignment."""
    n, m = cost.shape
    dtype = cost.dtype
    # 1-based rows and columns; row 0 / column 0 are the algorithm's sentinels.
    a = jnp.zeros((n + 1, m + 1), dtype).at[1:, 1:].set(cost)
    inf = jnp.array(jnp.inf, dtype)
    columns = jnp.arange(m + 1)

    def zeros(shape, dtype=dtype):
        # `*_like` of the cost: loop carries then vary over the same `shard_map` axes as the cost.
        return jnp.zeros_like(cost, dtype, shape=shape)

    def add_row(i, carry):
        u, v, owner, way = carry  # owner[j]: row assigned to column j (0 = free)
        owner = owner.at[0].set(i)

        def searching(state):
            j0, _, used, _, _, _ = state
            # A free column is reached after at most m steps (n <= m); the bound only guards
            # against non-finite input reaching here.
            return (owner[j0] != 0) & ~used.all()

        def grow_tree(state):
            j0, minv, used, way, u, v = state
            used = used.at[j0].set(True)
            i0 = owner[j0]
            reduced = a[i0] - u[i0] - v
            better = ~used & (reduced < minv)
            minv = jnp.where(better, reduced, minv)
            way = jnp.where(better, j0, way)
            candidates = jnp.where(used | (columns == 0), inf, minv)
            j1 = jnp.argmin(candidates)
            delta = candidates[j1]
            u = u.at[owner].add(jnp.where(used, delta, 0))  # rows of used columns are distinct
            v = jnp.where(used, v - delta, v)
            minv = jnp.where(used, minv, minv - delta)
            return j1, minv, used, way, u, v

        start = (zeros((), jnp.int32), jnp.full_like(cost, jnp.inf, shape=(m + 1,)), zeros((m + 1,), bool), way, u, v)
        j0, _, _, way, u, v = jax.lax.while_loop(searching, grow_tree, start)

        def augment(state):
            j0, owner = state
            j1 = way[j0]
            return j1, owner.at[j0].set(owner[j1])

        _, owner = jax.lax.while_loop(lambda s: s[0] != 0, augment, (j0, owner))
        return u, v, owner, way

    init = (zeros((n + 1,)), zeros((m + 1,)), zeros((m + 1,), jnp.int32), zeros((m + 1,), jnp.int32))
    _, _, owner, _ = jax.lax.fori_loop(1, n + 1, add_row, init)
    owner = owner.at[0].set(0)  # the sentinel column still names the last row
    column_of_row = jnp.zeros(n + 1, jnp.int32).at[owner].set(columns.astype(jnp.int32))
    return column_of_row[1:] - 1


@jax.jit
def hungarian_match(cost: jax.Array, gt_valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Minimum-cost one-to-one matching of ground truth to queries, batched.

    cost: `[B, Q, G]` (query x ground truth; solved in at least float32), Q >= G. gt_valid: `[B, G]` bool.
    Returns `(query_index [B, G] int32, valid [B, G] bool)`: ground truth g of image b is matched
    to query `query_index[b, g]` when `valid[b, g]`; the entries of padded ground truth are
    arbitrary (but distinct) queries. Same optimum as `scipy.optimize.linear_sum_assignment`
    on the valid columns. Finite costs are clipped to +-1e8 and NaN/+-inf count as +1e8 (as
    transformers' matcher does: such pairs are matched only when nothing else is left); exactness
    holds for finite costs well inside float32 range.
    """
    if cost.ndim != 3 or gt_valid.shape != (cost.shape[0], cost.shape[2]):
        raise ValueError(f"hungarian_match expects cost [B, Q, G] and gt_valid [B, G]; got {cost.shape} and "
                         f"{gt_valid.shape}")
    b, q, g = cost.shape
    if q < g:
        raise ValueError(f"hungarian_match needs at least as many queries as ground-truth slots; got Q={q} < G={g}")
    # Non-finite costs (from a diverged model) become a large penalty so that the search stays
    # well-defined; the loss is non-finite then anyway and the trainer stops.
    cost = cost.astype(jnp.promote_types(cost.dtype, jnp.float32))  # potentials need >= float32
    cost = jnp.where(jnp.isfinite(cost), jnp.clip(cost, -_COST_LIMIT, _COST_LIMIT), _COST_LIMIT)
    rows = jnp.where(gt_valid[:, :, None], jnp.swapaxes(cost, 1, 2), 0)  # [B, G, Q]
    return jax.vmap(_assign)(rows), gt_valid


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """Weights of the class, sigmoid-focal mask and dice terms (costs and losses; reference 3.2-3.3)."""

    ce: float = 1.0
    mask: float = 20.0
    dice: float = 1.0


def sigmoid_and_softplus(logits: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Elementwise `(sigmoid(x), softplus(x), softplus(-x), e)` with `e = exp(-|x|)`, from one exp
    and one log1p, stable for any finite x. (`jax.nn.softplus` is a `logaddexp` that XLA CPU ran
    8x slower than this on 25M values; the mask costs and losses evaluate it on every pixel.)"""
    e = jnp.exp(-jnp.abs(logits))
    inv = 1 / (1 + e)
    log_term = jnp.log1p(e)
    sigmoid = jnp.where(logits >= 0, inv, e * inv)
    return sigmoid, jnp.maximum(logits, 0) + log_term, jnp.maximum(-logits, 0) + log_term, e


def pairwise_focal_cost(logits: jax.Array, targets: jax.Array, alpha: float = 0.25, gamma: float = 2.0) -> jax.Array:
    """`[Q, P]` mask logits, `[G, P]` 0/1 targets -> `[Q, G]` sigmoid focal loss, mean over the P pixels."""
    prob, softplus, softplus_neg, _ = sigmoid_and_softplus(logits)
    pos = alpha * (1 - prob) ** gamma * softplus_neg  # BCE with target 1
    neg = (1 - alpha) * prob**gamma * softplus  # BCE with target 0
    cost = (pos - neg) @ targets.T + neg.sum(-1)[:, None]  # = pos @ t.T + neg @ (1 - t).T
    return cost / logits.shape[-1]


def pairwise_dice_cost(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """`[Q, P]` mask logits, `[G, P]` 0/1 targets -> `[Q, G]` `1 - (2 Σ σ·t + 1) / (Σ σ + Σ t + 1)`."""
    prob = jax.nn.sigmoid(logits)
    numerator = 2 * prob @ targets.T
    denominator = prob.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def matching_cost(pred_logits: jax.Array, pred_masks: jax.Array, targets: dict,
                  weights: LossWeights = LossWeights()) -> jax.Array:
    """`[B, Q, G]` matching cost `w_ce·(-p[q, class_g]) + w_mask·focal + w_dice·dice` (reference 3.2).

    pred_logits `[B, Q, C+1]`, pred_masks `[B, Q, h, w]` logits; targets `{"masks": [B, G, H, W]
    0/1 (nearest-downsampled to `h, w` as the original), "classes": [B, G] int, ...}`. Columns of
    padded ground truth hold arbitrary values; `hungarian_match` ignores them.
    """
    gt_masks, gt_classes = targets["masks"], targets["classes"]
    h, w = pred_masks.shape[-2:]
    prob = jax.nn.softmax(pred_logits.astype(jnp.float32), axis=-1)
    class_cost = -jnp.take_along_axis(prob, gt_classes[:, None, :].astype(jnp.int32), axis=-1)  # [B, Q, G]
    targets = resize_nearest_torch(gt_masks.astype(jnp.float32), (h, w), axes=(-2, -1))
    targets = targets.reshape(*targets.shape[:2], -1)
    logits = pred_masks.astype(jnp.float32).reshape(*pred_masks.shape[:2], -1)
    focal = jax.vmap(pairwise_focal_cost)(logits, targets)
    dice = jax.vmap(pairwise_dice_cost)(logits, targets)
    return weights.ce * class_cost + weights.mask * focal + weights.dice * dice
