"""Small pieces shared by SAM's components (as `segment_anything/modeling/common.py`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ovseg_jax.models.layers import activation

LAYER_NORM_2D_EPS = 1e-6  # segment_anything's LayerNorm2d (the neck, mask downscaling, output upscaling)


def layer_norm(dim: int, *, eps: float, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm over the last (channel) axis with float32 parameters; on NHWC maps it is
    segment_anything's `LayerNorm2d`. The variance is `mean((x - mean)^2)` as in the reference:
    Flax's default `mean(x^2) - mean(x)^2` loses the variance of the mask downscaler's 4-channel
    maps to cancellation (1e-3 errors in the mask logits)."""
    return nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False, rngs=rngs)


class Buffer(nnx.Variable):
    """A fixed tensor stored in checkpoints and never trained (a PyTorch buffer)."""


class Activation(nnx.Module):
    """A parameter-free activation entry of a layer list (an `nn.GELU()` of an `nn.Sequential`)."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, x: jax.Array) -> jax.Array:
        return activation(self.name)(x)
