"""PyTorch state dict <-> Flax NNX parameters, by name rules.

Our modules name their attributes after the PyTorch checkpoints they import (`ln_1`,
`attn.in_proj`, `mlp.c_fc`, ...), so one generic rule set converts every model:

| PyTorch key suffix           | NNX path suffix        | tensor                       |
|------------------------------|------------------------|------------------------------|
| `x.weight` (Linear, 2-D)     | `x.kernel`             | transposed `[in, out]`       |
| `x.weight` (Conv, 4-D)       | `x.kernel`             | `[out,in,kh,kw] -> [kh,kw,in,out]` |
| `x.weight` (norm, 1-D)       | `x.scale`              | as is                        |
| `x.weight` (Embedding)       | `x.embedding`          | as is                        |
| `x.in_proj_weight` / `_bias` | `x.in_proj.kernel/bias` | transposed / as is          |
| anything else                | same path              | as is                        |

Integer path parts (`resblocks.3`) are list indices. Where a suffix is ambiguous the target
model's own parameter tree decides.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ovseg_jax.convert.torch_io import CheckpointError
from ovseg_jax.models.layers import abstract_module

Path = tuple  # a path in the NNX state: tuple of str / int


def _parse(key: str) -> Path:
    return tuple(int(p) if p.isdigit() else p for p in key.split("."))


def _key(path: Path) -> str:
    return ".".join(str(p) for p in path)


def model_shapes(model: nnx.Module) -> dict[Path, tuple[int, ...]]:
    """Every parameter-like variable of `model` (Params and other non-RNG state) -> shape."""
    state = nnx.state(model, nnx.Not(nnx.RngState))
    return {tuple(path): tuple(v.shape) for path, v in nnx.to_flat_state(state)}


def _candidates(key: str, value: np.ndarray) -> list[tuple[Path, np.ndarray]]:
    path = _parse(key)
    stem, last = path[:-1], path[-1]
    if last == "in_proj_weight":
        return [(stem + ("in_proj", "kernel"), value.T)]
    if last == "in_proj_bias":
        return [(stem + ("in_proj", "bias"), value)]
    if last == "weight":
        cands = []
        if value.ndim == 2:
            cands.append((stem + ("kernel",), value.T))
            cands.append((stem + ("embedding",), value))
        elif value.ndim == 4:
            cands.append((stem + ("kernel",), value.transpose(2, 3, 1, 0)))
        elif value.ndim == 3:  # Conv1d [out, in, k] -> [k, in, out]
            cands.append((stem + ("kernel",), value.transpose(2, 1, 0)))
        elif value.ndim == 1:
            cands.append((stem + ("scale",), value))
        cands.append((path, value))
        return cands
    return [(path, value)]


def unfilled(build: Callable[[Any], nnx.Module]) -> nnx.Module:
    """`build(rngs)`'s module with every variable an uninitialised host buffer (`np.empty`: no random
    draws, no memory touched), for a loader that fills all of them (`torch_to_nnx` and
    `checkpoint.assign_params` raise on any left out; then `on_device`). A random initialisation
    thrown away by the loader took 19 s for the Swin-B segmenter + CLIP ViT-L/14 on 2 CPU cores."""
    model = abstract_module(build)
    for _, variable in nnx.to_flat_state(nnx.state(model)):
        variable.set_value(np.empty(variable.shape, variable.dtype))
    return model


def on_device(model: nnx.Module) -> nnx.Module:
    """`model` with its host buffers (numpy) replaced by JAX arrays, in place -> `model`."""
    nnx.update(model, jax.tree.map(jnp.asarray, nnx.state(model)))
    return model


def torch_to_nnx(state_dict: Mapping[str, np.ndarray], model: nnx.Module,
                 source: str = "checkpoint", ignore_missing: Iterable[str] = ()) -> None:
    """Copy a PyTorch-named state dict into `model` in place (float32 parameters).

    Raises `CheckpointError` listing every unexpected key, missing parameter and shape
    mismatch. `ignore_missing` lists NNX key prefixes that may stay at their initial values.
    """
    shapes = model_shapes(model)
    assigned: dict[Path, np.ndarray] = {}
    unexpected, bad_shapes = [], []
    for key, value in state_dict.items():
        value = np.asarray(value)
        cands = _candidates(key, value)
        hit = next(((p, v) for p, v in cands if p in shapes), None)
        if hit is None:
            unexpected.append(f"{key} {list(value.shape)}")
            continue
        path, arr = hit
        if tuple(arr.shape) != shapes[path]:
            bad_shapes.append(f"{key}: file {list(value.shape)} vs model {list(shapes[path])} "
                              f"(as {_key(path)})")
            continue
        assigned[path] = arr
    ignore = tuple(ignore_missing)
    missing = [_key(p) for p in shapes
               if p not in assigned and not (ignore and _key(p).startswith(ignore))]
    problems = []
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): " + _short(unexpected))
    if missing:
        problems.append(f"missing parameters ({len(missing)}): " + _short(missing))
    if bad_shapes:
        problems.append(f"shape mismatches ({len(bad_shapes)}): " + _short(bad_shapes))
    if problems:
        raise CheckpointError(f"{source}: does not fit the model:\n  " + "\n  ".join(problems))
    state = nnx.state(model, nnx.Not(nnx.RngState))
    flat = dict(nnx.to_flat_state(state))
    for path, arr in assigned.items():
        var = flat[path]
        var[...] = jnp.asarray(arr, dtype=var[...].dtype)
    nnx.update(model, nnx.from_flat_state(flat))


def nnx_to_torch(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's parameters as a PyTorch-named float32 state dict (inverse of `torch_to_nnx`)."""
    state = nnx.state(model, nnx.Not(nnx.RngState))
    out: dict[str, np.ndarray] = {}
    for path, var in nnx.to_flat_state(state):
        arr = np.asarray(var[...])
        stem, last = tuple(path[:-1]), path[-1]
        if stem and stem[-1] == "in_proj":
            key = _key(stem[:-1] + ("in_proj_weight" if last == "kernel" else "in_proj_bias",))
            out[key] = arr.T if last == "kernel" else arr
            continue
        if last == "kernel":
            arr = {2: lambda a: a.T, 4: lambda a: a.transpose(3, 2, 0, 1),
                   3: lambda a: a.transpose(2, 1, 0)}[arr.ndim](arr)
            out[_key(stem + ("weight",))] = arr
        elif last in ("scale", "embedding"):
            out[_key(stem + ("weight",))] = arr
        else:
            out[_key(tuple(path))] = arr
    return {k: np.array(v, order="C") for k, v in out.items()}


def _short(items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")
