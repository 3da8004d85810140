"""Swin transformer backbone as in OVSeg / MaskFormer (`D2SwinTransformer`, reference 1.2).

NHWC throughout: `images [B, H, W, 3] -> {"res2": [B, H/4, W/4, C], ..., "res5": [B, H/32, W/32, 8C]}`
(sizes rounded up). Attribute names are the official Swin checkpoint names (`patch_embed.proj`,
`layers.{i}.blocks.{j}.attn.qkv`, `attn.relative_position_bias_table`,
`layers.{i}.downsample.reduction`, `norm{i}`), so weights convert with
`ovseg_jax.convert.backbone_keys`.

Behaviour of the reference kept here:
- the image is zero-padded bottom/right to a multiple of the patch size;
- in every block the (normalised) feature map is zero-padded to window multiples; padded
  tokens take part in attention (the reference does not mask them) and are cropped after;
- odd blocks roll the map by `-window // 2` and add -100 between tokens of different regions;
  the mask is built per stage on the padded size; windows are never shrunk for small maps;
- patch merging pads odd sizes and concatenates neighbours as x0 = [0::2, 0::2],
  x1 = [1::2, 0::2], x2 = [0::2, 1::2], x3 = [1::2, 1::2];
- stochastic depth on both residual branches, rates linearly spaced over all blocks.

A stage's blocks run as a loop or as one `jax.lax.scan` (`ovseg_jax.models.layers.set_stack_options`):
the shift, the drop-path rate and the drop-path keys are per-block inputs, so every block of a stage
has the same structure (under a scan the shift selects its branch with `lax.cond`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ovseg_jax.utils.image_ops import resize_bicubic
from ovseg_jax.models.layers import (Conv, Mlp, Stack, broadcast_to, dot_product_attention, drop_path, layer_norm,
                                     linear)

STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


@dataclasses.dataclass(frozen=True)
class SwinConfig:
    """Architecture of a Swin backbone (fields named as MaskFormer's `MODEL.SWIN.*`)."""

    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    patch_size: int = 4
    window_size: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.3
    ape: bool = False
    pretrain_img_size: int = 224  # only sets the size of `absolute_pos_embed` when `ape`
    patch_norm: bool = True
    out_indices: tuple[int, ...] = (0, 1, 2, 3)

    @classmethod
    def swin_b(cls, **overrides) -> "SwinConfig":
        """OVSeg's Swin-B (window 12, drop-path 0.3, IN-22K 384 initialisation)."""
        base = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                    window_size=12, drop_path_rate=0.3, pretrain_img_size=384)
        return cls(**{**base, **overrides}).validate()

    @classmethod
    def tiny_test(cls, **overrides) -> "SwinConfig":
        """A few-thousand-parameter Swin for tests (4 stages, window 3 so shifts happen)."""
        base = dict(embed_dim=16, depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 4), window_size=3,
                    drop_path_rate=0.0)
        return cls(**{**base, **overrides}).validate()

    def replace(self, **changes) -> "SwinConfig":
        return dataclasses.replace(self, **changes).validate()

    def validate(self) -> "SwinConfig":
        if len(self.depths) != len(self.num_heads):
            raise ValueError(f"SwinConfig: depths {self.depths} and num_heads {self.num_heads} "
                             "must have one entry per stage")
        for i, heads in enumerate(self.num_heads):
            if (self.embed_dim * 2**i) % heads:
                raise ValueError(f"SwinConfig: stage {i} width {self.embed_dim * 2**i} is not "
                                 f"divisible by num_heads[{i}] = {heads}")
        bad = [i for i in self.out_indices if not 0 <= i < len(self.depths)]
        if bad or not self.out_indices:
            raise ValueError(f"SwinConfig: out_indices {self.out_indices} must be non-empty "
                             f"stage indices in [0, {len(self.depths)})")
        if self.window_size < 1 or self.patch_size < 1:
            raise ValueError("SwinConfig: window_size and patch_size must be positive")
        return self


def relative_position_index(window: int) -> np.ndarray:
    """`[N, N]` int index into the `[(2w-1)^2, heads]` bias table, N = window^2 (row-major tokens)."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def shifted_window_mask(hp: int, wp: int, window: int, shift: int) -> np.ndarray:
    """`[num_windows, N, N]` float32 additive mask: -100 between tokens that came from different
    regions of the cyclically shifted `hp x wp` map, 0 otherwise."""
    def regions(n):
        idx = np.arange(n)
        return (idx >= n - window).astype(np.int64) + (idx >= n - shift)
    label = regions(hp)[:, None] * 3 + regions(wp)[None, :]
    windows = label.reshape(hp // window, window, wp // window, window).transpose(0, 2, 1, 3)
    windows = windows.reshape(-1, window * window)
    diff = windows[:, None, :] - windows[:, :, None]
    return np.where(diff != 0, -100.0, 0.0).astype(np.float32)


def window_partition(x: jax.Array, window: int) -> jax.Array:
    """`[B, H, W, C] -> [B, num_windows, window^2, C]` (windows row-major, tokens row-major)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, -1, window * window, c)


def window_reverse(windows: jax.Array, window: int, h: int, w: int) -> jax.Array:
    """Inverse of `window_partition`: `[B, num_windows, window^2, C] -> [B, H, W, C]`."""
    b, _, _, c = windows.shape
    x = windows.reshape(b, h // window, w // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


class PatchEmbed(nnx.Module):
    """Non-overlapping `patch x patch` conv (+ LayerNorm): `[B, H, W, 3] -> [B, ceil(H/p), ceil(W/p), C]`."""

    def __init__(self, patch: int, dim: int, norm: bool, *, dtype, rngs: nnx.Rngs):
        self.patch = patch
        self.proj = Conv(3, dim, (patch, patch), strides=(patch, patch), padding="VALID",
                             dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.norm = layer_norm(dim, dtype=dtype, rngs=rngs) if norm else None

    def __call__(self, x: jax.Array) -> jax.Array:
        _, h, w, _ = x.shape
        p = self.patch
        x = jnp.pad(x, ((0, 0), (0, -h % p), (0, -w % p), (0, 0)))
        x = self.proj(x)
        return x if self.norm is None else self.norm(x)


class WindowAttention(nnx.Module):
    """Multi-head self-attention inside windows with a learned relative position bias.

    `[B, num_windows, N, C]` (+ optional `[num_windows, N, N]` additive mask) -> same shape.
    `qkv` output columns are [q | k | v], each split into contiguous heads.
    """

    def __init__(self, dim: int, window: int, num_heads: int, qkv_bias: bool, *, dtype,
                 rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.window = window
        self.qkv = linear(dim, 3 * dim, dtype=dtype, use_bias=qkv_bias, rngs=rngs)
        self.proj = linear(dim, dim, dtype=dtype, rngs=rngs)
        self.relative_position_bias_table = nnx.Param(
            0.02 * jax.random.truncated_normal(rngs.params(), -2.0, 2.0,
                                               ((2 * window - 1) ** 2, num_heads)))

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        n = self.window**2
        index = relative_position_index(self.window).reshape(-1)
        bias = self.relative_position_bias_table[...][index].reshape(n, n, self.num_heads).transpose(2, 0, 1)
        b, windows, _, c = x.shape
        # The windows of all images form one batch, each with its window's bias (+ shift mask). The
        # learned bias's gradient sums over images and windows in one `broadcast_to` (not through a
        # vmap over images and a broadcasting `+ mask`, whose gradient reductions were slow on CPU).
        bias = broadcast_to(bias, (b, windows, self.num_heads, n, n))
        if mask is not None:
            bias = bias + mask[:, None]  # [num_windows, 1, N, N], a constant
        bias = bias.reshape(b * windows, self.num_heads, n, n)
        q, k, v = jnp.split(self.qkv(x).reshape(b * windows, n, 3 * c), 3, axis=-1)
        out = dot_product_attention(q, k, v, self.num_heads, bias=bias)
        return self.proj(out.reshape(b, windows, n, c))


class SwinBlock(nnx.Module):
    """(Shifted-)window attention block: `[B, H, W, C] -> [B, H, W, C]`."""

    def __init__(self, dim: int, num_heads: int, window: int, mlp_ratio: float, qkv_bias: bool, *, dtype,
                 rngs: nnx.Rngs):
        self.window = window
        self.norm1 = layer_norm(dim, dtype=dtype, rngs=rngs)
        self.attn = WindowAttention(dim, window, num_heads, qkv_bias, dtype=dtype, rngs=rngs)
        self.norm2 = layer_norm(dim, dtype=dtype, rngs=rngs)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act="gelu", dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None, keys: jax.Array | None,
                 drop_path_rate: float | jax.Array = 0.0, shift: int | jax.Array = 0) -> jax.Array:
        """`mask`: the stage's shifted-window mask (used when this block shifts); `keys`: `[2]` PRNG
        keys for stochastic depth, or None (deterministic); `drop_path_rate`: this block's
        stochastic-depth rate; `shift`: 0 or `window // 2`. The last two are numbers, or scalar
        arrays when the block runs inside a scan."""
        b, h, w, c = x.shape
        ws = self.window
        y = self.norm1(x)
        y = jnp.pad(y, ((0, 0), (0, -h % ws), (0, -w % ws), (0, 0)))
        if isinstance(shift, (int, np.integer)):
            y = self._window_attention(y, mask, int(shift))
        else:
            y = jax.lax.cond(shift > 0, lambda y: self._window_attention(y, mask, ws // 2),
                             lambda y: self._window_attention(y, mask, 0), y)
        y = y[:, :h, :w]
        k1, k2 = keys if keys is not None else (None, None)
        x = x + drop_path(y, drop_path_rate, k1)
        return x + drop_path(self.mlp(self.norm2(x)), drop_path_rate, k2)

    def _window_attention(self, y: jax.Array, mask: jax.Array | None, shift: int) -> jax.Array:
        """Attention within the windows of the padded map `y [B, Hp, Wp, C]`, cyclically shifted by
        `shift` (then with `mask`) or not."""
        hp, wp = y.shape[1:3]
        if shift:
            y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
        y = self.attn(window_partition(y, self.window), mask if shift else None)
        y = window_reverse(y, self.window, hp, wp)
        return jnp.roll(y, (shift, shift), axis=(1, 2)) if shift else y


class PatchMerging(nnx.Module):
    """2x2 neighbour concat + LayerNorm(4C) + Linear 4C -> 2C: `[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), 2C]`."""

    def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs):
        self.norm = layer_norm(4 * dim, dtype=dtype, rngs=rngs)
        self.reduction = linear(4 * dim, 2 * dim, dtype=dtype, use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        _, h, w, _ = x.shape
        x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
        x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                            axis=-1)
        return self.reduction(self.norm(x))


class BasicLayer(Stack):
    """One Swin stage: blocks (shift on odd ones) then optional patch merging.

    `[B, H, W, C] -> (stage output [B, H, W, C], next stage input [B, H', W', C'])`. Block j shifts
    its windows by `shifts[j]` (0 or window // 2) and has stochastic-depth rate `drop_path_rates[j]`.
    """

    def __init__(self, dim: int, depth: int, num_heads: int, cfg: SwinConfig,
                 drop_path_rates: list[float], downsample: bool, *, dtype, rngs: nnx.Rngs):
        self.window = cfg.window_size
        self.shifts = tuple(0 if j % 2 == 0 else cfg.window_size // 2 for j in range(depth))
        self.drop_path_rates = tuple(float(r) for r in drop_path_rates)
        self.blocks = nnx.List([SwinBlock(dim, num_heads, cfg.window_size, cfg.mlp_ratio, cfg.qkv_bias,
                                          dtype=dtype, rngs=rngs) for _ in range(depth)])
        self.downsample = PatchMerging(dim, dtype=dtype, rngs=rngs) if downsample else None

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None) -> tuple[jax.Array, jax.Array]:
        _, h, w, _ = x.shape
        ws = self.window
        hp, wp = h + (-h % ws), w + (-w % ws)
        mask = None
        if ws // 2:
            mask = jnp.asarray(shifted_window_mask(hp, wp, ws, ws // 2))
        # numpy: the loop sees plain numbers (static shifts); a scan turns them into arrays.
        per_block = {"shift": np.asarray(self.shifts, np.int32), "rate": np.asarray(self.drop_path_rates)}
        if rngs is not None:
            per_block["keys"] = jax.random.split(rngs.dropout(), (len(self.blocks), 2))

        def step(block, x, inputs):
            return block(x, mask, inputs.get("keys"), inputs["rate"], inputs["shift"]), None

        x, _ = self.run_stack(step, self.blocks, x, per_block)
        return x, (x if self.downsample is None else self.downsample(x))


class SwinTransformer(nnx.Module):
    """Swin backbone: `images [B, H, W, 3]` (normalised) -> `{"res2".."res5": [B, h, w, C_i]}` NHWC,
    each stage output after its LayerNorm `norm{i}` (only the stages in `out_indices`)."""

    def __init__(self, config: SwinConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        cfg = config.validate()
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.embed_dim, cfg.patch_norm, dtype=dtype,
                                      rngs=rngs)
        if cfg.ape:
            grid = cfg.pretrain_img_size // cfg.patch_size
            self.absolute_pos_embed = nnx.Param(  # torch layout [1, C, grid, grid]
                0.02 * jax.random.truncated_normal(rngs.params(), -2.0, 2.0,
                                                   (1, cfg.embed_dim, grid, grid)))
        total = sum(cfg.depths)
        rates = [cfg.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        layers = []
        for i, (depth, heads) in enumerate(zip(cfg.depths, cfg.num_heads)):
            start = sum(cfg.depths[:i])
            layers.append(BasicLayer(cfg.embed_dim * 2**i, depth, heads, cfg,
                                     rates[start:start + depth], i < len(cfg.depths) - 1,
                                     dtype=dtype, rngs=rngs))
        self.layers = nnx.List(layers)
        for i in cfg.out_indices:
            setattr(self, f"norm{i}", layer_norm(cfg.embed_dim * 2**i, dtype=dtype, rngs=rngs))

    @property
    def out_channels(self) -> dict[str, int]:
        return {f"res{i + 2}": self.config.embed_dim * 2**i for i in self.config.out_indices}

    @property
    def strides(self) -> dict[str, int]:
        return {f"res{i + 2}": STRIDES[f"res{i + 2}"] for i in self.config.out_indices}

    def __call__(self, images: jax.Array, *, deterministic: bool = True,
                 rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
        """`images [B, H, W, 3]` -> stage features; `deterministic=False` needs `rngs` with a
        `dropout` stream (stochastic depth)."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"SwinTransformer expects images [B, H, W, 3]; got {images.shape}")
        if not deterministic and rngs is None:
            raise ValueError("SwinTransformer: deterministic=False needs rngs (a 'dropout' stream)")
        rngs = None if deterministic or self.config.drop_path_rate == 0.0 else rngs
        x = self.patch_embed(images)
        if self.config.ape:
            pos = resize_bicubic(self.absolute_pos_embed[...], x.shape[1:3], axes=(-2, -1))
            x = x + pos[0].transpose(1, 2, 0).astype(x.dtype)
        outs = {}
        for i, layer in enumerate(self.layers):
            out, x = layer(x, rngs)
            if i in self.config.out_indices:
                outs[f"res{i + 2}"] = getattr(self, f"norm{i}")(out)
        return outs
