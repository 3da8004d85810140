"""Resizes with PyTorch's exact semantics, as separable matrix products.

`jax.image.resize` differs from `torch.nn.functional.interpolate` (Keys a=-0.5 cubic, antialias
on downscale, half-pixel nearest). OVSeg's numbers depend on torch's variants, so we build the
`[out, in]` interpolation matrix of each axis on the host (static shapes) and apply it with an
einsum, which is exact, differentiable and fast on accelerators.

All functions resize the two axes given by `axes` (default: the last two spatial axes of an
NHWC array, i.e. `(-3, -2)`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_CUBIC_A = -0.75  # PyTorch's bicubic coefficient


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """Keys cubic convolution weights for the 4 taps at offsets -1, 0, 1, 2; t in [0, 1)."""
    a = _CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


@functools.lru_cache(maxsize=256)
def interpolation_matrix(in_size: int, out_size: int, mode: str) -> np.ndarray:
    """`[out_size, in_size]` float32 matrix `W` with `out = W @ in` along one axis.

    Modes follow `torch.nn.functional.interpolate(..., align_corners=False)` when the output
    size is given: `"bilinear"`, `"bicubic"` (A=-0.75, clamped border taps, no antialias),
    `"nearest"` (legacy: src = floor(dst * in / out)).
    """
    scale = in_size / out_size
    dst = np.arange(out_size, dtype=np.float64)
    w = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    if mode == "nearest":
        src = np.minimum(np.floor(dst * scale).astype(np.int64), in_size - 1)
        w[rows, src] = 1.0
    elif mode == "bilinear":
        src = np.maximum((dst + 0.5) * scale - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
        i1 = np.minimum(i0 + 1, in_size - 1)
        t = src - i0
        np.add.at(w, (rows, i0), 1.0 - t)
        np.add.at(w, (rows, i1), t)
    elif mode == "bicubic":
        src = (dst + 0.5) * scale - 0.5  # torch does not clamp the source index for cubic
        i0 = np.floor(src).astype(np.int64)
        weights = _cubic_weights(src - i0)
        for tap in range(4):
            idx = np.clip(i0 - 1 + tap, 0, in_size - 1)
            np.add.at(w, (rows, idx), weights[:, tap])
    else:
        raise ValueError(f"unknown resize mode {mode!r}; expected nearest, bilinear or bicubic")
    return w.astype(np.float32)


def resize(x: jax.Array, out_hw: tuple[int, int], mode: str, axes: tuple[int, int] = (-3, -2)) -> jax.Array:
    """Resize axes `axes` of `x` (NHWC by default) to `out_hw` with torch semantics."""
    ax_h, ax_w = (a % x.ndim for a in axes)
    in_h, in_w = x.shape[ax_h], x.shape[ax_w]
    out_h, out_w = out_hw
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    y = x.astype(dtype)
    # Equal sizes are an identity in every mode (the cubic weights are [0, 1, 0, 0] at t=0).
    if in_h != out_h:
        wh = jnp.asarray(interpolation_matrix(in_h, out_h, mode), dtype)
        y = jnp.moveaxis(jnp.tensordot(wh, y, axes=([1], [ax_h]), precision="highest"), 0, ax_h)
    if in_w != out_w:
        ww = jnp.asarray(interpolation_matrix(in_w, out_w, mode), dtype)
        y = jnp.moveaxis(jnp.tensordot(ww, y, axes=([1], [ax_w]), precision="highest"), 0, ax_w)
    return y


def resize_bilinear(x: jax.Array, out_hw: tuple[int, int], axes: tuple[int, int] = (-3, -2)) -> jax.Array:
    """torch `interpolate(mode="bilinear", align_corners=False)`."""
    return resize(x, out_hw, "bilinear", axes)


def resize_bicubic(x: jax.Array, out_hw: tuple[int, int], axes: tuple[int, int] = (-3, -2)) -> jax.Array:
    """torch `interpolate(mode="bicubic", align_corners=False)` (A=-0.75, no antialias)."""
    return resize(x, out_hw, "bicubic", axes)


def resize_nearest_torch(x: jax.Array, out_hw: tuple[int, int], axes: tuple[int, int] = (-3, -2)) -> jax.Array:
    """torch legacy `interpolate(mode="nearest")`: source index floor(dst * in / out)."""
    return resize(x, out_hw, "nearest", axes)
