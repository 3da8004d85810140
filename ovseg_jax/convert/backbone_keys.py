"""Backbone checkpoint layouts -> our names (= official Swin / detectron2 ResNet names).

Our `SwinTransformer` and `ResNet` name their attributes after the official Swin and detectron2
checkpoints, so those load with `ovseg_jax.convert.params.torch_to_nnx` once the unused entries
are dropped. The other layouts are rename tables:

| source                                   | function                     |
|------------------------------------------|------------------------------|
| official Swin `model` dict / OVSeg `backbone.*` | `swin_from_official`  |
| transformers `SwinModel`, `SwinBackbone`, `MaskFormerSwinBackbone` | `swin_from_transformers` |
| detectron2 ResNet (`.pkl`, `stem.conv1.norm.running_mean`, ...) | `resnet_from_detectron2` |
| torchvision `resnet*` state dict         | `resnet_from_torchvision`    |

`load_backbone_weights(model, state)` detects the layout, converts and loads, raising
`CheckpointError` with every missing / unexpected key and bad shape.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from ovseg_jax.convert.params import torch_to_nnx
from ovseg_jax.convert.torch_io import CheckpointError

# ---------------------------------------------------------------------------------------- Swin

# Buffers rebuilt from the config, the classifier head and the final norm (unused by a backbone).
_SWIN_UNUSED = re.compile(r"(^head\..*|^norm\.(weight|bias)$|.*\.relative_position_index$|"
                          r".*\.attn_mask$)")


def _unwrap(state: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """Keep a `{"model": {...}}` wrapper's content and strip a common `prefix` if every key has it."""
    if "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    keys = list(state)
    if keys and all(k.startswith(prefix) for k in keys):
        return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def swin_from_official(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Official Swin / MaskFormer (`backbone.` prefix allowed) state dict -> our names: drops
    `head.*`, the final `norm.*`, `relative_position_index` and `attn_mask` buffers."""
    return {k: v for k, v in _unwrap(state, "backbone.").items() if not _SWIN_UNUSED.match(k)}


# (transformers block-relative name, our block-relative name); both the 5.x (`q_proj`) and the
# 4.x / MaskFormerSwin (`attention.self.query`) layouts.
_HF_SWIN_BLOCK = (
    ("layernorm_before.", "norm1."),
    ("layernorm_after.", "norm2."),
    ("attention.o_proj.", "attn.proj."),
    ("attention.output.dense.", "attn.proj."),
    ("attention.relative_position_bias.relative_position_bias_table", "attn.relative_position_bias_table"),
    ("attention.self.relative_position_bias_table", "attn.relative_position_bias_table"),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
    ("mlp.fc1.", "mlp.fc1."),
    ("mlp.fc2.", "mlp.fc2."),
)
_HF_QKV = re.compile(r"attention\.(?:([qkv])_proj|self\.(query|key|value))\.(weight|bias)")
_HF_SWIN_FLAT = {
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "embeddings.norm.weight": "patch_embed.norm.weight",
    "embeddings.norm.bias": "patch_embed.norm.bias",
}


def swin_from_transformers(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers `SwinModel` / `SwinBackbone` (`swin.` prefix, `hidden_states_norms.stageK`)
    or `MaskFormerSwinBackbone` (`model.` prefix, `hidden_states_norms.K`) -> our names.

    q/k/v are fused into `attn.qkv` ([q; k; v] rows); `hidden_states_norms` become `norm{i}`;
    the pooled-output `layernorm`, `relative_position_index` buffers and `mask_token` are dropped.
    Unknown keys pass through unchanged so the loader reports them.
    """
    out: dict[str, np.ndarray] = {}
    qkv: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for key, value in state.items():
        m = re.fullmatch(r"hidden_states_norms\.(stage)?(\d+)\.(weight|bias)", key)
        if m:  # SwinBackbone counts stages from 1 ("stage1"), MaskFormerSwin from 0
            out[f"norm{int(m[2]) - (1 if m[1] else 0)}.{m[3]}"] = value
            continue
        inner = re.sub(r"^(swin|model)\.", "", key)
        if (inner.startswith(("layernorm.", "embeddings.mask_token"))
                or inner.endswith("relative_position_index")):
            continue
        if inner in _HF_SWIN_FLAT:
            out[_HF_SWIN_FLAT[inner]] = value
            continue
        if inner == "embeddings.position_embeddings":  # [1, P*P, C] -> [1, C, P, P]
            grid = int(round(value.shape[1] ** 0.5))
            if grid * grid != value.shape[1]:
                raise CheckpointError(f"{key}: {value.shape[1]} positions is not a square grid")
            out["absolute_pos_embed"] = np.ascontiguousarray(
                value.reshape(1, grid, grid, -1).transpose(0, 3, 1, 2))
            continue
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.(blocks\.\d+|downsample)\.(.+)", inner)
        if not m:
            out[key] = value
            continue
        stem, rest = f"layers.{m[1]}.{m[2]}.", m[3]
        if m[2] == "downsample":
            out[stem + rest] = value
            continue
        proj = _HF_QKV.fullmatch(rest)
        if proj:
            part = proj[1] or proj[2][0]
            qkv.setdefault((stem + "attn.qkv.", proj[3]), {})[part] = value
            continue
        for hf_name, our_name in _HF_SWIN_BLOCK:
            if rest.startswith(hf_name):
                out[stem + our_name + rest[len(hf_name):]] = value
                break
        else:
            out[key] = value
    for (stem, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{stem}{kind}: found only {sorted(parts)} of the q/k/v projections")
        out[stem + kind] = np.concatenate([parts["q"], parts["k"], parts["v"]], axis=0)
    return out

