"""SAM's prompt encoder: points, boxes and masks -> sparse tokens and a dense embedding.

As `segment_anything.modeling.PromptEncoder`:
- positions are encoded with random Fourier features: for `c` in [0, 1]^2,
  `[sin(2 pi (2c - 1) G), cos(2 pi (2c - 1) G)]` with a fixed Gaussian matrix `G [2, C/2]`;
- a point at pixel (x, y) of the resized input is encoded at its pixel centre `(x + 0.5) / W`,
  `(y + 0.5) / H`; label 1 (foreground) adds `point_embeddings[1]`, 0 (background) adds
  `point_embeddings[0]`, and -1 (padding) replaces the encoding with `not_a_point_embed`;
  when no box is given, one padding point is appended to every prompt set;
- a box (x0, y0, x1, y1) is two corner points with `point_embeddings[2]` and `[3]` added;
- a mask input `[4h, 4w]` (low-resolution logits) is downscaled by two 2x2 stride-2 convs with
  LayerNorm2d and GELU and a 1x1 conv to `[h, w, C]`; without one every position gets
  `no_mask_embed`.

Attribute names follow the `segment_anything` state dict (`pe_layer`, `point_embeddings.2`,
`mask_downscaling.3`, ...); `mask_downscaling` mirrors its `nn.Sequential`, activations included.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ovseg_jax.models.layers import Conv
from ovseg_jax.models.sam.common import LAYER_NORM_2D_EPS, Activation, Buffer, layer_norm


class PositionEmbeddingRandom(nnx.Module):
    """Random Fourier position encoding: `[..., 2]` coordinates -> `[..., 2 F]` float32."""

    def __init__(self, num_pos_feats: int, *, rngs: nnx.Rngs):
        self.positional_encoding_gaussian_matrix = Buffer(jax.random.normal(rngs.params(), (2, num_pos_feats)))

    def encode(self, coords: jax.Array) -> jax.Array:
        """`[..., 2]` (x, y) in [0, 1] -> `[..., 2 F]` (sin features, then cos features)."""
        projected = jnp.einsum("...i,if->...f", 2.0 * coords.astype(jnp.float32) - 1.0,
                               self.positional_encoding_gaussian_matrix[...], precision=jax.lax.Precision.HIGHEST)
        projected = 2.0 * jnp.pi * projected
        return jnp.concatenate([jnp.sin(projected), jnp.cos(projected)], axis=-1)

    def grid(self, size: tuple[int, int]) -> jax.Array:
        """Encoding of the centres of an `h x w` grid: `[h, w, 2 F]`."""
        h, w = size
        ys = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
        xs = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
        coords = jnp.stack(jnp.broadcast_arrays(xs[None, :], ys[:, None]), axis=-1)
        return self.encode(coords)

    def with_coords(self, coords: jax.Array, image_size: tuple[int, int]) -> jax.Array:
        """`[..., 2]` (x, y) in pixels of an `(H, W)` image -> `[..., 2 F]`."""
        h, w = image_size
        return self.encode(coords.astype(jnp.float32) / jnp.asarray([w, h], jnp.float32))


def _embedding(dim: int, rows: int, rngs: nnx.Rngs) -> nnx.Embed:
    return nnx.Embed(rows, dim, param_dtype=jnp.float32, rngs=rngs)


class PromptEncoder(nnx.Module):
    """Points, boxes, masks -> (sparse `[..., T, C]`, dense `[..., h, w, C]`); see the module docstring."""

    def __init__(self, *, embed_dim: int, image_embedding_size: tuple[int, int], input_image_size: tuple[int, int],
                 mask_in_chans: int, dtype=jnp.float32, rngs: nnx.Rngs):
        self.embed_dim, self.dtype = embed_dim, dtype
        self.image_embedding_size = tuple(image_embedding_size)
        self.input_image_size = tuple(input_image_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2, rngs=rngs)
        # 0 = background point, 1 = foreground point, 2 / 3 = box top-left / bottom-right corner.
        self.point_embeddings = nnx.List([_embedding(embed_dim, 1, rngs) for _ in range(4)])
        self.not_a_point_embed = _embedding(embed_dim, 1, rngs)
        conv = dict(padding="VALID", dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        quarter = mask_in_chans // 4
        self.mask_downscaling = nnx.List([
            Conv(1, quarter, kernel_size=(2, 2), strides=(2, 2), **conv),
            layer_norm(quarter, dtype=dtype, eps=LAYER_NORM_2D_EPS, rngs=rngs),
            Activation("gelu"),
            Conv(quarter, mask_in_chans, kernel_size=(2, 2), strides=(2, 2), **conv),
            layer_norm(mask_in_chans, dtype=dtype, eps=LAYER_NORM_2D_EPS, rngs=rngs),
            Activation("gelu"),
            Conv(mask_in_chans, embed_dim, kernel_size=(1, 1), **conv),
        ])
        self.no_mask_embed = _embedding(embed_dim, 1, rngs)

    def get_dense_pe(self) -> jax.Array:
        """Position encoding of the image embedding's grid: `[h, w, C]` float32."""
        return self.pe_layer.grid(self.image_embedding_size)

    def _token(self, embed: nnx.Embed) -> jax.Array:
        return embed.embedding[...][0]

    def embed_points(self, coords: jax.Array, labels: jax.Array, pad: bool) -> jax.Array:
        """`[..., P, 2]` (x, y) pixels of the resized input, `[..., P]` int labels -> `[..., P (+1 if
        pad), C]` float32."""
        coords = coords.astype(jnp.float32) + 0.5  # pixel centres
        if pad:
            coords = jnp.concatenate([coords, jnp.zeros(coords.shape[:-2] + (1, 2), coords.dtype)], axis=-2)
            labels = jnp.concatenate([labels, -jnp.ones(labels.shape[:-1] + (1,), labels.dtype)], axis=-1)
        encoding = self.pe_layer.with_coords(coords, self.input_image_size)
        labels = labels[..., None]
        encoding = jnp.where(labels == -1, self._token(self.not_a_point_embed), encoding)
        encoding = encoding + jnp.where(labels == 0, self._token(self.point_embeddings[0]), 0.0)
        return encoding + jnp.where(labels == 1, self._token(self.point_embeddings[1]), 0.0)

    def embed_boxes(self, boxes: jax.Array) -> jax.Array:
        """`[..., 4]` (x0, y0, x1, y1) pixels of the resized input -> `[..., 2, C]` float32 corner tokens."""
        corners = (boxes.astype(jnp.float32) + 0.5).reshape(boxes.shape[:-1] + (2, 2))
        encoding = self.pe_layer.with_coords(corners, self.input_image_size)
        corner_tokens = jnp.stack([self._token(self.point_embeddings[2]), self._token(self.point_embeddings[3])])
        return encoding + corner_tokens

    def embed_masks(self, masks: jax.Array) -> jax.Array:
        """`[..., 4h, 4w]` mask logits -> `[..., h, w, C]` in the compute dtype."""
        lead = masks.shape[:-2]
        x = masks.reshape((-1,) + masks.shape[-2:] + (1,)).astype(self.dtype)
        for layer in self.mask_downscaling:
            x = layer(x)
        return x.reshape(lead + x.shape[1:])

    def __call__(self, points: tuple[jax.Array, jax.Array] | None, boxes: jax.Array | None,
                 masks: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """Prompt sets with leading dims `L` (e.g. `[B, N]`): points (`[*L, P, 2]`, `[*L, P]`),
        boxes `[*L, 4]`, masks `[*L, 4h, 4w]` (each optional) -> (sparse `[*L, T, C]` with
        T = P (+1 without boxes) (+2 with boxes), dense `[*L, h, w, C]`), in the compute dtype."""
        if points is not None:
            lead = points[1].shape[:-1]
        elif boxes is not None:
            lead = boxes.shape[:-1]
        elif masks is not None:
            lead = masks.shape[:-2]
        else:
            raise ValueError("SAM needs a prompt: points, boxes or mask inputs")
        sparse = [jnp.zeros(lead + (0, self.embed_dim), jnp.float32)]
        if points is not None:
            sparse.append(self.embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            sparse.append(self.embed_boxes(boxes))
        if masks is not None:
            dense = self.embed_masks(masks)
        else:
            dense = jnp.broadcast_to(self._token(self.no_mask_embed).astype(self.dtype),
                                     lead + self.image_embedding_size + (self.embed_dim,))
        return jnp.concatenate(sparse, axis=-2).astype(self.dtype), dense
