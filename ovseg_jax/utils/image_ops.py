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


def _cubic_weights(t):
    """Keys cubic convolution weights (a list of 4 arrays) for the taps at offsets -1, 0, 1, 2; t in [0, 1)."""
    a = _CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def _window_matrix(xp, start, length, in_size: int, out_size: int, mode: str, out_length=None):
    """`[out_size, in_size]` matrix resizing the window `[start, start + length)` of an axis of
    `in_size` to `out_length` (default `out_size`) samples (torch `interpolate(...,
    align_corners=False)` applied to the cropped window); rows from `out_length` to `out_size` are
    padding. `xp` is numpy (static sizes) or jax.numpy (traced `start`/`length`/`out_length`)."""
    dtype = xp.float64 if xp is np else xp.float32
    length = xp.asarray(length, dtype)
    scale = length / xp.asarray(out_size if out_length is None else out_length, dtype)
    dst = xp.arange(out_size, dtype=dtype)
    if mode == "nearest":
        taps = [xp.minimum(xp.floor(dst * scale), length - 1)]
        weights = [xp.ones_like(dst)]
    elif mode == "bilinear":
        src = xp.maximum((dst + 0.5) * scale - 0.5, 0.0)
        i0 = xp.minimum(xp.floor(src), length - 1)
        taps = [i0, xp.minimum(i0 + 1, length - 1)]
        weights = [1.0 - (src - i0), src - i0]
    elif mode == "bicubic":
        src = (dst + 0.5) * scale - 0.5  # torch does not clamp the source index for cubic
        i0 = xp.floor(src)
        cubic = _cubic_weights(src - i0)
        taps = [xp.clip(i0 - 1 + k, 0, length - 1) for k in range(4)]
        weights = cubic
    else:
        raise ValueError(f"unknown resize mode {mode!r}; expected nearest, bilinear or bicubic")
    positions = xp.arange(in_size, dtype=dtype)[None, :]
    offset = xp.asarray(start, dtype)
    return sum(w[:, None] * (positions == (t + offset)[:, None]) for t, w in zip(taps, weights))


@functools.lru_cache(maxsize=256)
def interpolation_matrix(in_size: int, out_size: int, mode: str) -> np.ndarray:
    """`[out_size, in_size]` float32 matrix `W` with `out = W @ in` along one axis.

    Modes follow `torch.nn.functional.interpolate(..., align_corners=False)` when the output
    size is given: `"bilinear"`, `"bicubic"` (A=-0.75, clamped border taps, no antialias),
    `"nearest"` (legacy: src = floor(dst * in / out)).
    """
    return _window_matrix(np, 0, in_size, in_size, out_size, mode).astype(np.float32)


def window_interpolation_matrix(start: jax.Array, length: jax.Array, in_size: int, out_size: int,
                                mode: str, out_length: jax.Array | None = None) -> jax.Array:
    """Traced variant for crops of data-dependent size: `[out_size, in_size]` float32 matrix that
    resizes the window `[start, start + length)` of an axis to `out_size` samples, or to a traced
    `out_length <= out_size` samples followed by padding rows (jit-able, static shapes)."""
    return _window_matrix(jnp, start, length, in_size, out_size, mode, out_length).astype(jnp.float32)


def resize(x: jax.Array, out_hw: tuple[int, int], mode: str, axes: tuple[int, int] = (-3, -2)) -> jax.Array:
    """Resize axes `axes` of `x` (NHWC by default) to `out_hw` with torch semantics."""
    ax_h, ax_w = (a % x.ndim for a in axes)
    in_h, in_w = x.shape[ax_h], x.shape[ax_w]
    out_h, out_w = out_hw
    if min(in_h, in_w, out_h, out_w) <= 0:
        raise ValueError(f"cannot resize {in_h}x{in_w} to {out_h}x{out_w}: both sizes must be positive")
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    y = x.astype(dtype)
    # Equal sizes are an identity in every mode (the cubic weights are [0, 1, 0, 0] at t=0).
    for axis, n_in, n_out in ((ax_h, in_h, out_h), (ax_w, in_w, out_w)):
        if n_in == n_out:
            continue
        matrix = interpolation_matrix(n_in, n_out, mode)
        if mode == "nearest":  # a gather of source indices: exact and cheap
            y = jnp.take(y, np.argmax(matrix, axis=1), axis=axis)
        else:
            y = jnp.moveaxis(jnp.tensordot(jnp.asarray(matrix, dtype), y, axes=([1], [axis]),
                                           precision="highest"), 0, axis)
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
