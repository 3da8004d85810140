"""Segment Anything (Kirillov et al. 2023) in Flax NNX: `SamConfig` and the `Sam` model.

    model = Sam(SamConfig.vit_b(), rngs=nnx.Rngs(0))           # or ovseg_jax.sam.load(path).model
    images = model.preprocess(resized)                          # [B, H, W, 3] 0..255 -> [B, S, S, 3]
    embeddings = model.image_embeddings(images)                 # [B, S/16, S/16, 256]
    low_res, iou = model.predict_masks(embeddings, coords, labels, multimask_output=True)
    masks = model.postprocess_masks(low_res, (h, w), (H, W))   # [B, N, 3, H, W] logits

Behaviour and parameter names follow `segment_anything` (facebookresearch/segment-anything,
`modeling/`); the components live in `image_encoder.py`, `prompt_encoder.py` and
`mask_decoder.py`, and `ovseg_jax.models.sam.transforms` resizes images and prompts as its
`ResizeLongestSide` does. Parameters are float32; `dtype` is the compute dtype (bfloat16 products
accumulate in float32, as in the CLIP towers); every public output is float32. NHWC throughout.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ovseg_jax.utils.image_ops import interpolation_matrix
from ovseg_jax.models.layers import LN_EPS, abstract_module
from ovseg_jax.models.sam.image_encoder import ImageEncoderViT
from ovseg_jax.models.sam.mask_decoder import MaskDecoder
from ovseg_jax.models.sam.prompt_encoder import PromptEncoder

__all__ = ["SamConfig", "Sam", "abstract_sam"]


@dataclasses.dataclass(frozen=True)
class SamConfig:
    """Architecture of a SAM model (sizes in pixels, widths in channels). Defaults: ViT-B."""

    image_size: int = 1024
    patch_size: int = 16
    # Image encoder (ViT).
    encoder_width: int = 768
    encoder_depth: int = 12
    encoder_heads: int = 12
    encoder_mlp_dim: int = 3072
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    # Prompt encoder and mask decoder.
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    # LayerNorm eps of the two-way blocks: segment_anything 1e-5 (nn.LayerNorm's default);
    # transformers' SamMaskDecoderConfig uses 1e-6.
    decoder_norm_eps: float = LN_EPS
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)

    @property
    def grid_size(self) -> int:
        """Side of the image embedding, `image_size / patch_size` (64 for the released models)."""
        return self.image_size // self.patch_size

    @classmethod
    def vit_b(cls, **overrides) -> "SamConfig":
        """`sam_vit_b_01ec64.pth`: width 768, 12 blocks, 12 heads, global attention at 2, 5, 8, 11."""
        return cls(**overrides)

    @classmethod
    def vit_l(cls, **overrides) -> "SamConfig":
        """`sam_vit_l_0b3195.pth`: width 1024, 24 blocks, 16 heads, global attention at 5, 11, 17, 23."""
        base = dict(encoder_width=1024, encoder_depth=24, encoder_heads=16, encoder_mlp_dim=4096,
                    global_attn_indexes=(5, 11, 17, 23))
        return cls(**{**base, **overrides})

    @classmethod
    def vit_h(cls, **overrides) -> "SamConfig":
        """`sam_vit_h_4b8939.pth`: width 1280, 32 blocks, 16 heads, global attention at 7, 15, 23, 31."""
        base = dict(encoder_width=1280, encoder_depth=32, encoder_heads=16, encoder_mlp_dim=5120,
                    global_attn_indexes=(7, 15, 23, 31))
        return cls(**{**base, **overrides})

    def replace(self, **changes) -> "SamConfig":
        return dataclasses.replace(self, **changes)

    def validate(self) -> "SamConfig":
        """Raise a ValueError naming the field when the architecture cannot be built."""
        if self.image_size % self.patch_size:
            raise ValueError(f"SamConfig: image_size {self.image_size} is not a multiple of "
                             f"patch_size {self.patch_size}")
        if self.encoder_width % self.encoder_heads:
            raise ValueError(f"SamConfig: encoder_width {self.encoder_width} is not divisible by "
                             f"encoder_heads {self.encoder_heads}")
        if any(not 0 <= i < self.encoder_depth for i in self.global_attn_indexes):
            raise ValueError(f"SamConfig: global_attn_indexes {self.global_attn_indexes} must lie in "
                             f"[0, {self.encoder_depth}) (encoder_depth)")
        if self.window_size <= 0 and len(set(self.global_attn_indexes)) < self.encoder_depth:
            raise ValueError(f"SamConfig: window_size must be positive (got {self.window_size})")
        internal = self.prompt_embed_dim // self.attention_downsample_rate
        if self.prompt_embed_dim % 8 or internal % self.decoder_heads or self.prompt_embed_dim % 2:
            raise ValueError(f"SamConfig: prompt_embed_dim {self.prompt_embed_dim} must be a multiple of 8 and, "
                             f"divided by attention_downsample_rate {self.attention_downsample_rate}, of "
                             f"decoder_heads {self.decoder_heads}")
        if self.mask_in_chans % 4:
            raise ValueError(f"SamConfig: mask_in_chans {self.mask_in_chans} must be a multiple of 4")
        return self


def _postprocess_matrix(low_res: int, image_size: int, input_size: int, original_size: int) -> np.ndarray:
    """`[original, low_res]` float32 matrix of one axis of `Sam.postprocess_masks`: bilinear
    low_res -> image_size, keep the first input_size rows, bilinear -> original (composed in
    float64)."""
    upscale = interpolation_matrix(low_res, image_size, "bilinear").astype(np.float64)[:input_size]
    if input_size == original_size:
        return upscale.astype(np.float32)
    return (interpolation_matrix(input_size, original_size, "bilinear").astype(np.float64) @ upscale).astype(np.float32)


class Sam(nnx.Module):
    """SAM: image encoder, prompt encoder and mask decoder (see the module docstring)."""

    def __init__(self, config: SamConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        cfg = config.validate()
        self.config, self.dtype = cfg, dtype
        grid, dim = cfg.grid_size, cfg.prompt_embed_dim
        self.image_encoder = ImageEncoderViT(
            image_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.encoder_width,
            depth=cfg.encoder_depth, num_heads=cfg.encoder_heads, mlp_dim=cfg.encoder_mlp_dim, out_chans=dim,
            window_size=cfg.window_size, global_attn_indexes=cfg.global_attn_indexes, dtype=dtype, rngs=rngs)
        self.prompt_encoder = PromptEncoder(
            embed_dim=dim, image_embedding_size=(grid, grid), input_image_size=(cfg.image_size, cfg.image_size),
            mask_in_chans=cfg.mask_in_chans, dtype=dtype, rngs=rngs)
        self.mask_decoder = MaskDecoder(
            dim=dim, depth=cfg.decoder_depth, num_heads=cfg.decoder_heads, mlp_dim=cfg.decoder_mlp_dim,
            downsample_rate=cfg.attention_downsample_rate, num_multimask_outputs=cfg.num_multimask_outputs,
            iou_head_depth=cfg.iou_head_depth, iou_head_hidden_dim=cfg.iou_head_hidden_dim,
            norm_eps=cfg.decoder_norm_eps, dtype=dtype, rngs=rngs)

    def preprocess(self, images: jax.Array, image_sizes: jax.Array | None = None) -> jax.Array:
        """`[B, H, W, 3]` RGB pixel values 0..255, already resized so that the longest side is
        `image_size` -> `[B, S, S, 3]` float32: normalised with pixel_mean/std, zero-padded
        bottom/right to S = `image_size`. With `image_sizes` (`[B, 2]` int (h, w)), `images` are
        `[B, S, S, 3]` with each image in its top-left h x w corner and everything outside it
        becomes 0 (one compiled program for every aspect ratio)."""
        s = self.config.image_size
        b, h, w, c = images.shape
        if c != 3 or h > s or w > s or (image_sizes is not None and (h, w) != (s, s)):
            raise ValueError(f"preprocess takes [B, H, W, 3] images with H, W <= {s} (resized with "
                             f"ResizeLongestSide({s})), or [B, {s}, {s}, 3] with image_sizes; got {images.shape}")
        mean, std = (jnp.asarray(v, jnp.float32) for v in (self.config.pixel_mean, self.config.pixel_std))
        x = (images.astype(jnp.float32) - mean) / std
        if image_sizes is not None:
            rows, cols = jnp.arange(s)[:, None], jnp.arange(s)[None, :]
            inside = (rows < image_sizes[:, 0, None, None]) & (cols < image_sizes[:, 1, None, None])
            return jnp.where(inside[..., None], x, 0.0)
        return jnp.pad(x, ((0, 0), (0, s - h), (0, s - w), (0, 0)))

    def image_embeddings(self, images: jax.Array) -> jax.Array:
        """`[B, S, S, 3]` preprocessed images -> `[B, S/16, S/16, 256]` float32 embeddings."""
        return self.image_encoder(images).astype(jnp.float32)

    def predict_masks(self, image_embeddings: jax.Array, point_coords: jax.Array | None,
                      point_labels: jax.Array | None, boxes: jax.Array | None = None,
                      mask_inputs: jax.Array | None = None, *, multimask_output: bool) -> tuple[jax.Array, jax.Array]:
        """Masks for N prompt sets per image (as `SamPredictor.predict_torch` with batched prompts).

        image_embeddings `[B, h, w, C]`; point_coords `[B, N, P, 2]` (x, y) pixels of the resized
        input (`ResizeLongestSide.apply_coords`); point_labels `[B, N, P]` int (1 foreground,
        0 background, -1 padding); boxes `[B, N, 4]` (x0, y0, x1, y1) resized-input pixels;
        mask_inputs `[B, N, 4h, 4w]` low-resolution logits; each prompt kind optional (not all).
        -> (low-resolution mask logits `[B, N, K, 4h, 4w]`, IoU predictions `[B, N, K]`), float32,
        K = 3 if `multimask_output` else 1.
        """
        if (point_coords is None) != (point_labels is None):
            raise ValueError("point_coords and point_labels go together (both or neither)")
        points = None if point_coords is None else (jnp.asarray(point_coords), jnp.asarray(point_labels))
        sparse, dense = self.prompt_encoder(points, boxes, mask_inputs)  # [B, N, T, C], [B, N, h, w, C]
        b, h, w, c = image_embeddings.shape
        n = sparse.shape[1]
        src = image_embeddings[:, None].astype(self.dtype) + dense
        src = jnp.broadcast_to(src, (b, n, h, w, c)).reshape(b * n, h, w, c)
        masks, iou = self.mask_decoder(src, self.prompt_encoder.get_dense_pe(),
                                       sparse.reshape((b * n,) + sparse.shape[2:]), multimask_output=multimask_output)
        return (masks.astype(jnp.float32).reshape((b, n) + masks.shape[1:]),
                iou.astype(jnp.float32).reshape(b, n, -1))

    def postprocess_masks(self, masks: jax.Array, input_size: tuple[int, int],
                          original_size: tuple[int, int]) -> jax.Array:
        """`[..., 4h, 4w]` low-resolution logits -> `[..., H, W]` float32 logits at the original
        image size: bilinear (align_corners=False) to S x S, crop to the resized image's
        `input_size` (h, w), bilinear to `original_size` (H, W), as `Sam.postprocess_masks`. The
        three steps are one `[H, 4h]` and one `[W, 4w]` matrix (composed on the host)."""
        s = self.config.image_size
        rows = _postprocess_matrix(masks.shape[-2], s, int(input_size[0]), int(original_size[0]))
        cols = _postprocess_matrix(masks.shape[-1], s, int(input_size[1]), int(original_size[1]))
        highest = jax.lax.Precision.HIGHEST
        x = jnp.einsum("Hh,...hw->...Hw", rows, masks.astype(jnp.float32), precision=highest)
        return jnp.einsum("...Hw,Ww->...HW", x, cols, precision=highest)


def abstract_sam(config: SamConfig, *, dtype=jnp.float32) -> Sam:
    """`Sam(config)` with every parameter a `jax.ShapeDtypeStruct`, nothing allocated
    (`layers.abstract_module`)."""
    return abstract_module(lambda rngs: Sam(config, dtype=dtype, rngs=rngs))
