"""Optimiser from config tables: AdamW, the two reference schedules, torch-style global-norm
clipping, and per-parameter learning-rate / weight-decay multipliers and freezing given as
`(regex, value)` tables matched (`re.search`) against parameter paths such as
`visual/transformer/resblocks/3/ln_1/scale`.

Parameters are flat dicts `{path: array}` (see `ovseg_jax.train`). Frozen parameters are not
given to the optimiser at all (no Adam moments, no gradient), so they stay bit-identical.

Config fields (`config.optim`; declared in `ovseg_jax.configs.OPTIM`):
  lr, b1, b2, eps, weight_decay          AdamW (decoupled decay, as torch.optim.AdamW)
  schedule: {kind: "warmup_poly" | "warmup_cosine" | "constant", warmup_steps,
             power (poly, 0.9), warmup_factor (poly, 1e-6)}; it runs over `config.total_steps`
  grad_clip_norm: 0 / None for none, else the max global L2 norm over all trained parameters
  lr_mults: [(regex, multiplier)]     first match wins; default 1
  wd_mults: [(regex, multiplier)]     first match wins; default 1 (0 excludes from decay)
  freeze:   [regex]                   matching parameters are not trained
  trainable: [regex] | None           if given, only matching parameters train (then `freeze`)
Every table goes through `ovseg_jax.configs.match_rules`: a rule that matches no parameter of the
model is an error.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ovseg_jax.configs import match_rules

Schedule = Callable[[Any], Any]


def warmup_poly(base_lr: float, warmup_steps: int, total_steps: int, power: float = 0.9,
                warmup_factor: float = 1e-6) -> Schedule:
    """detectron2/MaskFormer `WarmupPolyLR` (reference 3.4): `base * w(t) * (1 - t/total)^power`,
    `w = warmup_factor * (1 - a) + a`, `a = t / warmup` during warmup, 1 after."""

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        alpha = t / max(warmup_steps, 1)
        w = jnp.where(t < warmup_steps, warmup_factor * (1 - alpha) + alpha, 1.0)
        return base_lr * w * (jnp.maximum(total_steps - t, 0.0) / total_steps) ** power

    return schedule


def warmup_cosine(base_lr: float, warmup_steps: int, total_steps: int) -> Schedule:
    """open_clip `cosine_lr` (reference 4.2): `base * (t + 1) / warmup` for `t < warmup`, then
    `0.5 * (1 + cos(pi * (t - warmup) / (total - warmup))) * base`."""

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        warm = base_lr * (t + 1) / max(warmup_steps, 1)
        span = max(total_steps - warmup_steps, 1)
        # 0.5 (1 + cos(pi e / es)) == sin^2(pi/2 (es - e) / es), accurate in float32 near the end.
        cos = jnp.sin(0.5 * math.pi * (total_steps - t) / span) ** 2 * base_lr
        return jnp.where(t < warmup_steps, warm, cos)

    return schedule


def make_schedule(optim_cfg, total_steps: int) -> Schedule:
    """The learning-rate schedule of `config.optim` (base lr included) over `total_steps`
    (`config.total_steps`: the one source of the run's length)."""
    s = optim_cfg.schedule
    kind = s.kind
    if kind == "warmup_poly":
        return warmup_poly(optim_cfg.lr, s.warmup_steps, total_steps, s.get("power", 0.9),
                           s.get("warmup_factor", 1e-6))
    if kind == "warmup_cosine":
        return warmup_cosine(optim_cfg.lr, s.warmup_steps, total_steps)
    if kind == "constant":
        return lambda step: jnp.full((), optim_cfg.lr, jnp.float32)
    raise ValueError(f"config.optim.schedule.kind must be warmup_poly, warmup_cosine or constant; got {kind!r}")


class ClipState(NamedTuple):
    """Empty state of `clip_by_global_norm_torch`."""


def global_norm(tree) -> jax.Array:
    """L2 norm over every leaf, accumulated in float32."""
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """`torch.nn.utils.clip_grad_norm_`: scale by `min(1, max_norm / (norm + 1e-6))`.

    `update(..., grad_norm=n)` takes the updates' global norm when the caller already has it (the
    trainer computes it for its finiteness guard): inside the guard's `lax.cond` XLA cannot reuse
    the outer one and would read every gradient again."""

    def update(updates, state, params=None, *, grad_norm=None, **extra_args):
        del params, extra_args
        norm = global_norm(updates) if grad_norm is None else grad_norm
        scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
        return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state

    return optax.GradientTransformationExtraArgs(lambda params: ClipState(), update)


def trainable_paths(paths: Iterable[str], optim_cfg, *, log_matches: bool = False) -> list[str]:
    """Paths (all the model's) that train under `config.optim.trainable` / `freeze` (sorted)."""
    paths = sorted(paths)
    keep = optim_cfg.get("trainable")
    kept = (match_rules("optim.trainable", [(r, True) for r in keep], paths, False, log_matches=log_matches)
            if keep is not None else dict.fromkeys(paths, True))
    frozen = match_rules("optim.freeze", [(r, True) for r in optim_cfg.get("freeze") or ()], paths, False,
                         log_matches=log_matches)
    return [p for p in paths if kept[p] and not frozen[p]]


def param_groups(paths: Iterable[str], optim_cfg, *, log_matches: bool = False) -> dict[str, tuple[float, float]]:
    """`{path: (lr_multiplier, weight_decay_multiplier)}` from the config tables, for `paths`
    (all the model's parameters, so that a rule for frozen ones is no error)."""
    paths = list(paths)
    lr = match_rules("optim.lr_mults", optim_cfg.get("lr_mults"), paths, 1.0, log_matches=log_matches)
    wd = match_rules("optim.wd_mults", optim_cfg.get("wd_mults"), paths, 1.0, log_matches=log_matches)
    return {p: (float(lr[p]), float(wd[p])) for p in paths}


def make_optimizer(optim_cfg, groups: Mapping[str, tuple[float, float]], total_steps: int) -> optax.GradientTransformation:
    """AdamW with per-group lr/wd multipliers (+ optional torch-style clipping) over the trained
    parameters, `groups = {path: (lr_multiplier, wd_multiplier)}` (`param_groups` of them), with
    the schedule over `total_steps`."""
    schedule = make_schedule(optim_cfg, total_steps)
    labels = {p: f"lr{lr_m:g}_wd{wd_m:g}" for p, (lr_m, wd_m) in groups.items()}
    transforms = {}
    for lr_m, wd_m in set(groups.values()):
        lr = (lambda step, m=lr_m: schedule(step) * m) if lr_m != 1.0 else schedule
        transforms[f"lr{lr_m:g}_wd{wd_m:g}"] = optax.adamw(
            lr, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
            weight_decay=optim_cfg.weight_decay * wd_m)
    tx = optax.multi_transform(transforms, labels)
    if optim_cfg.get("grad_clip_norm"):
        tx = optax.chain(clip_by_global_norm_torch(optim_cfg.grad_clip_norm), tx)
    return tx


def describe(groups: Mapping[str, tuple[float, float]], num_frozen: int) -> str:
    """One line per parameter group of the trained `groups`: multipliers and tensor count, plus the frozen count."""
    lines = [f"frozen: {num_frozen} tensors, trained: {len(groups)} tensors"]
    for key in sorted(set(groups.values())):
        n = sum(1 for v in groups.values() if v == key)
        lines.append(f"  lr x{key[0]:g}, weight decay x{key[1]:g}: {n} tensors")
    return "\n".join(lines)
