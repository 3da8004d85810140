"""MaskFormer's `BasePixelDecoder` (reference 1.3): a top-down FPN that turns backbone features
res2..res5 into per-pixel mask features at stride 4.

    y = ReLU(GN(conv3x3(res5)))                                      layer_4
    for res4, res3, res2:  y = GN(conv1x1(res_k)) + nearest(y, size of res_k)   adapter_k
                           y = ReLU(GN(conv3x3(y)))                              layer_k
    mask_features = conv3x3(y) + bias                                 (no norm, no activation)

Attribute names are the OVSeg checkpoint's (`sem_seg_head.pixel_decoder.adapter_1.weight`,
`.adapter_1.norm.weight`, `layer_4`, `mask_features`, ...), so conversion is a prefix table.
NHWC throughout.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ovseg_jax.models.layers import Conv
from ovseg_jax.utils.image_ops import resize_nearest_torch

GN_GROUPS = 32
GN_EPS = 1e-5
# detectron2's c2_xavier_fill: kaiming_uniform(a=1) = variance 1 / fan_in, uniform; bias 0.
_c2_xavier_fill = nnx.initializers.variance_scaling(1.0, "fan_in", "uniform")


class Conv2d(Conv):
    """detectron2 `Conv2d`: a stride-1 "same" convolution with an optional GroupNorm child `norm`
    (then without bias) and optional ReLU. `[B, H, W, Cin] -> [B, H, W, Cout]`."""

    def __init__(self, din: int, dout: int, kernel_size: int, *, norm: bool, relu: bool,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        pad = kernel_size // 2
        super().__init__(din, dout, (kernel_size, kernel_size), padding=((pad, pad), (pad, pad)),
                         use_bias=not norm, kernel_init=_c2_xavier_fill, dtype=dtype,
                         param_dtype=jnp.float32, rngs=rngs)
        self.relu = relu
        self.norm = (nnx.GroupNorm(dout, num_groups=GN_GROUPS, epsilon=GN_EPS, dtype=dtype,
                                   param_dtype=jnp.float32, rngs=rngs) if norm else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x)
        if self.norm is not None:
            y = self.norm(y)
        return jax.nn.relu(y) if self.relu else y


class BasePixelDecoder(nnx.Module):
    """FPN over backbone features ordered from the finest (stride 4) to the coarsest.

    `in_channels` maps feature names (e.g. "res2".."res5", finest first) to channels. Modules are
    numbered from the finest: `adapter_1/layer_1` for res2, ..., `layer_{n}` for the coarsest.
    `conv_dim` must be divisible by 32 (GroupNorm groups).
    """

    def __init__(self, in_channels: Mapping[str, int], conv_dim: int = 256, mask_dim: int = 256, *,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        if conv_dim % GN_GROUPS:
            raise ValueError(f"pixel decoder conv_dim {conv_dim} must be divisible by {GN_GROUPS} (GroupNorm)")
        self.in_features: Sequence[str] = tuple(in_channels)
        chans = list(in_channels.values())
        n = len(chans)
        for idx, c in enumerate(chans[:-1], start=1):
            setattr(self, f"adapter_{idx}", Conv2d(c, conv_dim, 1, norm=True, relu=False, dtype=dtype, rngs=rngs))
            setattr(self, f"layer_{idx}", Conv2d(conv_dim, conv_dim, 3, norm=True, relu=True, dtype=dtype, rngs=rngs))
        setattr(self, f"layer_{n}", Conv2d(chans[-1], conv_dim, 3, norm=True, relu=True, dtype=dtype, rngs=rngs))
        self.mask_features = Conv2d(conv_dim, mask_dim, 3, norm=False, relu=False, dtype=dtype, rngs=rngs)

    def __call__(self, features: Mapping[str, jax.Array]) -> jax.Array:
        """`{name: [B, h_k, w_k, C_k]}` -> mask features `[B, h_1, w_1, mask_dim]` (finest scale)."""
        n = len(self.in_features)
        y = getattr(self, f"layer_{n}")(features[self.in_features[-1]])
        for idx in range(n - 1, 0, -1):
            lateral = getattr(self, f"adapter_{idx}")(features[self.in_features[idx - 1]])
            y = lateral + resize_nearest_torch(y, lateral.shape[1:3]).astype(lateral.dtype)
            y = getattr(self, f"layer_{idx}")(y)
        return self.mask_features(y)
