"""CLIP checkpoint layouts: transformers (HF) <-> OpenAI key names, and architecture inference.

The OpenAI layout (reference 6.3) is our interchange format: OVSeg (`clip_adapter.clip_model.*`)
and open_clip (`module.*`) checkpoints use it, and `ovseg_jax.models.clip` mirrors its names.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from ovseg_jax.convert.torch_io import CheckpointError
from ovseg_jax.models.clip import ClipConfig

# (HF regex, OpenAI template) for 1:1 renames. `{0}` is the layer index.
_BLOCK_RENAMES = (
    ("self_attn.out_proj", "attn.out_proj"),
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
)
_TOWERS = (("vision_model.encoder.layers", "visual.transformer.resblocks"),
           ("text_model.encoder.layers", "transformer.resblocks"))
_FLAT_RENAMES = {
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.embeddings.mask_embedding": "visual.mask_embedding",  # ovseg_jax extension
    "vision_model.embeddings.vpt_embedding": "visual.vpt_embedding",  # ovseg_jax extension (deep VPT)
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}
_HF_BUFFERS = ("vision_model.embeddings.position_ids", "text_model.embeddings.position_ids")
# OpenAI TorchScript archives carry these scalars next to the weights.
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")

HF_PREFIXES = ("vision_model.", "text_model.", "visual_projection.", "text_projection.weight")


def is_hf_layout(state: Mapping[str, np.ndarray]) -> bool:
    return any(k.startswith(HF_PREFIXES) for k in state)


def hf_to_openai(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers `CLIPModel` state dict -> OpenAI layout (q/k/v fused into `in_proj`).

    Keys it does not know are passed through unchanged, so the model loader reports them.
    """
    out: dict[str, np.ndarray] = {}
    qkv: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for key, value in state.items():
        if key in _HF_BUFFERS:
            continue
        if key in _FLAT_RENAMES:
            out[_FLAT_RENAMES[key]] = value
            continue
        if key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = np.array(value.T, order="C")
            continue
        for hf_tower, oa_tower in _TOWERS:
            m = re.fullmatch(re.escape(hf_tower) + r"\.(\d+)\.(.+)", key)
            if not m:
                continue
            idx, rest = m.groups()
            proj = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
            if proj:
                qkv.setdefault((f"{oa_tower}.{idx}.attn.in_proj_", proj[2]), {})[proj[1]] = value
                break
            for hf_name, oa_name in _BLOCK_RENAMES:
                if rest.startswith(hf_name + "."):
                    out[f"{oa_tower}.{idx}.{oa_name}{rest[len(hf_name):]}"] = value
                    break
            else:
                out[key] = value
            break
        else:
            out[key] = value
    for (prefix, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"attention {prefix}{kind}: found only {sorted(parts)} of q/k/v projections")
        out[prefix + kind] = np.concatenate([parts["q"], parts["k"], parts["v"]], axis=0)
    return out


def openai_to_hf(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """OpenAI layout -> transformers `CLIPModel` state dict (inverse of `hf_to_openai`)."""
    flat = {v: k for k, v in _FLAT_RENAMES.items()}
    transposed = {v: k for k, v in _TRANSPOSED.items()}
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        if key in flat:
            out[flat[key]] = value
            continue
        if key in transposed:
            out[transposed[key]] = np.array(value.T, order="C")
            continue
        for hf_tower, oa_tower in _TOWERS:
            m = re.fullmatch(re.escape(oa_tower) + r"\.(\d+)\.(.+)", key)
            if not m:
                continue
            idx, rest = m.groups()
            base = f"{hf_tower}.{idx}."
            fused = re.fullmatch(r"attn\.in_proj_(weight|bias)", rest)
            if fused:
                for name, part in zip("qkv", np.split(value, 3, axis=0)):
                    out[f"{base}self_attn.{name}_proj.{fused[1]}"] = np.array(part, order="C")
                break
            for hf_name, oa_name in _BLOCK_RENAMES:
                if rest.startswith(oa_name + "."):
                    out[base + hf_name + rest[len(oa_name):]] = value
                    break
            else:
                raise CheckpointError(f"no transformers name for CLIP key {key!r}")
            break
        else:
            raise CheckpointError(f"no transformers name for CLIP key {key!r}")
    return out


def _count_blocks(state: Mapping[str, np.ndarray], prefix: str) -> int:
    idx = {int(m[1]) for k in state if (m := re.match(re.escape(prefix) + r"\.(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def config_from_openai(state: Mapping[str, np.ndarray], source: str = "checkpoint") -> ClipConfig:
    """Infer the architecture from an OpenAI-layout state dict, as OpenAI's `build_model` does
    (heads = width / 64, MLP 4x width, QuickGELU, EOT = last vocabulary id)."""
    required = ("visual.conv1.weight", "visual.positional_embedding", "visual.proj",
                "token_embedding.weight", "positional_embedding", "text_projection", "ln_final.weight")
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"{source}: not a CLIP checkpoint in the OpenAI layout; missing {missing}. "
                              f"Found keys such as {sorted(state)[:8]}")
    conv = state["visual.conv1.weight"]
    width, patch = conv.shape[0], conv.shape[-1]
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    if grid * grid + 1 != state["visual.positional_embedding"].shape[0]:
        raise CheckpointError(f"{source}: visual.positional_embedding has "
                              f"{state['visual.positional_embedding'].shape[0]} rows; expected grid*grid + 1")
    text_width = state["ln_final.weight"].shape[0]
    vocab = state["token_embedding.weight"].shape[0]
    mask = state.get("visual.mask_embedding")
    vpt = state.get("visual.vpt_embedding")  # [depth, tokens, width]
    return ClipConfig(
        embed_dim=state["text_projection"].shape[1],
        image_size=grid * patch, patch_size=patch, vision_width=width,
        vision_layers=_count_blocks(state, "visual.transformer.resblocks"),
        vision_heads=max(width // 64, 1), vision_mlp_dim=4 * width,
        context_length=state["positional_embedding"].shape[0], vocab_size=vocab,
        text_width=text_width, text_layers=_count_blocks(state, "transformer.resblocks"),
        text_heads=max(text_width // 64, 1), text_mlp_dim=4 * text_width, eot_token_id=vocab - 1,
        mask_prompt_depth=0 if mask is None else mask.shape[0],
        mask_prompt_shared=mask is not None and mask.shape[1] == 1,
        vpt_tokens=0 if vpt is None else vpt.shape[1], vpt_depth=0 if vpt is None else vpt.shape[0],
    )


def config_from_hf(cfg: Mapping, source: str = "config.json") -> ClipConfig:
    """Architecture from a transformers `CLIPConfig` dict (config.json)."""
    try:
        v, t = cfg["vision_config"], cfg["text_config"]
        eot = t.get("eos_token_id", 49407)
        if eot == 2 and t.get("vocab_size", 49408) > 3:
            eot = t.get("vocab_size", 49408) - 1  # legacy configs: transformers pools at argmax(ids)
        return ClipConfig(
            embed_dim=cfg.get("projection_dim", 512),
            image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 32),
            vision_width=v.get("hidden_size", 768), vision_layers=v.get("num_hidden_layers", 12),
            vision_heads=v.get("num_attention_heads", 12), vision_mlp_dim=v.get("intermediate_size", 3072),
            vision_act=v.get("hidden_act", "quick_gelu"),
            context_length=t.get("max_position_embeddings", 77), vocab_size=t.get("vocab_size", 49408),
            text_width=t.get("hidden_size", 512), text_layers=t.get("num_hidden_layers", 12),
            text_heads=t.get("num_attention_heads", 8), text_mlp_dim=t.get("intermediate_size", 2048),
            text_act=t.get("hidden_act", "quick_gelu"), eot_token_id=eot,
            mask_prompt_depth=cfg.get("ovseg_mask_prompt_depth", 0),
            mask_prompt_shared=cfg.get("ovseg_mask_prompt_shared", False),
            vpt_tokens=cfg.get("ovseg_vpt_tokens", 0), vpt_depth=cfg.get("ovseg_vpt_depth", 0),
            layer_norm_eps=v.get("layer_norm_eps", 1e-5),
        )
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{source}: not a transformers CLIP config ({e!r})") from None


def hf_config_dict(cfg: ClipConfig) -> dict:
    """transformers `CLIPConfig` keyword arguments for `cfg` (plus our mask-prompt fields)."""
    return dict(
        projection_dim=cfg.embed_dim,
        vision_config=dict(hidden_size=cfg.vision_width, intermediate_size=cfg.vision_mlp_dim,
                           num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                           image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_act=cfg.vision_act,
                           layer_norm_eps=cfg.layer_norm_eps, projection_dim=cfg.embed_dim),
        text_config=dict(hidden_size=cfg.text_width, intermediate_size=cfg.text_mlp_dim,
                         num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                         max_position_embeddings=cfg.context_length, vocab_size=cfg.vocab_size,
                         hidden_act=cfg.text_act, eos_token_id=cfg.eot_token_id,
                         bos_token_id=max(cfg.eot_token_id - 1, 0), pad_token_id=cfg.eot_token_id,
                         layer_norm_eps=cfg.layer_norm_eps, projection_dim=cfg.embed_dim),
        ovseg_mask_prompt_depth=cfg.mask_prompt_depth,
        ovseg_mask_prompt_shared=cfg.mask_prompt_shared,
        ovseg_vpt_tokens=cfg.vpt_tokens, ovseg_vpt_depth=cfg.vpt_depth,
    )
