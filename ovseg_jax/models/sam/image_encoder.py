"""SAM's image encoder: a plain ViT with windowed attention and a convolutional neck (ViTDet style).

`[B, S, S, 3]` normalised, padded images -> `[B, S/16, S/16, out]` image embeddings, as
`segment_anything.modeling.ImageEncoderViT` with the released settings: patch embedding (a
16x16 stride-16 conv), an absolute position embedding `[1, g, g, C]`, pre-LN blocks (LayerNorm
eps 1e-6) whose attention adds decomposed relative position terms (MViTv2) and runs inside
non-overlapping `window x window` windows (the token grid zero-padded bottom/right to a multiple
of the window, padded tokens taking part as keys as in the reference), except the blocks at
`global_attn_indexes`, which attend over the whole grid; then the neck: 1x1 conv -> LayerNorm2d
-> 3x3 conv -> LayerNorm2d (no conv biases).

Attribute names follow the `segment_anything` state dict (`patch_embed.proj`, `blocks.3.attn.qkv`,
`blocks.3.attn.rel_pos_h`, `neck.2`, ...) so checkpoints convert with `ovseg_jax.convert.params`.

Scan. Windowed and global blocks have relative position tables of different sizes (2 * window - 1
vs 2 * grid - 1 rows) and attend over differently shaped token groups, so one scanned body cannot
serve both (a global block as masked windows, or a windowed block as masked global attention,
would change the work by 20x at 64x64 tokens). The released models repeat one pattern, e.g. ViT-B
(2, 5, 8, 11): [windowed, windowed, global] x 4. The encoder finds the shortest such period of the
block list (`block_period`) and scans over the groups of one period, each group applying its
blocks in order; an irregular pattern has one group (the whole stack), i.e. the loop. `remat`
applies per block inside a group.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ovseg_jax.models.layers import Conv, Mlp, Stack, dot_product_attention, einsum, linear, run_layers
from ovseg_jax.models.sam.common import LAYER_NORM_2D_EPS, layer_norm

ENCODER_LN_EPS = 1e-6  # the encoder's LayerNorms (`norm_layer=partial(nn.LayerNorm, eps=1e-6)`)


def relative_position_table(rel_pos: jax.Array, size: int) -> jax.Array:
    """`[2 * size - 1, C]` table -> `[size, size, C]` terms for (query, key) positions along one
    axis: entry (i, j) is row `i - j + size - 1` (equal query and key sizes, as in SAM)."""
    if rel_pos.shape[0] != 2 * size - 1:
        raise ValueError(f"relative position table has {rel_pos.shape[0]} rows; expected 2 * {size} - 1 "
                         f"for {size} positions (inputs must have the model's image size)")
    index = np.arange(size)[:, None] - np.arange(size)[None, :] + size - 1
    return rel_pos[index]


class Attention(nnx.Module):
    """Multi-head self-attention over a 2-D token grid with decomposed relative positions:
    `[B, H, W, C] -> [B, H, W, C]`. The logits are `q k^T / sqrt(d) + q . Rh[qh, kh] + q . Rw[qw, kw]`
    (unscaled q in the position terms, as the reference)."""

    def __init__(self, dim: int, num_heads: int, input_size: tuple[int, int], *, dtype, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"image encoder width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = linear(dim, 3 * dim, dtype=dtype, rngs=rngs)
        self.proj = linear(dim, dim, dtype=dtype, rngs=rngs)
        # Zeros in the reference; checkpoints overwrite them.
        self.rel_pos_h = nnx.Param(jnp.zeros((2 * input_size[0] - 1, head_dim), jnp.float32))
        self.rel_pos_w = nnx.Param(jnp.zeros((2 * input_size[1] - 1, head_dim), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        heads = self.num_heads
        q, k, v = jnp.split(self.qkv(x).reshape(b, h * w, 3 * c), 3, axis=-1)
        q_grid = q.reshape(b, h, w, heads, c // heads)
        rh = relative_position_table(self.rel_pos_h[...], h).astype(x.dtype)  # [qh, kh, d]
        rw = relative_position_table(self.rel_pos_w[...], w).astype(x.dtype)  # [qw, kw, d]
        rel_h = einsum("bhwnd,hkd->bnhwk", q_grid, rh, out_dtype=jnp.float32)
        rel_w = einsum("bhwnd,wkd->bnhwk", q_grid, rw, out_dtype=jnp.float32)
        bias = rel_h[..., :, None] + rel_w[..., None, :]  # [b, heads, qh, qw, kh, kw]
        out = dot_product_attention(q, k, v, heads, bias=bias.reshape(b, heads, h * w, h * w))
        return self.proj(out.reshape(b, h, w, c))


def window_partition(x: jax.Array, window: int) -> jax.Array:
    """`[B, H, W, C]` -> `[B * nh * nw, window, window, C]`, zero-padding H and W bottom/right to
    multiples of `window` (windows in row-major order per image)."""
    b, h, w, c = x.shape
    ph, pw = -h % window, -w % window
    x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
    nh, nw = (h + ph) // window, (w + pw) // window
    x = x.reshape(b, nh, window, nw, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b * nh * nw, window, window, c)


def window_unpartition(windows: jax.Array, window: int, hw: tuple[int, int]) -> jax.Array:
    """Inverse of `window_partition`: `[B * nh * nw, window, window, C]` -> `[B, H, W, C]`."""
    h, w = hw
    nh, nw = -(-h // window), -(-w // window)
    c = windows.shape[-1]
    x = windows.reshape(-1, nh, nw, window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, nh * window, nw * window, c)[:, :h, :w]


class Block(nnx.Module):
    """Pre-LN ViT block, windowed (`window_size > 0`) or global (0): `[B, H, W, C] -> [B, H, W, C]`."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, window_size: int, grid: int, *, dtype,
                 rngs: nnx.Rngs):
        self.window_size = window_size
        size = window_size or grid
        self.norm1 = layer_norm(dim, dtype=dtype, eps=ENCODER_LN_EPS, rngs=rngs)
        self.attn = Attention(dim, num_heads, (size, size), dtype=dtype, rngs=rngs)
        self.norm2 = layer_norm(dim, dtype=dtype, eps=ENCODER_LN_EPS, rngs=rngs)
        self.mlp = Mlp(dim, mlp_dim, act="gelu", dtype=dtype, names=("lin1", "lin2"), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.norm1(x)
        if self.window_size:
            y = window_unpartition(self.attn(window_partition(y, self.window_size)), self.window_size, x.shape[1:3])
        else:
            y = self.attn(y)
        x = x + y
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nnx.Module):
    """`[B, H, W, 3] -> [B, H/p, W/p, C]` with a p x p stride-p conv (`proj`)."""

    def __init__(self, patch_size: int, dim: int, *, dtype, rngs: nnx.Rngs):
        self.proj = Conv(3, dim, kernel_size=(patch_size, patch_size), strides=(patch_size, patch_size),
                         padding="VALID", dtype=dtype, param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj(x)


def block_period(window_sizes: Sequence[int]) -> int:
    """The shortest p dividing the block count with `window_sizes[i] == window_sizes[i % p]`
    (the length of the groups the encoder scans over; the block count when there is none shorter)."""
    n = len(window_sizes)
    return next(p for p in range(1, n + 1)
                if n % p == 0 and all(window_sizes[i] == window_sizes[i % p] for i in range(n)))


class BlockGroup(nnx.Module):
    """One period of blocks, the unit the encoder scans over (built on the fly; not a parameter path)."""

    def __init__(self, blocks: Sequence[Block]):
        self.blocks = nnx.List(blocks)


class ImageEncoderViT(Stack):
    """SAM's ViT: `[B, S, S, 3]` normalised images -> `[B, S/p, S/p, out_chans]` embeddings."""

    def __init__(self, *, image_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int,
                 mlp_dim: int, out_chans: int, window_size: int, global_attn_indexes: Sequence[int],
                 dtype=jnp.float32, rngs: nnx.Rngs):
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        grid = image_size // patch_size
        self.image_size, self.dtype = image_size, dtype
        self.patch_embed = PatchEmbed(patch_size, embed_dim, dtype=dtype, rngs=rngs)
        self.pos_embed = nnx.Param(jnp.zeros((1, grid, grid, embed_dim), jnp.float32))  # zeros in the reference
        self.window_sizes = tuple(0 if i in global_attn_indexes else window_size for i in range(depth))
        self.blocks = nnx.List([Block(embed_dim, num_heads, mlp_dim, w, grid, dtype=dtype, rngs=rngs)
                                for w in self.window_sizes])
        conv = dict(use_bias=False, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.neck = nnx.List([
            Conv(embed_dim, out_chans, kernel_size=(1, 1), padding="VALID", **conv),
            layer_norm(out_chans, dtype=dtype, eps=LAYER_NORM_2D_EPS, rngs=rngs),
            Conv(out_chans, out_chans, kernel_size=(3, 3), padding=((1, 1), (1, 1)), **conv),
            layer_norm(out_chans, dtype=dtype, eps=LAYER_NORM_2D_EPS, rngs=rngs),
        ])

    def __call__(self, images: jax.Array) -> jax.Array:
        if images.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f"image encoder input must be [B, {self.image_size}, {self.image_size}, 3] "
                             f"(preprocessed, padded); got {images.shape}")
        x = self.patch_embed(images.astype(self.dtype)) + self.pos_embed[...].astype(self.dtype)
        period = block_period(self.window_sizes)
        groups = [BlockGroup(self.blocks[i:i + period]) for i in range(0, len(self.blocks), period)]

        def group_step(group, x, _):
            x, _ = run_layers(lambda block, x, _: (block(x), None), group.blocks, x, remat=self.remat)
            return x, None

        x, _ = run_layers(group_step, groups, x, scan=self.scan_layers)
        for layer in self.neck:
            x = layer(x)
        return x
