"""The OVSeg segmenter: MaskFormer with an open-vocabulary classification head
(reference 1.1-1.5).

    images [B, H, W, 3] (normalised)  --pad to a multiple of 32 with 0-->  backbone res2..res5
    pixel_decoder(res2..res5)            -> mask_features [B, Hp/4, Wp/4, mask_dim]
    transformer_decoder(res5)            -> hs [L, B, Q, hidden]        (all L layers, normalised)
    class_embed(hs)                      -> query embeddings e [L, B, Q, D_clip]
    100 * normalize(e) @ [text_bank; normalize(non_object_embedding)]^T -> logits [L, B, Q, C+1]
    einsum(mask_embed(hs), mask_features) -> mask logits [L, B, Q, Hp/4, Wp/4]

The last layer gives `pred_*`, the first L-1 layers the deep-supervision `aux` outputs.
Parameter names mirror the OVSeg checkpoint (see `ovseg_jax.convert.segmenter_keys`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ovseg_jax.models.backbone import build_backbone
from ovseg_jax.models.layers import einsum, linear
from ovseg_jax.models.pixel_decoder import BasePixelDecoder
from ovseg_jax.models.resnet import ResNetConfig
from ovseg_jax.models.swin import SwinConfig
from ovseg_jax.models.transformer_decoder import TransformerDecoder

# Segmenter input normalisation on the 0-255 RGB scale (reference 1.1).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
TEMPERATURE = 100.0  # fixed logit scale of the open-vocabulary head (reference 1.5)


def normalize_images(images) -> jax.Array:
    """uint8 or float 0-255 RGB `[B, H, W, 3]` -> float32 `(x - PIXEL_MEAN) / PIXEL_STD`."""
    x = jnp.asarray(images).astype(jnp.float32)
    return (x - jnp.asarray(PIXEL_MEAN, jnp.float32)) / jnp.asarray(PIXEL_STD, jnp.float32)


def pad_to_multiple(images: jax.Array, multiple: int) -> jax.Array:
    """Zero-pad `[B, H, W, C]` at the bottom/right to multiples of `multiple` (detectron2's
    `ImageList.from_tensors` on normalised images: the padding is 0 in normalised space)."""
    _, h, w, _ = images.shape
    ph, pw = -h % multiple, -w % multiple
    if ph == 0 and pw == 0:
        return images
    return jnp.pad(images, ((0, 0), (0, ph), (0, pw), (0, 0)))


def open_vocab_logits(embeddings: jax.Array, text_bank: jax.Array, non_object_embedding: jax.Array) -> jax.Array:
    """Reference 1.5: `100 * (e / |e|) @ [T; n / |n|]^T`.

    embeddings `[..., D]` (query embeddings), text_bank `[C, D]` unit-norm class embeddings,
    non_object_embedding `[1, D]` -> logits `[..., C + 1]` (last column: "no object"). float32.
    """
    e = embeddings.astype(jnp.float32)
    e = e / jnp.linalg.norm(e, axis=-1, keepdims=True)
    n = non_object_embedding.astype(jnp.float32)
    bank = jnp.concatenate([text_bank.astype(jnp.float32), n / jnp.linalg.norm(n, axis=-1, keepdims=True)])
    return TEMPERATURE * jnp.einsum("...d,cd->...c", e, bank, precision="highest")


class PredictionMLP(nnx.Module):
    """DETR's `MLP`: `num_layers` Linear layers in `layers[i]` with ReLU between them.
    `[..., din] -> [..., dout]`."""

    def __init__(self, din: int, hidden: int, dout: int, num_layers: int, *, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        dims = [din] + [hidden] * (num_layers - 1) + [dout]
        self.layers = nnx.List([linear(a, b, dtype=dtype, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = jax.nn.relu(x)
        return x


@dataclasses.dataclass(frozen=True)
class SegmenterConfig:
    """Architecture of the segmenter (reference 0). `backbone` is "swin" or "resnet" and
    `backbone_config` the matching `SwinConfig` / `ResNetConfig`."""

    backbone: str = "swin"
    backbone_config: Any = dataclasses.field(default_factory=SwinConfig.swin_b)
    num_queries: int = 100
    hidden_dim: int = 256
    conv_dim: int = 256
    mask_dim: int = 256
    dec_layers: int = 6
    nheads: int = 8
    dim_feedforward: int = 2048
    dropout: float = 0.1
    class_hidden_dim: int = 1024  # class-embedding MLP: hidden_dim -> 1024 -> clip_dim
    clip_dim: int = 768  # 768 for CLIP ViT-L/14, 512 for ViT-B/16
    size_divisibility: int = 32

    @classmethod
    def swin_b(cls, clip_dim: int = 768) -> "SegmenterConfig":
        """Swin-B + ViT-L/14 (the main released model)."""
        return cls(backbone="swin", backbone_config=SwinConfig.swin_b(), clip_dim=clip_dim)

    @classmethod
    def r101c(cls, clip_dim: int = 512) -> "SegmenterConfig":
        """R101c + ViT-B/16 (the small released model)."""
        return cls(backbone="resnet", backbone_config=ResNetConfig.r101c(), clip_dim=clip_dim)

    def replace(self, **changes) -> "SegmenterConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-able form (the backbone config as a nested dict)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SegmenterConfig":
        """Inverse of `to_dict` (JSON lists become tuples again)."""
        kinds = {"swin": SwinConfig, "resnet": ResNetConfig}
        if d.get("backbone") not in kinds:
            raise ValueError(f"segmenter config: backbone must be one of {sorted(kinds)}; got {d.get('backbone')!r}")

        def tuples(x):
            return {k: tuple(v) if isinstance(v, list) else v for k, v in x.items()}

        return cls(**{**tuples(d), "backbone_config": kinds[d["backbone"]](**tuples(d["backbone_config"]))})


class Segmenter(nnx.Module):
    """OVSeg's mask proposal network with the open-vocabulary head. NHWC inputs."""

    def __init__(self, config: SegmenterConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        c = config
        self.config = config
        self.backbone = build_backbone(c.backbone, c.backbone_config, dtype=dtype, rngs=rngs)
        channels = dict(self.backbone.out_channels)
        self.in_features = tuple(sorted(channels, key=lambda k: self.backbone.strides[k]))
        self.pixel_decoder = BasePixelDecoder({k: channels[k] for k in self.in_features}, c.conv_dim,
                                              c.mask_dim, dtype=dtype, rngs=rngs)
        self.transformer_decoder = TransformerDecoder(
            channels[self.in_features[-1]], dim=c.hidden_dim, num_queries=c.num_queries, heads=c.nheads,
            ffn_dim=c.dim_feedforward, num_layers=c.dec_layers, dropout=c.dropout, dtype=dtype, rngs=rngs)
        self.class_embed = PredictionMLP(c.hidden_dim, c.class_hidden_dim, c.clip_dim, 2, dtype=dtype, rngs=rngs)
        self.mask_embed = PredictionMLP(c.hidden_dim, c.hidden_dim, c.mask_dim, 3, dtype=dtype, rngs=rngs)
        self.non_object_embedding = nnx.Param(c.clip_dim**-0.5 * jax.random.normal(rngs.params(), (1, c.clip_dim)))

    def decode(self, images: jax.Array, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> tuple[jax.Array, jax.Array]:
        """Normalised images `[B, H, W, 3]` -> (mask features `[B, Hp/4, Wp/4, mask_dim]`, decoder
        states `[L, B, Q, hidden]`), where `Hp, Wp` are H, W padded up to `size_divisibility`."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [B, H, W, 3] (NHWC); got shape {images.shape}")
        x = pad_to_multiple(images, self.config.size_divisibility)
        feats = self.backbone(x, deterministic=deterministic, rngs=rngs)
        mask_features = self.pixel_decoder({k: feats[k] for k in self.in_features})
        hs = self.transformer_decoder(feats[self.in_features[-1]], deterministic=deterministic, rngs=rngs)
        return mask_features, hs

    def __call__(self, images: jax.Array, text_bank: jax.Array, *, deterministic: bool = True,
                 rngs: nnx.Rngs | None = None) -> dict:
        """images `[B, H, W, 3]` normalised (`normalize_images`), text_bank `[C, D_clip]` unit-norm ->

        pred_logits `[B, Q, C+1]` (float32), pred_embeddings `[B, Q, D_clip]` (class-embedding
        output, not normalised), pred_masks `[B, Q, Hp/4, Wp/4]` mask logits (float32; Hp, Wp = H, W
        padded to a multiple of 32: exactly H/4, W/4 for such inputs), aux: the first L-1 layers'
        {"pred_logits", "pred_masks"}. `rngs` (a `dropout` stream; Swin also draws drop-path keys
        from it) is used only when `deterministic=False`.
        """
        mask_features, hs = self.decode(images, deterministic=deterministic, rngs=rngs)
        embeddings = self.class_embed(hs)
        logits = open_vocab_logits(embeddings, text_bank, self.non_object_embedding[...])
        masks = einsum("lbqc,bhwc->lbqhw", self.mask_embed(hs), mask_features, out_dtype=jnp.float32)
        return {
            "pred_logits": logits[-1],
            "pred_embeddings": embeddings[-1].astype(jnp.float32),
            "pred_masks": masks[-1],
            "aux": [{"pred_logits": logits[i], "pred_masks": masks[i]} for i in range(len(hs) - 1)],
        }
