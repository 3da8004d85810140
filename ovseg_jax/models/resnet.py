"""ResNet backbones as detectron2 builds them (`build_resnet_deeplab_backbone` for OVSeg's R101c,
`build_resnet_backbone` for the 7x7-stem variant torchvision weights fit).

NHWC: `images [B, H, W, 3] -> {"res2": [B, H/4, W/4, 256], ..., "res5": [B, H/32, W/32, 2048]}`
(sizes as torch's floor arithmetic gives them; res4/res5 keep their input size when dilated).
Attribute names are detectron2's (`stem.conv1`, `stem.conv1.norm`, `res2.0.conv1`,
`res2.0.shortcut`), so a detectron2 `.pkl` loads with `ovseg_jax.convert.params.torch_to_nnx`.

Batch norm is frozen (detectron2 `FrozenBatchNorm2d`, eps 1e-5): `weight`, `bias`,
`running_mean`, `running_var` are `FrozenStat` variables, not `nnx.Param`, so an optimiser over
`nnx.Param` never updates them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

BLOCKS_PER_DEPTH = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
STAGES = ("res2", "res3", "res4", "res5")
BN_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    """Architecture of a detectron2 bottleneck ResNet (fields named as `MODEL.RESNETS.*`).

    `stem_type`: "deeplab" (3x3 convs to stem_out/2, stem_out/2, stem_out, each + FrozenBN + ReLU,
    then a 3x3/2 max-pool) or "basic" (7x7/2 conv to stem_out + FrozenBN + ReLU + max-pool).
    `num_blocks` overrides the per-stage block counts that `depth` implies.
    `res5_multi_grid` multiplies `res5_dilation` per res5 block (DeepLab multi-grid; None = no).
    A dilated stage (dilation > 1) does not downsample.
    """

    depth: int = 101
    num_blocks: tuple[int, ...] | None = None
    stem_type: str = "deeplab"
    stem_out_channels: int = 128
    res2_out_channels: int = 256
    num_groups: int = 1
    width_per_group: int = 64
    stride_in_1x1: bool = False
    res4_dilation: int = 1
    res5_dilation: int = 1
    res5_multi_grid: tuple[int, ...] | None = None  # None: 1 for every res5 block
    out_features: tuple[str, ...] = STAGES

    @classmethod
    def r101c(cls, **overrides) -> "ResNetConfig":
        """OVSeg's R101c: deep stem 64/64/128, stride in the 3x3, res5 multi-grid (1, 2, 4)."""
        base = dict(depth=101, stem_type="deeplab", stem_out_channels=128, res5_multi_grid=(1, 2, 4))
        return cls(**{**base, **overrides}).validate()

    @classmethod
    def tiny_test(cls, **overrides) -> "ResNetConfig":
        """One block per stage, narrow widths (for tests)."""
        base = dict(num_blocks=(1, 1, 1, 1), stem_out_channels=16, res2_out_channels=32,
                    width_per_group=8)
        return cls(**{**base, **overrides}).validate()

    def replace(self, **changes) -> "ResNetConfig":
        return dataclasses.replace(self, **changes).validate()

    @property
    def blocks(self) -> tuple[int, ...]:
        if self.num_blocks is not None:
            return tuple(self.num_blocks)
        if self.depth not in BLOCKS_PER_DEPTH:
            raise ValueError(f"ResNetConfig: depth {self.depth} is not one of "
                             f"{sorted(BLOCKS_PER_DEPTH)} (or give num_blocks)")
        return BLOCKS_PER_DEPTH[self.depth]

    def validate(self) -> "ResNetConfig":
        if len(self.blocks) != 4 or min(self.blocks) < 1:
            raise ValueError(f"ResNetConfig: need 4 stages of >= 1 block; got {self.blocks}")
        if self.stem_type not in ("deeplab", "basic"):
            raise ValueError(f"ResNetConfig: stem_type must be 'deeplab' or 'basic'; got {self.stem_type!r}")
        if self.res4_dilation not in (1, 2) or self.res5_dilation not in (1, 2, 4):
            raise ValueError("ResNetConfig: res4_dilation must be 1 or 2 and res5_dilation 1, 2 or 4; "
                             f"got {self.res4_dilation}, {self.res5_dilation}")
        if self.res4_dilation == 2 and self.res5_dilation != 4:
            raise ValueError("ResNetConfig: res4_dilation 2 needs res5_dilation 4 (as detectron2)")
        if self.res5_multi_grid is not None and len(self.res5_multi_grid) != self.blocks[3]:
            raise ValueError(f"ResNetConfig: res5_multi_grid {self.res5_multi_grid} needs one entry "
                             f"per res5 block ({self.blocks[3]})")
        if not self.out_features or any(f not in STAGES for f in self.out_features):
            raise ValueError(f"ResNetConfig: out_features must be a non-empty subset of {STAGES}; "
                             f"got {self.out_features}")
        return self


class FrozenStat(nnx.Variable):
    """A frozen batch-norm tensor: loaded from checkpoints, never trained."""


class FrozenBatchNorm(nnx.Module):
    """detectron2 `FrozenBatchNorm2d`: `x * w / sqrt(var + eps) + (b - mean * w / sqrt(var + eps))`
    over the channel (last) axis."""

    def __init__(self, channels: int):
        self.weight = FrozenStat(jnp.ones((channels,), jnp.float32))
        self.bias = FrozenStat(jnp.zeros((channels,), jnp.float32))
        self.running_mean = FrozenStat(jnp.zeros((channels,), jnp.float32))
        self.running_var = FrozenStat(jnp.full((channels,), 1.0 - BN_EPS, jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.weight[...] * jax.lax.rsqrt(self.running_var[...] + BN_EPS)
        shift = self.bias[...] - self.running_mean[...] * scale
        return x * scale.astype(x.dtype) + shift.astype(x.dtype)


class Conv2d(nnx.Module):
    """detectron2 `Conv2d` without bias followed by its `norm` (FrozenBN): `[B, H, W, Cin] ->
    [B, H', W', Cout]` with torch's symmetric padding, dilation and groups."""

    def __init__(self, cin: int, cout: int, kernel: int, *, stride: int = 1, padding: int = 0,
                 dilation: int = 1, groups: int = 1, dtype, rngs: nnx.Rngs):
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.dtype = dtype
        fan_out = kernel * kernel * cout  # c2_msra_fill: kaiming normal, fan_out, relu
        self.kernel = nnx.Param((2.0 / fan_out) ** 0.5 * jax.random.normal(
            rngs.params(), (kernel, kernel, cin // groups, cout), jnp.float32))
        self.norm = FrozenBatchNorm(cout)

    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.padding
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.kernel[...].astype(self.dtype),
            window_strides=(self.stride, self.stride), padding=((p, p), (p, p)),
            rhs_dilation=(self.dilation, self.dilation), feature_group_count=self.groups,
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return self.norm(y)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """torch `max_pool2d(kernel_size=3, stride=2, padding=1)` on NHWC (padding never wins)."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                 ((0, 0), (1, 1), (1, 1), (0, 0)))


class Stem(nnx.Module):
    """deeplab: 3x3/2 conv -> 3x3 -> 3x3 (each + FrozenBN + ReLU); basic: 7x7/2 conv; then a 3x3/2
    max-pool. `[B, H, W, 3] -> [B, ~H/4, ~W/4, out]`."""

    def __init__(self, kind: str, out: int, *, dtype, rngs: nnx.Rngs):
        if kind == "deeplab":
            self.conv1 = Conv2d(3, out // 2, 3, stride=2, padding=1, dtype=dtype, rngs=rngs)
            self.conv2 = Conv2d(out // 2, out // 2, 3, padding=1, dtype=dtype, rngs=rngs)
            self.conv3 = Conv2d(out // 2, out, 3, padding=1, dtype=dtype, rngs=rngs)
            self.convs = ("conv1", "conv2", "conv3")
        else:
            self.conv1 = Conv2d(3, out, 7, stride=2, padding=3, dtype=dtype, rngs=rngs)
            self.convs = ("conv1",)

    def __call__(self, x: jax.Array) -> jax.Array:
        for name in self.convs:
            x = jax.nn.relu(getattr(self, name)(x))
        return max_pool_3x3_s2(x)


class BottleneckBlock(nnx.Module):
    """1x1 -> 3x3 (stride, dilation, groups) -> 1x1, + shortcut (a 1x1 conv iff the width changes),
    ReLU: `[B, H, W, Cin] -> [B, H/stride, W/stride, Cout]`."""

    def __init__(self, cin: int, cout: int, bottleneck: int, *, stride: int, dilation: int,
                 groups: int, stride_in_1x1: bool, dtype, rngs: nnx.Rngs):
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.shortcut = (Conv2d(cin, cout, 1, stride=stride, dtype=dtype, rngs=rngs)
                         if cin != cout else None)
        self.conv1 = Conv2d(cin, bottleneck, 1, stride=s1, dtype=dtype, rngs=rngs)
        self.conv2 = Conv2d(bottleneck, bottleneck, 3, stride=s3, padding=dilation,
                            dilation=dilation, groups=groups, dtype=dtype, rngs=rngs)
        self.conv3 = Conv2d(bottleneck, cout, 1, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.nn.relu(self.conv1(x))
        y = jax.nn.relu(self.conv2(y))
        y = self.conv3(y)
        return jax.nn.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(nnx.Module):
    """Bottleneck ResNet: `images [B, H, W, 3]` -> `{"res2".."res5": [B, h, w, C]}` NHWC (the stages
    in `out_features`; stages past the last requested one are not built)."""

    def __init__(self, config: ResNetConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        cfg = config.validate()
        self.config = cfg
        self.stem = Stem(cfg.stem_type, cfg.stem_out_channels, dtype=dtype, rngs=rngs)
        cin, cout = cfg.stem_out_channels, cfg.res2_out_channels
        bottleneck = cfg.num_groups * cfg.width_per_group
        self.stage_names = STAGES[:max(STAGES.index(f) for f in cfg.out_features) + 1]
        for idx, name in enumerate(self.stage_names):
            dilation = {"res4": cfg.res4_dilation, "res5": cfg.res5_dilation}.get(name, 1)
            first_stride = 1 if idx == 0 or dilation > 1 else 2
            n = cfg.blocks[idx]
            grid = cfg.res5_multi_grid if name == "res5" and cfg.res5_multi_grid else (1,) * n
            dilations = [dilation * m for m in grid]
            blocks = []
            for b in range(n):
                blocks.append(BottleneckBlock(
                    cin if b == 0 else cout, cout, bottleneck, stride=first_stride if b == 0 else 1,
                    dilation=dilations[b], groups=cfg.num_groups, stride_in_1x1=cfg.stride_in_1x1,
                    dtype=dtype, rngs=rngs))
            setattr(self, name, nnx.List(blocks))
            cin, cout, bottleneck = cout, cout * 2, bottleneck * 2

    @property
    def out_channels(self) -> dict[str, int]:
        return {f: self.config.res2_out_channels * 2**STAGES.index(f) for f in self.config.out_features}

    @property
    def strides(self) -> dict[str, int]:
        stride, out = 4, {}
        for name in self.stage_names:
            dilated = {"res4": self.config.res4_dilation, "res5": self.config.res5_dilation}.get(name, 1) > 1
            stride *= 1 if name == "res2" or dilated else 2
            out[name] = stride
        return {f: out[f] for f in self.config.out_features}

    def __call__(self, images: jax.Array, *, deterministic: bool = True,
                 rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
        """`images [B, H, W, 3]` -> stage features. The ResNet has no dropout:
        `deterministic`/`rngs` are accepted for the common backbone interface."""
        del deterministic, rngs
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"ResNet expects images [B, H, W, 3]; got {images.shape}")
        x = self.stem(images)
        outs = {}
        for name in self.stage_names:
            for block in getattr(self, name):
                x = block(x)
            if name in self.config.out_features:
                outs[name] = x
        return outs
