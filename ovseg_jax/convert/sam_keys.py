"""SAM checkpoint layouts: segment_anything <-> transformers key names, <-> our NNX model, and
architecture inference.

The `segment_anything` layout (the released `sam_vit_{b,l,h}_*.pth` state dicts) is our
interchange format: `ovseg_jax.models.sam` mirrors its names, so `convert.params.torch_to_nnx`
reads it once the transposed-conv kernels are turned (`to_nnx_layout`). transformers' `SamModel`
renames modules (`RENAMES`, one table for both directions), numbers its MLP layers as
`proj_in, layers.*, proj_out`, and keeps the random-Fourier matrix as
`shared_image_embedding.positional_embedding` (tied to `prompt_encoder.shared_embedding.*`).
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from ovseg_jax.convert.torch_io import CheckpointError
from ovseg_jax.models.sam import SamConfig
from ovseg_jax.models.sam.image_encoder import ENCODER_LN_EPS

# (segment_anything prefix, transformers prefix); `{i}` is a layer index. The rest of the key
# (`weight`, `bias`, `rel_pos_h`, ...) is kept.
RENAMES = (
    ("image_encoder.patch_embed.proj.", "vision_encoder.patch_embed.projection."),
    ("image_encoder.pos_embed", "vision_encoder.pos_embed"),
    ("image_encoder.blocks.{i}.norm1.", "vision_encoder.layers.{i}.layer_norm1."),
    ("image_encoder.blocks.{i}.norm2.", "vision_encoder.layers.{i}.layer_norm2."),
    ("image_encoder.blocks.{i}.", "vision_encoder.layers.{i}."),  # attn.qkv, attn.proj, attn.rel_pos_*, mlp.lin*
    ("image_encoder.neck.0.", "vision_encoder.neck.conv1."),
    ("image_encoder.neck.1.", "vision_encoder.neck.layer_norm1."),
    ("image_encoder.neck.2.", "vision_encoder.neck.conv2."),
    ("image_encoder.neck.3.", "vision_encoder.neck.layer_norm2."),
    ("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix", "shared_image_embedding.positional_embedding"),
    ("prompt_encoder.point_embeddings.{i}.", "prompt_encoder.point_embed.{i}."),
    ("prompt_encoder.mask_downscaling.0.", "prompt_encoder.mask_embed.conv1."),
    ("prompt_encoder.mask_downscaling.1.", "prompt_encoder.mask_embed.layer_norm1."),
    ("prompt_encoder.mask_downscaling.3.", "prompt_encoder.mask_embed.conv2."),
    ("prompt_encoder.mask_downscaling.4.", "prompt_encoder.mask_embed.layer_norm2."),
    ("prompt_encoder.mask_downscaling.6.", "prompt_encoder.mask_embed.conv3."),
    ("prompt_encoder.", "prompt_encoder."),  # not_a_point_embed, no_mask_embed
    ("mask_decoder.transformer.layers.{i}.norm1.", "mask_decoder.transformer.layers.{i}.layer_norm1."),
    ("mask_decoder.transformer.layers.{i}.norm2.", "mask_decoder.transformer.layers.{i}.layer_norm2."),
    ("mask_decoder.transformer.layers.{i}.norm3.", "mask_decoder.transformer.layers.{i}.layer_norm3."),
    ("mask_decoder.transformer.layers.{i}.norm4.", "mask_decoder.transformer.layers.{i}.layer_norm4."),
    ("mask_decoder.transformer.norm_final_attn.", "mask_decoder.transformer.layer_norm_final_attn."),
    ("mask_decoder.output_upscaling.0.", "mask_decoder.upscale_conv1."),
    ("mask_decoder.output_upscaling.1.", "mask_decoder.upscale_layer_norm."),
    ("mask_decoder.output_upscaling.3.", "mask_decoder.upscale_conv2."),
    ("mask_decoder.", "mask_decoder."),  # transformer attention and MLPs, tokens; the heads' MLPs below
)
# The decoder's MLP heads: segment_anything `layers.{j}` (j < depth) vs transformers `proj_in`,
# `layers.{j - 1}`, `proj_out`.
_MLP_HEADS = r"mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head)"
# Transposed convs: PyTorch `[in, out, k, k]`, ours `kernel [k, k, in, out]`.
TRANSPOSED_CONVS = ("mask_decoder.output_upscaling.0", "mask_decoder.output_upscaling.3")
_HF_TIED = "prompt_encoder.shared_embedding.positional_embedding"

SEGMENT_ANYTHING_PREFIXES = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
TRANSFORMERS_PREFIXES = ("vision_encoder.", "shared_image_embedding.")


def _pattern(template: str) -> str:
    return re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)")


def _rename(key: str, source: int) -> str | None:
    """`key` renamed by the first rule of `RENAMES` whose side `source` (0 = segment_anything,
    1 = transformers) is a prefix of it; None if no rule matches."""
    for rule in RENAMES:
        m = re.match(_pattern(rule[source]), key)
        if m:
            target = rule[1 - source].replace("{i}", m.groupdict().get("i") or "")
            return target + key[m.end():]
    return None


def _mlp_depths(keys, pattern: str) -> dict[str, int]:
    """`{mlp prefix: number of layers}` for the decoder's MLP heads named by `pattern`'s layers."""
    depths: dict[str, int] = {}
    for key in keys:
        m = re.match(rf"({_MLP_HEADS})\.{pattern}", key)
        if m:
            depths[m[1]] = depths.get(m[1], 0) + key.endswith(".weight")
    return depths


def is_transformers_layout(state: Mapping[str, np.ndarray]) -> bool:
    return any(k.startswith(TRANSFORMERS_PREFIXES) for k in state)


def transformers_to_segment_anything(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers `SamModel` state dict -> segment_anything layout. Unknown keys pass through
    unchanged (the model loader reports them)."""
    state = dict(state)
    tied = state.pop(_HF_TIED, None)
    if tied is not None:
        state.setdefault("shared_image_embedding.positional_embedding", tied)
    depths = {p: n + 2 for p, n in _mlp_depths(state, r"layers\.\d+\.").items()}
    depths |= {p: 2 for p in _mlp_depths(state, r"proj_in\.") if p not in depths}
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        m = re.fullmatch(rf"({_MLP_HEADS})\.(proj_in|proj_out|layers\.(\d+))\.(weight|bias)", key)
        if m:
            index = 0 if m[2] == "proj_in" else depths[m[1]] - 1 if m[2] == "proj_out" else int(m[3]) + 1
            out[f"{m[1]}.layers.{index}.{m[4]}"] = value
            continue
        out[_rename(key, 1) or key] = value
    return out


def segment_anything_to_transformers(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """segment_anything layout -> transformers `SamModel` state dict (inverse of the above; the
    tied `prompt_encoder.shared_embedding` copy is left to transformers)."""
    depths = _mlp_depths(state, r"layers\.\d+\.")
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        m = re.fullmatch(rf"({_MLP_HEADS})\.layers\.(\d+)\.(weight|bias)", key)
        if m:
            j, last = int(m[2]), depths[m[1]] - 1
            name = "proj_in" if j == 0 else "proj_out" if j == last else f"layers.{j - 1}"
            out[f"{m[1]}.{name}.{m[3]}"] = value
            continue
        renamed = _rename(key, 0)
        if renamed is None:
            raise CheckpointError(f"no transformers name for SAM key {key!r}")
        out[renamed] = value
    return out


def to_nnx_layout(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """segment_anything state dict -> the names `convert.params.torch_to_nnx` maps onto our model:
    transposed-conv weights become `kernel [k, k, in, out]`."""
    out = dict(state)
    for prefix in TRANSPOSED_CONVS:
        weight = out.pop(prefix + ".weight", None)
        if weight is not None:
            out[prefix + ".kernel"] = np.ascontiguousarray(weight.transpose(2, 3, 0, 1))
    return out


def from_nnx_layout(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of `to_nnx_layout` on `convert.params.nnx_to_torch`'s output, which writes every 4-D
    kernel as a conv weight `[out, in, k, k]`: transposed convs are swapped to `[in, out, k, k]`."""
    out = dict(state)
    for prefix in TRANSPOSED_CONVS:
        out[prefix + ".weight"] = np.ascontiguousarray(out[prefix + ".weight"].swapaxes(0, 1))
    return out


# --------------------------------------------------------------------------------------------
# Architecture


def _count(state: Mapping[str, np.ndarray], prefix: str) -> int:
    found = {int(m[1]) for k in state if (m := re.match(re.escape(prefix) + r"\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


_REQUIRED = ("image_encoder.patch_embed.proj.weight", "image_encoder.pos_embed", "image_encoder.neck.0.weight",
             "image_encoder.blocks.0.attn.rel_pos_h", "image_encoder.blocks.0.mlp.lin1.weight",
             "prompt_encoder.mask_downscaling.3.weight", "mask_decoder.mask_tokens.weight",
             "mask_decoder.transformer.layers.0.mlp.lin1.weight",
             "mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight",
             "mask_decoder.iou_prediction_head.layers.0.weight")


def config_from_segment_anything(state: Mapping[str, np.ndarray], source: str = "checkpoint",
                                 decoder_heads: int = 8) -> SamConfig:
    """Infer the architecture from a segment_anything state dict: widths, depths and MLP sizes
    from shapes; encoder heads = width / head width (the relative position tables' columns);
    global attention at the blocks whose tables span the whole grid (2 g - 1 rows), the window
    from the others'. The mask decoder's head count is not in the shapes: `decoder_heads` (8 in
    every released model)."""
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"{source}: not a segment_anything SAM checkpoint; missing {missing}. "
                              f"Found keys such as {sorted(state)[:8]}")
    patch = state["image_encoder.patch_embed.proj.weight"]
    width, patch_size = patch.shape[0], patch.shape[-1]
    grid = state["image_encoder.pos_embed"].shape[1]
    depth = _count(state, "image_encoder.blocks")
    rows = [state[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape[0] for i in range(depth)]
    global_blocks = tuple(i for i, r in enumerate(rows) if r == 2 * grid - 1)
    windows = {(r + 1) // 2 for r in rows if r != 2 * grid - 1}
    if len(windows) > 1:
        raise CheckpointError(f"{source}: windowed blocks have relative position tables for windows {sorted(windows)}; "
                              "SAM uses one window size")
    head_dim = state["image_encoder.blocks.0.attn.rel_pos_h"].shape[1]
    dim = state["image_encoder.neck.0.weight"].shape[0]
    internal = state["mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight"].shape[0]
    return SamConfig(
        image_size=grid * patch_size, patch_size=patch_size, encoder_width=width, encoder_depth=depth,
        encoder_heads=width // head_dim, encoder_mlp_dim=state["image_encoder.blocks.0.mlp.lin1.weight"].shape[0],
        window_size=windows.pop() if windows else 14, global_attn_indexes=global_blocks,
        prompt_embed_dim=dim, mask_in_chans=state["prompt_encoder.mask_downscaling.3.weight"].shape[0],
        decoder_depth=_count(state, "mask_decoder.transformer.layers"), decoder_heads=decoder_heads,
        decoder_mlp_dim=state["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0],
        attention_downsample_rate=dim // internal,
        num_multimask_outputs=state["mask_decoder.mask_tokens.weight"].shape[0] - 1,
        iou_head_depth=_count(state, "mask_decoder.iou_prediction_head.layers"),
        iou_head_hidden_dim=state["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0],
    )


def config_from_transformers(cfg: Mapping, source: str = "config.json") -> SamConfig:
    """Architecture from a transformers `SamConfig` dict (config.json); settings our model does not
    implement (no relative or absolute positions, other activations or norm eps) are refused."""
    try:
        v, p, d = cfg["vision_config"], cfg.get("prompt_encoder_config") or {}, cfg.get("mask_decoder_config") or {}
        width = v.get("hidden_size", 768)
        unsupported = {f"vision_config.{k}": v[k] for k, ok in (
            ("use_abs_pos", True), ("use_rel_pos", True), ("qkv_bias", True), ("hidden_act", "gelu"),
            ("layer_norm_eps", ENCODER_LN_EPS)) if k in v and v[k] != ok}
        unsupported |= {f"prompt_encoder_config.{k}": p[k] for k, ok in (
            ("hidden_act", "gelu"), ("layer_norm_eps", 1e-6), ("num_point_embeddings", 4)) if k in p and p[k] != ok}
        if d.get("hidden_act", "relu") != "relu":
            unsupported["mask_decoder_config.hidden_act"] = d["hidden_act"]
        if unsupported:
            raise CheckpointError(f"{source}: SAM settings ovseg_jax does not implement: {unsupported}")
        config = SamConfig(
            image_size=v.get("image_size", 1024), patch_size=v.get("patch_size", 16), encoder_width=width,
            encoder_depth=v.get("num_hidden_layers", 12), encoder_heads=v.get("num_attention_heads", 12),
            encoder_mlp_dim=v.get("mlp_dim") or int(width * v.get("mlp_ratio", 4.0)),
            window_size=v.get("window_size", 14),
            global_attn_indexes=tuple(v.get("global_attn_indexes", (2, 5, 8, 11))),
            prompt_embed_dim=v.get("output_channels", 256), mask_in_chans=p.get("mask_input_channels", 16),
            decoder_depth=d.get("num_hidden_layers", 2), decoder_heads=d.get("num_attention_heads", 8),
            decoder_mlp_dim=d.get("mlp_dim", 2048), attention_downsample_rate=d.get("attention_downsample_rate", 2),
            num_multimask_outputs=d.get("num_multimask_outputs", 3), iou_head_depth=d.get("iou_head_depth", 3),
            iou_head_hidden_dim=d.get("iou_head_hidden_dim", 256), decoder_norm_eps=d.get("layer_norm_eps", 1e-6),
        )
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{source}: not a transformers SAM config ({e!r})") from None
    for name, size in (("prompt_encoder_config.hidden_size", p.get("hidden_size")),
                       ("mask_decoder_config.hidden_size", d.get("hidden_size"))):
        if size is not None and size != config.prompt_embed_dim:
            raise CheckpointError(f"{source}: {name} {size} differs from vision_config.output_channels "
                                  f"{config.prompt_embed_dim}")
    try:
        return config.validate()
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def transformers_config_dict(cfg: SamConfig) -> dict:
    """transformers `SamConfig` keyword arguments for `cfg`."""
    dim = cfg.prompt_embed_dim
    return dict(
        vision_config=dict(hidden_size=cfg.encoder_width, output_channels=dim, num_hidden_layers=cfg.encoder_depth,
                           num_attention_heads=cfg.encoder_heads, image_size=cfg.image_size,
                           patch_size=cfg.patch_size, mlp_dim=cfg.encoder_mlp_dim, window_size=cfg.window_size,
                           global_attn_indexes=list(cfg.global_attn_indexes), num_pos_feats=dim // 2,
                           layer_norm_eps=ENCODER_LN_EPS),
        prompt_encoder_config=dict(hidden_size=dim, image_size=cfg.image_size, patch_size=cfg.patch_size,
                                   mask_input_channels=cfg.mask_in_chans),
        mask_decoder_config=dict(hidden_size=dim, mlp_dim=cfg.decoder_mlp_dim, num_hidden_layers=cfg.decoder_depth,
                                 num_attention_heads=cfg.decoder_heads,
                                 attention_downsample_rate=cfg.attention_downsample_rate,
                                 num_multimask_outputs=cfg.num_multimask_outputs, iou_head_depth=cfg.iou_head_depth,
                                 iou_head_hidden_dim=cfg.iou_head_hidden_dim, layer_norm_eps=cfg.decoder_norm_eps),
    )
