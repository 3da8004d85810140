"""SAM's mask decoder: a two-way transformer between prompt tokens and the image embedding, then
hypernetwork masks and IoU predictions.

As `segment_anything.modeling.MaskDecoder` + `TwoWayTransformer`:
- tokens = [IoU token, 4 mask tokens, prompt tokens]; keys = image embedding + dense prompt
  embedding (flattened `h * w`), with the grid's position encoding as key positions;
- each two-way block (post-LN): token self-attention (block 0 without the positions and without
  its residual), tokens -> image cross-attention, ReLU MLP on tokens, image -> tokens
  cross-attention; cross-attentions project to half the width (`attention_downsample_rate`);
  then a final tokens -> image attention and LayerNorm;
- the image side is upscaled 4x (2x2 stride-2 transposed conv, LayerNorm2d, GELU, transposed conv,
  GELU) to `C / 8` channels; mask i = (MLP_i(mask token i)) . upscaled embedding; an MLP on the
  IoU token predicts the 4 masks' IoUs;
- `multimask_output` returns masks 1..3 (the ambiguity-aware outputs), else mask 0.

Attribute names follow the `segment_anything` state dict (`transformer.layers.0.self_attn.q_proj`,
`output_upscaling.3`, `output_hypernetworks_mlps.2.layers.1`, `iou_prediction_head`, ...).
Transposed-conv kernels are stored `[k, k, in, out]`; the converter transposes PyTorch's
`[in, out, k, k]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ovseg_jax.models.layers import LN_EPS, Mlp, Stack, dot_product_attention, einsum, linear
from ovseg_jax.models.sam.common import LAYER_NORM_2D_EPS, Activation, layer_norm


class Attention(nnx.Module):
    """Attention with separate q/k/v projections to `dim / downsample_rate` channels:
    query `[B, Lq, dim]`, key/value `[B, Lk, dim]` -> `[B, Lq, dim]`."""

    def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1, *, dtype, rngs: nnx.Rngs):
        internal = dim // downsample_rate
        if internal % num_heads:
            raise ValueError(f"mask decoder attention width {internal} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q_proj = linear(dim, internal, dtype=dtype, rngs=rngs)
        self.k_proj = linear(dim, internal, dtype=dtype, rngs=rngs)
        self.v_proj = linear(dim, internal, dtype=dtype, rngs=rngs)
        self.out_proj = linear(internal, dim, dtype=dtype, rngs=rngs)

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        out = dot_product_attention(self.q_proj(q), self.k_proj(k), self.v_proj(v), self.num_heads)
        return self.out_proj(out)


class TwoWayAttentionBlock(nnx.Module):
    """One two-way block: `(queries [B, T, C], keys [B, L, C]) -> (queries, keys)`. Whether it is
    the first block (no positions and no residual in the self-attention) is an input, not an
    attribute, so all blocks share one structure (`scan_layers`)."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, downsample_rate: int, eps: float, *, dtype,
                 rngs: nnx.Rngs):
        self.self_attn = Attention(dim, num_heads, dtype=dtype, rngs=rngs)
        self.norm1 = layer_norm(dim, dtype=dtype, eps=eps, rngs=rngs)
        self.cross_attn_token_to_image = Attention(dim, num_heads, downsample_rate, dtype=dtype, rngs=rngs)
        self.norm2 = layer_norm(dim, dtype=dtype, eps=eps, rngs=rngs)
        self.mlp = Mlp(dim, mlp_dim, act="relu", dtype=dtype, names=("lin1", "lin2"), rngs=rngs)
        self.norm3 = layer_norm(dim, dtype=dtype, eps=eps, rngs=rngs)
        self.norm4 = layer_norm(dim, dtype=dtype, eps=eps, rngs=rngs)
        self.cross_attn_image_to_token = Attention(dim, num_heads, downsample_rate, dtype=dtype, rngs=rngs)

    def __call__(self, queries, keys, query_pe, key_pe, first: jax.Array | bool):
        q = jnp.where(first, queries, queries + query_pe)
        attended = self.self_attn(q, q, queries)
        queries = self.norm1(jnp.where(first, attended, queries + attended))
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(queries + query_pe, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, queries + query_pe, queries))
        return queries, keys


class TwoWayTransformer(Stack):
    """`(image [B, L, C], image_pe [B or 1, L, C], tokens [B, T, C]) -> (tokens [B, T, C], image [B, L, C])`."""

    def __init__(self, *, depth: int, dim: int, num_heads: int, mlp_dim: int, downsample_rate: int = 2,
                 eps: float = LN_EPS, dtype, rngs: nnx.Rngs):
        self.layers = nnx.List([TwoWayAttentionBlock(dim, num_heads, mlp_dim, downsample_rate, eps, dtype=dtype,
                                                     rngs=rngs) for _ in range(depth)])
        self.final_attn_token_to_image = Attention(dim, num_heads, downsample_rate, dtype=dtype, rngs=rngs)
        self.norm_final_attn = layer_norm(dim, dtype=dtype, eps=LN_EPS, rngs=rngs)

    def __call__(self, image: jax.Array, image_pe: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        def step(layer, carry, first):
            return layer(*carry, tokens, image_pe, first), None

        first = jnp.arange(len(self.layers)) == 0
        (queries, keys), _ = self.run_stack(step, self.layers, (tokens, image), first)
        attended = self.final_attn_token_to_image(queries + tokens, keys + image_pe, keys)
        return self.norm_final_attn(queries + attended), keys


class ConvTranspose(nnx.Module):
    """PyTorch `ConvTranspose2d` with stride = kernel size k (no overlap): `[B, H, W, in] ->
    [B, k H, k W, out]`, output pixel (k i + a, k j + c) = `x[i, j] @ kernel[a, c] + bias`.
    `kernel [k, k, in, out]`; bias added in float32 and rounded once (as `layers.Linear`)."""

    def __init__(self, din: int, dout: int, k: int, *, dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (k, k, din, dout), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dout,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, _ = x.shape
        k, _, _, dout = self.kernel.shape
        x = x.astype(self.dtype)
        y = einsum("bhwi,acio->bhawco", x, self.kernel[...].astype(self.dtype), out_dtype=jnp.float32)
        return (y + self.bias[...]).astype(self.dtype).reshape(b, h * k, w * k, dout)


class MLP(nnx.Module):
    """`layers[0] -> ReLU -> ... -> layers[-1]` (no activation after the last): `[..., din] -> [..., dout]`."""

    def __init__(self, din: int, hidden: int, dout: int, num_layers: int, *, dtype, rngs: nnx.Rngs):
        sizes = [din] + [hidden] * (num_layers - 1) + [dout]
        self.layers = nnx.List([linear(a, b, dtype=dtype, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        return self.layers[-1](x)


class MaskDecoder(nnx.Module):
    """Image embeddings + prompt embeddings -> mask logits and IoU predictions (one image embedding
    per prompt set; see `__call__`)."""

    def __init__(self, *, dim: int, depth: int = 2, num_heads: int = 8, mlp_dim: int = 2048,
                 downsample_rate: int = 2, num_multimask_outputs: int = 3, iou_head_depth: int = 3,
                 iou_head_hidden_dim: int = 256, norm_eps: float = LN_EPS, dtype=jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        self.num_mask_tokens = num_multimask_outputs + 1
        self.transformer = TwoWayTransformer(depth=depth, dim=dim, num_heads=num_heads, mlp_dim=mlp_dim,
                                             downsample_rate=downsample_rate, eps=norm_eps, dtype=dtype, rngs=rngs)
        self.iou_token = nnx.Embed(1, dim, param_dtype=jnp.float32, rngs=rngs)
        self.mask_tokens = nnx.Embed(self.num_mask_tokens, dim, param_dtype=jnp.float32, rngs=rngs)
        self.output_upscaling = nnx.List([
            ConvTranspose(dim, dim // 4, 2, dtype=dtype, rngs=rngs),
            layer_norm(dim // 4, dtype=dtype, eps=LAYER_NORM_2D_EPS, rngs=rngs),
            Activation("gelu"),
            ConvTranspose(dim // 4, dim // 8, 2, dtype=dtype, rngs=rngs),
            Activation("gelu"),
        ])
        self.output_hypernetworks_mlps = nnx.List([MLP(dim, dim, dim // 8, 3, dtype=dtype, rngs=rngs)
                                                   for _ in range(self.num_mask_tokens)])
        self.iou_prediction_head = MLP(dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth,
                                       dtype=dtype, rngs=rngs)

    def __call__(self, image_embeddings: jax.Array, image_pe: jax.Array, sparse_prompt_embeddings: jax.Array,
                 *, multimask_output: bool) -> tuple[jax.Array, jax.Array]:
        """image_embeddings `[B, h, w, C]` (dense prompt embedding already added), image_pe
        `[h, w, C]`, sparse prompt tokens `[B, T, C]` -> (mask logits `[B, K, 4h, 4w]`, IoU
        predictions `[B, K]`), K = 3 with `multimask_output`, else 1; in the compute dtype."""
        b, h, w, c = image_embeddings.shape
        dtype = self.dtype
        output_tokens = jnp.concatenate([self.iou_token.embedding[...], self.mask_tokens.embedding[...]])
        output_tokens = jnp.broadcast_to(output_tokens.astype(dtype), (b,) + output_tokens.shape)
        tokens = jnp.concatenate([output_tokens, sparse_prompt_embeddings.astype(dtype)], axis=1)
        image = image_embeddings.astype(dtype).reshape(b, h * w, c)
        tokens_out, image = self.transformer(image, image_pe.astype(dtype).reshape(1, h * w, c), tokens)
        iou_token_out = tokens_out[:, 0]
        mask_tokens_out = tokens_out[:, 1:1 + self.num_mask_tokens]

        upscaled = image.reshape(b, h, w, c)
        for layer in self.output_upscaling:
            upscaled = layer(upscaled)
        hyper_in = jnp.stack([mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
                             axis=1)  # [B, M, C / 8]
        masks = einsum("bmc,bhwc->bmhw", hyper_in, upscaled)
        iou_pred = self.iou_prediction_head(iou_token_out)
        selected = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, selected], iou_pred[:, selected]
