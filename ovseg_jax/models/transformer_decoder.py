"""MaskFormer's transformer decoder (reference 1.4): DETR post-norm decoder layers over the
projected coarsest backbone feature, with learned queries and a fixed sine positional encoding.

    memory = input_proj(res5) flattened to [B, h*w, D]      (0 encoder layers, no padding mask)
    tgt = 0;  for each layer: self-attn -> cross-attn -> FFN, each + residual + LayerNorm
    hs[l] = norm(tgt after layer l)                          (one shared final LayerNorm)

The layers run as a loop or a `jax.lax.scan` (`ovseg_jax.models.layers.set_stack_options`);
each layer's dropout key is a per-layer input.

Attribute names follow the OVSeg checkpoint under `sem_seg_head.predictor.`: `query_embed`,
`input_proj`, and (under `transformer.decoder.`) `layers[i].{self_attn, multihead_attn, linear1,
linear2, norm1, norm2, norm3}`, `norm`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ovseg_jax.models.layers import Conv, MultiHeadAttention, Stack, layer_norm, linear

POS_TEMPERATURE = 10000
POS_SCALE = 2 * math.pi
POS_EPS = 1e-6


def sine_position_embedding(height: int, width: int, dim: int) -> np.ndarray:
    """DETR's normalised sine encoding of an `height x width` map without padding mask:
    `[height * width, dim]` float32 (row-major positions), channels = [y-part | x-part], each part
    interleaving sin/cos over `dim / 2` frequencies. Computed in float32 like PyTorch's."""
    if dim % 4:
        raise ValueError(f"sine position embedding needs a width divisible by 4; got {dim}")
    feats = dim // 2
    f32 = np.float32
    y = np.arange(1, height + 1, dtype=f32) / f32(height + POS_EPS) * f32(POS_SCALE)
    x = np.arange(1, width + 1, dtype=f32) / f32(width + POS_EPS) * f32(POS_SCALE)
    dim_t = f32(POS_TEMPERATURE) ** (2 * (np.arange(feats, dtype=f32) // 2) / f32(feats))

    def encode(e):  # [n] -> [n, feats]: sin on even channels, cos on odd ones
        a = e[:, None] / dim_t.astype(f32)
        return np.stack([np.sin(a[:, 0::2]), np.cos(a[:, 1::2])], axis=-1).reshape(len(e), feats)

    pos_y = np.broadcast_to(encode(y)[:, None, :], (height, width, feats))
    pos_x = np.broadcast_to(encode(x)[None, :, :], (height, width, feats))
    return np.concatenate([pos_y, pos_x], axis=-1).reshape(height * width, dim).astype(f32)


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if rate == 0.0 or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class DecoderLayer(nnx.Module):
    """DETR `TransformerDecoderLayer.forward_post`: `tgt [B, Q, D]` -> `[B, Q, D]`."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float, *, dtype, rngs: nnx.Rngs):
        self.dropout = dropout
        self.self_attn = MultiHeadAttention(dim, heads, dtype=dtype, dropout=dropout, rngs=rngs)
        self.multihead_attn = MultiHeadAttention(dim, heads, dtype=dtype, dropout=dropout, rngs=rngs)
        self.linear1 = linear(dim, ffn_dim, dtype=dtype, rngs=rngs)
        self.linear2 = linear(ffn_dim, dim, dtype=dtype, rngs=rngs)
        self.norm1 = layer_norm(dim, dtype=dtype, rngs=rngs)
        self.norm2 = layer_norm(dim, dtype=dtype, rngs=rngs)
        self.norm3 = layer_norm(dim, dtype=dtype, rngs=rngs)

    def __call__(self, tgt: jax.Array, memory: jax.Array, pos: jax.Array, query_pos: jax.Array, *,
                 key: jax.Array | None = None) -> jax.Array:
        """tgt `[B, Q, D]`, memory `[B, N, D]`, pos `[N, D]`, query_pos `[Q, D]`; a PRNG `key`
        turns dropout on (attention weights, as torch.nn.MultiheadAttention(dropout=...), and the
        three residual branches and the FFN), None is inference."""
        keys = [None] * 6 if key is None or self.dropout == 0.0 else list(jax.random.split(key, 6))
        q = tgt + query_pos
        out = self.self_attn.attend(q, q, tgt, dropout_rng=keys[0])
        tgt = self.norm1(tgt + _dropout(out, self.dropout, keys[1]))
        out = self.multihead_attn.attend(tgt + query_pos, memory + pos, memory, dropout_rng=keys[2])
        tgt = self.norm2(tgt + _dropout(out, self.dropout, keys[3]))
        ffn = self.linear2(_dropout(jax.nn.relu(self.linear1(tgt)), self.dropout, keys[4]))
        return self.norm3(tgt + _dropout(ffn, self.dropout, keys[5]))


class TransformerDecoder(Stack):
    """Queries + input projection + `num_layers` decoder layers + shared final LayerNorm.

    `__call__(features [B, h, w, in_channels]) -> [num_layers, B, num_queries, dim]`: every
    layer's output after the shared `norm` (deep supervision uses them all).
    """

    def __init__(self, in_channels: int, *, dim: int = 256, num_queries: int = 100, heads: int = 8,
                 ffn_dim: int = 2048, num_layers: int = 6, dropout: float = 0.1, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.dtype = dtype
        self.query_embed = nnx.Embed(num_queries, dim, dtype=dtype, param_dtype=jnp.float32,
                                     embedding_init=nnx.initializers.normal(1.0), rngs=rngs)
        # MaskFormer projects only when the widths differ (the released models always do).
        self.input_proj = (Conv(in_channels, dim, (1, 1), dtype=dtype, param_dtype=jnp.float32,
                                    kernel_init=nnx.initializers.variance_scaling(1.0, "fan_in", "uniform"),
                                    rngs=rngs) if in_channels != dim else None)
        self.layers = nnx.List([DecoderLayer(dim, heads, ffn_dim, dropout, dtype=dtype, rngs=rngs)
                                for _ in range(num_layers)])
        self.norm = layer_norm(dim, dtype=dtype, rngs=rngs)
        # DETR's Transformer._reset_parameters: xavier_uniform on every matrix of the layers.
        state = nnx.state(self.layers, nnx.Param)
        flat = dict(nnx.to_flat_state(state))
        for var in flat.values():
            if var[...].ndim == 2:
                var[...] = nnx.initializers.xavier_uniform()(rngs.params(), var[...].shape)
        nnx.update(self.layers, nnx.from_flat_state(flat))

    def __call__(self, features: jax.Array, *, deterministic: bool = True,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        if not deterministic and rngs is None:
            raise ValueError("TransformerDecoder: deterministic=False needs rngs with a 'dropout' stream")
        rngs = None if deterministic else rngs
        x = features.astype(self.dtype)
        if self.input_proj is not None:
            x = self.input_proj(x)
        b, h, w, d = x.shape
        memory = x.reshape(b, h * w, d)
        pos = jnp.asarray(sine_position_embedding(h, w, d), self.dtype)
        query_pos = self.query_embed.embedding[...].astype(self.dtype)
        tgt = jnp.zeros((b,) + query_pos.shape, self.dtype)
        keys = None if rngs is None else jax.random.split(rngs.dropout(), len(self.layers))

        def step(layer, tgt, key):
            tgt = layer(tgt, memory, pos, query_pos, key=key)
            return tgt, tgt

        _, states = self.run_stack(step, self.layers, tgt, keys)  # [L, B, Q, D]
        return self.norm(states)  # the shared final LayerNorm, per layer output
