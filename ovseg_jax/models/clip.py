"""CLIP (ViT image tower + causal text tower) with OVSeg's mask prompt tuning.

Attribute names follow OpenAI's state dict (`visual.conv1`, `visual.transformer.resblocks.3.ln_1`,
`token_embedding`, ...) so checkpoints convert with `ovseg_jax.convert.params`.

Mask prompt tuning (reference 1.9): `visual.mask_embedding [depth, grid*grid or 1, width]`.
For a region mask, a patch is foreground iff any pixel in it is on (ceil of the patch average).
Background patch tokens are replaced by `mask_embedding[0]` before the class token and the
positional embedding are added, and by `mask_embedding[i + 1]` after block `i` for
`i + 1 < depth`. The class token is never replaced and no positional embedding is re-added.

Deep visual prompt tuning (VPT-deep, Jia et al. 2022; the appendix's Table 4 baseline):
`visual.vpt_embedding [vpt_depth, vpt_tokens, width]`. At the input of block `i < vpt_depth`,
`vpt_tokens` learned tokens sit right after the class token (inserted at block 0, after `ln_pre`;
replaced by `vpt_embedding[i]` at each later one; no positional embedding, no mask semantics).
Blocks past `vpt_depth` carry the last prompts' outputs along. Mask prompts, if any, act on the
patch tokens behind them.

Both towers' blocks run as a loop or a `jax.lax.scan`, with optional rematerialisation
(`ovseg_jax.models.layers.set_stack_options`); the prompts of each block are a scanned input, so
the prompted and the plain blocks share one scanned body.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ovseg_jax.models.layers import Conv, LN_EPS, Mlp, MultiHeadAttention, Stack, einsum, layer_norm
from ovseg_jax.utils.image_ops import resize_bicubic


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    """Architecture of a CLIP model. Widths in channels, sizes in pixels."""

    embed_dim: int = 512
    # Image tower.
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_mlp_dim: int = 3072
    vision_act: str = "quick_gelu"
    # Text tower.
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    text_mlp_dim: int = 2048
    text_act: str = "quick_gelu"
    eot_token_id: int = 49407
    # Mask prompt tuning: depth 0 = off; shared = one token per depth ([d, 1, w]).
    mask_prompt_depth: int = 0
    mask_prompt_shared: bool = False
    # Deep visual prompt tuning: `vpt_tokens` learned tokens at the input of the first `vpt_depth`
    # blocks (both 0 = off).
    vpt_tokens: int = 0
    vpt_depth: int = 0
    layer_norm_eps: float = LN_EPS

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def vit_b16(cls, **overrides) -> "ClipConfig":
        """OpenAI ViT-B/16 (D = 512), as used by OVSeg's R101c model."""
        return cls(**overrides)

    @classmethod
    def vit_l14(cls, **overrides) -> "ClipConfig":
        """OpenAI ViT-L/14 at 224 (D = 768), as used by OVSeg's Swin-B model."""
        base = dict(embed_dim=768, patch_size=14, vision_width=1024, vision_layers=24,
                    vision_heads=16, vision_mlp_dim=4096, text_width=768, text_heads=12,
                    text_mlp_dim=3072)
        return cls(**{**base, **overrides})

    def replace(self, **changes) -> "ClipConfig":
        return dataclasses.replace(self, **changes)

    def validate(self) -> "ClipConfig":
        if self.mask_prompt_depth < 0 or self.mask_prompt_depth > self.vision_layers:
            raise ValueError(f"mask_prompt_depth must be in [0, {self.vision_layers}] "
                             f"(vision layers); got {self.mask_prompt_depth}")
        if self.vpt_tokens < 0 or not 0 <= self.vpt_depth <= self.vision_layers:
            raise ValueError(f"vpt_tokens must be >= 0 and vpt_depth in [0, {self.vision_layers}] (vision layers); "
                             f"got vpt_tokens={self.vpt_tokens}, vpt_depth={self.vpt_depth}")
        if (self.vpt_tokens > 0) != (self.vpt_depth > 0):
            raise ValueError(f"vpt_tokens={self.vpt_tokens} and vpt_depth={self.vpt_depth}: "
                             "both are 0 (no visual prompts) or both positive")
        for name, width, heads in (("vision", self.vision_width, self.vision_heads),
                                   ("text", self.text_width, self.text_heads)):
            if width % heads:
                raise ValueError(f"{name}_width {width} is not divisible by {name}_heads {heads}")
        return self


class ResidualAttentionBlock(nnx.Module):
    """Pre-LN block: `x += attn(ln_1(x)); x += mlp(ln_2(x))`, `[B, L, W] -> [B, L, W]`."""

    def __init__(self, width: int, heads: int, mlp_dim: int, act: str, eps: float, *, dtype, rngs):
        self.ln_1 = layer_norm(width, dtype=dtype, eps=eps, rngs=rngs)
        self.attn = MultiHeadAttention(width, heads, dtype=dtype, rngs=rngs)
        self.ln_2 = layer_norm(width, dtype=dtype, eps=eps, rngs=rngs)
        self.mlp = Mlp(width, mlp_dim, act=act, dtype=dtype, names=("c_fc", "c_proj"), rngs=rngs)

    def __call__(self, x: jax.Array, is_causal: bool = False) -> jax.Array:
        x = x + self.attn(self.ln_1(x), is_causal=is_causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(Stack):
    """A stack of residual attention blocks (`resblocks`), run as a loop or a scan (`Stack`)."""

    def __init__(self, width: int, layers: int, heads: int, mlp_dim: int, act: str, eps: float,
                 *, dtype, rngs):
        self.resblocks = nnx.List([ResidualAttentionBlock(width, heads, mlp_dim, act, eps, dtype=dtype,
                                                          rngs=rngs) for _ in range(layers)])

    def __call__(self, x: jax.Array, is_causal: bool = False) -> jax.Array:
        """`[B, L, W] -> [B, L, W]`."""
        return self.run_stack(lambda block, x, _: (block(x, is_causal=is_causal), None), self.resblocks, x)[0]


def patch_foreground(region_masks: jax.Array, patch: int, grid_hw: tuple[int, int]) -> jax.Array:
    """`[N, H, W]` 0/1 region masks -> `[N, gh * gw, 1]` bool: a patch is foreground iff the average
    of the mask over it is > 0 (the reference's ceil of the average pool). Pixels beyond the last
    full patch are dropped, as the patchifying conv does."""
    gh, gw = grid_hw
    n = region_masks.shape[0]
    m = region_masks[:, : gh * patch, : gw * patch].astype(jnp.float32)
    avg = m.reshape(n, gh, patch, gw, patch).mean(axis=(2, 4))
    return (jnp.ceil(avg) > 0).reshape(n, gh * gw, 1)


def resize_grid_tokens(tokens: jax.Array, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> jax.Array:
    """Resample per-patch tokens `[..., sh * sw, C]` to `[..., dh * dw, C]` with torch bicubic
    (align_corners=False), as transformers' `interpolate_pos_encoding` does."""
    if tuple(src_hw) == tuple(dst_hw):
        return tokens
    lead = tokens.shape[:-2]
    grid = tokens.reshape(lead + tuple(src_hw) + tokens.shape[-1:])
    out = resize_bicubic(grid, dst_hw, axes=(-3, -2))
    return out.reshape(lead + (dst_hw[0] * dst_hw[1], tokens.shape[-1]))


def _pad_layers(tokens: jax.Array, layers: int) -> tuple[jax.Array, jax.Array]:
    """Per-block prompts `[d, T, W]` for the first d of `layers` blocks -> (`[layers, T, W]` zero
    padded, `[layers]` bool: block i has a prompt)."""
    d = tokens.shape[0]
    padded = jnp.concatenate([tokens, jnp.zeros((layers - d,) + tokens.shape[1:], tokens.dtype)])
    return padded, jnp.arange(layers) < d


class VisionTransformer(nnx.Module):
    """CLIP image tower: `[N, H, W, 3]` CLIP-normalised images -> `[N, embed_dim]` (unnormalised)."""

    def __init__(self, cfg: ClipConfig, *, dtype, rngs: nnx.Rngs):
        w, p, g = cfg.vision_width, cfg.patch_size, cfg.grid_size
        self.patch_size, self.grid = p, g
        self.dtype = dtype
        self.mask_prompt_depth = cfg.mask_prompt_depth
        self.conv1 = Conv(3, w, kernel_size=(p, p), strides=(p, p), padding="VALID",
                              use_bias=False, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        scale = w**-0.5
        self.class_embedding = nnx.Param(scale * jax.random.normal(rngs.params(), (w,)))
        self.positional_embedding = nnx.Param(scale * jax.random.normal(rngs.params(), (g * g + 1, w)))
        self.ln_pre = layer_norm(w, dtype=dtype, eps=cfg.layer_norm_eps, rngs=rngs)
        self.transformer = Transformer(w, cfg.vision_layers, cfg.vision_heads, cfg.vision_mlp_dim,
                                       cfg.vision_act, cfg.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.ln_post = layer_norm(w, dtype=dtype, eps=cfg.layer_norm_eps, rngs=rngs)
        self.proj = nnx.Param(scale * jax.random.normal(rngs.params(), (w, cfg.embed_dim)))
        if cfg.mask_prompt_depth:
            tokens = 1 if cfg.mask_prompt_shared else g * g
            # N(0, 0.02) as the original's training init; checkpoints overwrite it.
            self.mask_embedding = nnx.Param(
                0.02 * jax.random.normal(rngs.params(), (cfg.mask_prompt_depth, tokens, w)))
        self.vpt_tokens, self.vpt_depth = cfg.vpt_tokens, cfg.vpt_depth
        if cfg.vpt_tokens:
            # VPT's init: uniform(+-sqrt(6 / (3 * patch^2 + width))), Xavier over the patch embedding.
            bound = (6.0 / (3 * p * p + w)) ** 0.5
            self.vpt_embedding = nnx.Param(jax.random.uniform(
                rngs.params(), (cfg.vpt_depth, cfg.vpt_tokens, w), minval=-bound, maxval=bound))

    def positions(self, grid_hw: tuple[int, int]) -> jax.Array:
        """Positional embedding `[1 + gh * gw, W]` for a patch grid, interpolated if needed."""
        pos = self.positional_embedding[...]
        return jnp.concatenate([pos[:1], resize_grid_tokens(pos[1:], (self.grid, self.grid), grid_hw)])

    def mask_prompts(self, grid_hw: tuple[int, int]) -> jax.Array:
        """Mask prompt tokens `[depth, gh * gw or 1, W]` for a patch grid."""
        emb = self.mask_embedding[...]
        if emb.shape[1] == 1:
            return emb
        return resize_grid_tokens(emb, (self.grid, self.grid), grid_hw)

    def patch_embedding(self, images: jax.Array) -> jax.Array:
        """`[N, H, W, 3] -> [N, H // p, W // p, width]`: `conv1` (stride = kernel = p, no bias) as one
        product of the non-overlapping patches with its kernel, pixels past the last full patch
        dropped as the convolution does. In bfloat16 the product accumulates in float32 (`einsum`)
        where XLA:CPU ran the convolution in float32 on bfloat16-rounded operands, 2x slower
        (ViT-B/16, 16 crops; float32 runs at the convolution's speed, same numbers to float32
        rounding)."""
        p, dtype = self.patch_size, self.dtype
        n, h, w, c = images.shape
        gh, gw = h // p, w // p
        patches = images[:, : gh * p, : gw * p].astype(dtype).reshape(n, gh, p, gw, p, c)
        kernel = self.conv1.kernel[...].astype(dtype)  # [p, p, 3, W]
        return einsum("nyawbc,abcd->nywd", patches, kernel, out_dtype=jnp.float32).astype(dtype)

    def __call__(self, images: jax.Array, region_masks: jax.Array | None = None) -> jax.Array:
        dtype = self.dtype
        x = self.patch_embedding(images)  # [N, gh, gw, W]
        n, gh, gw, w = x.shape
        x = x.reshape(n, gh * gw, w)
        prompted = self.mask_prompt_depth > 0 and region_masks is not None
        if prompted:
            fg = patch_foreground(region_masks, self.patch_size, (gh, gw))  # [N, P, 1]
            prompts = self.mask_prompts((gh, gw)).astype(dtype)
            x = jnp.where(fg, x, prompts[0])
        cls = jnp.broadcast_to(self.class_embedding[...].astype(dtype), (n, 1, w))
        x = jnp.concatenate([cls, x], axis=1) + self.positions((gh, gw)).astype(dtype)
        x = self.ln_pre(x)
        v = self.vpt_tokens  # the patch tokens start at 1 + v once the visual prompts are in
        layers = len(self.transformer.resblocks)
        per_layer = {}
        if v:  # block i < vpt_depth gets vpt_embedding[i] in place of the prompt tokens
            x = jnp.concatenate([x[:, :1], jnp.zeros((n, v, w), dtype), x[:, 1:]], axis=1)
            per_layer["vpt"] = _pad_layers(self.vpt_embedding[...].astype(dtype), layers)
        if prompted:  # after block i, mask_prompts[i + 1] for i + 1 < depth
            per_layer["mask"] = _pad_layers(prompts[1:], layers)

        def step(block, x, prompt):
            if "vpt" in prompt:
                deep = jnp.broadcast_to(prompt["vpt"][0], (n, v, w))
                x = jnp.concatenate([x[:, :1], jnp.where(prompt["vpt"][1], deep, x[:, 1:1 + v]), x[:, 1 + v:]], axis=1)
            x = block(x)
            if "mask" in prompt:
                patches = x[:, 1 + v:]
                masked = jnp.where(fg, patches, prompt["mask"][0])
                x = jnp.concatenate([x[:, :1 + v], jnp.where(prompt["mask"][1], masked, patches)], axis=1)
            return x, None

        x, _ = self.transformer.run_stack(step, self.transformer.resblocks, x, per_layer)
        x = self.ln_post(x[:, 0])
        return einsum("nd,de->ne", x, self.proj[...].astype(dtype))


class CLIP(nnx.Module):
    """CLIP with OVSeg's mask-prompted image tower.

    `encode_image(images [N, H, W, 3], region_masks [N, H, W] | None) -> [N, D]` and
    `encode_text(token_ids [N, L] int32) -> [N, D]` return projected, unnormalised features in
    float32. Parameters are float32; `dtype` is the compute dtype.
    """

    def __init__(self, config: ClipConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        cfg = config.validate()
        self.config = cfg
        self.dtype = dtype
        self.visual = VisionTransformer(cfg, dtype=dtype, rngs=rngs)
        tw = cfg.text_width
        self.token_embedding = nnx.Embed(cfg.vocab_size, tw, dtype=dtype, param_dtype=jnp.float32,
                                         embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.positional_embedding = nnx.Param(0.01 * jax.random.normal(rngs.params(), (cfg.context_length, tw)))
        self.transformer = Transformer(tw, cfg.text_layers, cfg.text_heads, cfg.text_mlp_dim,
                                       cfg.text_act, cfg.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.ln_final = layer_norm(tw, dtype=dtype, eps=cfg.layer_norm_eps, rngs=rngs)
        self.text_projection = nnx.Param(tw**-0.5 * jax.random.normal(rngs.params(), (tw, cfg.embed_dim)))
        self.logit_scale = nnx.Param(jnp.asarray(jnp.log(1 / 0.07), jnp.float32))

    def encode_image(self, images: jax.Array, region_masks: jax.Array | None = None) -> jax.Array:
        return self.visual(images, region_masks).astype(jnp.float32)

    def encode_text(self, token_ids: jax.Array) -> jax.Array:
        length = token_ids.shape[1]
        if length > self.config.context_length:
            raise ValueError(f"token_ids has {length} positions; the model's context length is "
                             f"{self.config.context_length}")
        x = self.token_embedding(token_ids) + self.positional_embedding[:length].astype(self.dtype)
        x = self.ln_final(self.transformer(x, is_causal=True))
        # Pool at the first end-of-text token (OpenAI: argmax of ids, EOT being the largest id).
        eot = jnp.argmax(token_ids == self.config.eot_token_id, axis=-1)
        pooled = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
        return einsum("nd,de->ne", pooled, self.text_projection[...].astype(self.dtype), out_dtype=jnp.float32)

    def __call__(self, images, token_ids, region_masks=None):
        """Both towers: `(image_features [N, D], text_features [M, D])`, unnormalised."""
        return self.encode_image(images, region_masks), self.encode_text(token_ids)
