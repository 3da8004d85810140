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
`CheckpointError` with every missing / unexpected key and bad shape. torchvision's single 7x7
stem does not fit R101c's deep stem: that is an error unless `stages_only=True`.
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


def _unwrap(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Unwrap `{"model": {...}}` (nested, or flattened to `model.` keys) and a `backbone.` prefix
    (detectron2 / OVSeg checkpoints) when every key has it."""
    if "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    state = dict(state)
    for prefix in ("model.", "backbone."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def swin_from_official(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Official Swin / MaskFormer (`backbone.` prefix allowed) state dict -> our names: drops
    `head.*`, the final `norm.*`, `relative_position_index` and `attn_mask` buffers."""
    return {k: v for k, v in _unwrap(state).items() if not _SWIN_UNUSED.match(k)}


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



# -------------------------------------------------------------------------------------- ResNet

_BN_STATS_UNUSED = re.compile(r".*\.num_batches_tracked$")


def resnet_from_detectron2(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """detectron2 ResNet (`.pkl` `{"model": ...}` or a `backbone.`-prefixed OVSeg dict) -> our
    names (identical): drops `num_batches_tracked` and a classifier `linear.*` / `fc.*`."""
    return {k: v for k, v in _unwrap(state).items()
            if not (_BN_STATS_UNUSED.match(k) or k.startswith(("linear.", "fc.")))}


def resnet_from_torchvision(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """torchvision `resnet*` -> detectron2 names (as detectron2's `convert-torchvision-to-d2.py`):
    `conv1`/`bn1` -> `stem.conv1`/`stem.conv1.norm`, `layerN` -> `res{N+1}`, `bnK` -> `convK.norm`,
    `downsample.0/1` -> `shortcut`/`shortcut.norm`; `fc.*` and `num_batches_tracked` dropped.
    The stem is torchvision's single 7x7 conv: it fits `stem_type="basic"` only."""
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        if _BN_STATS_UNUSED.match(key) or key.startswith("fc."):
            continue
        m = re.fullmatch(r"(conv1|bn1)\.(.+)", key)
        if m:
            out[("stem.conv1." if m[1] == "conv1" else "stem.conv1.norm.") + m[2]] = value
            continue
        m = re.fullmatch(r"layer(\d)\.(\d+)\.(.+)", key)
        if not m:
            out[key] = value
            continue
        stem, rest = f"res{int(m[1]) + 1}.{m[2]}.", m[3]
        rest = re.sub(r"^bn(\d)\.", r"conv\1.norm.", rest)
        rest = re.sub(r"^downsample\.0\.", "shortcut.", rest)
        rest = re.sub(r"^downsample\.1\.", "shortcut.norm.", rest)
        out[stem + rest] = value
    return out


def _is_torchvision(state: Mapping[str, np.ndarray]) -> bool:
    return any(k.startswith(("layer1.", "bn1.")) for k in state)


def _is_transformers_swin(state: Mapping[str, np.ndarray]) -> bool:
    return any(k.startswith("hidden_states_norms.") or ".encoder.layers." in k
               or k.startswith("encoder.layers.") for k in state)


# Parameters of a deep-stem ResNet whose shapes depend on the stem (left at init by stages_only).
_STEM_DEPENDENT = ("stem.", "res2.0.conv1.", "res2.0.shortcut.")


def load_backbone_weights(model, state: Mapping[str, np.ndarray], *, source: str = "checkpoint",
                          stages_only: bool = False) -> None:
    """Load a backbone checkpoint of any supported layout into `model` (`SwinTransformer` or
    `ResNet`) in place; raises `CheckpointError` listing missing / unexpected keys and bad shapes.

    A Swin checkpoint without any stage norm `norm{i}` (an official ImageNet classification
    checkpoint) leaves them at their initial values (weight 1, bias 0).

    `stages_only` (ResNet only): load a 7x7-stem (torchvision / detectron2 basic) checkpoint into
    a deep-stem ResNet: `stem.*`, `res2.0.conv1` and `res2.0.shortcut` (whose input width is the
    stem's) keep their initial values; everything else must fit.
    """
    from ovseg_jax.models.resnet import ResNet  # noqa: PLC0415
    from ovseg_jax.models.swin import SwinTransformer  # noqa: PLC0415

    state = _unwrap(state)
    if isinstance(model, SwinTransformer):
        if stages_only:
            raise ValueError("stages_only applies to ResNet backbones only")
        converted = (swin_from_transformers(state) if _is_transformers_swin(state)
                     else swin_from_official(state))
        # An ImageNet classification checkpoint has no stage norms: they start at 1 / 0, as
        # detectron2 leaves them when it initialises OVSeg from one.
        has_stage_norms = any(re.match(r"norm\d\.", k) for k in converted)
        ignore = () if has_stage_norms else tuple(f"norm{i}." for i in range(len(model.layers)))
        torch_to_nnx(converted, model, source=source, ignore_missing=ignore)
        return
    if not isinstance(model, ResNet):
        raise TypeError(f"load_backbone_weights: expected SwinTransformer or ResNet, got {type(model).__name__}")
    converted = (resnet_from_torchvision(state) if _is_torchvision(state)
                 else resnet_from_detectron2(state))
    stem = converted.get("stem.conv1.weight")
    basic_file = stem is not None and stem.shape[-1] == 7
    deep_model = model.config.stem_type == "deeplab"
    ignore: tuple[str, ...] = ()
    if stages_only:
        if not (basic_file and deep_model):
            raise CheckpointError(f"{source}: stages_only is for loading a 7x7-stem checkpoint into a "
                                  "deep-stem (stem_type='deeplab') ResNet; this one fits as is")
        converted = {k: v for k, v in converted.items() if not k.startswith(_STEM_DEPENDENT)}
        ignore = _STEM_DEPENDENT
    elif basic_file and deep_model:
        raise CheckpointError(
            f"{source}: the checkpoint has a single 7x7-conv stem (torchvision / detectron2 basic "
            "ResNet) but the model uses the 3-conv deep stem (R101c, stem_type='deeplab'). Use "
            "detectron2's deep-stem weights (R-103.pkl), build the model with stem_type='basic' "
            "and stem_out_channels=64, or pass stages_only=True to load only the stages.")
    torch_to_nnx(converted, model, source=source, ignore_missing=ignore)
