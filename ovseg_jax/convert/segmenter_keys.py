"""Key tables between segmenter checkpoints and our `Segmenter` (PyTorch-style names, i.e. what
`ovseg_jax.convert.params.nnx_to_torch(segmenter)` produces).

OVSeg `.pth` (reference 6.1, inside detectron2's `{"model": ...}`) <-> ours: a prefix table.
transformers `MaskFormerForInstanceSegmentation` -> ours: prefix/index rules plus fusing the
separate q/k/v projections into PyTorch's `in_proj` layout. Backbone keys are delegated to
`ovseg_jax.convert.backbone_keys`.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from ovseg_jax.convert.torch_io import CheckpointError
from ovseg_jax.models.resnet import ResNetConfig
from ovseg_jax.models.swin import SwinConfig

# (OVSeg prefix, our prefix); the first match wins, so the most specific come first.
OVSEG_PREFIXES = (
    ("sem_seg_head.predictor.transformer.decoder.layers.", "transformer_decoder.layers."),
    ("sem_seg_head.predictor.transformer.decoder.norm.", "transformer_decoder.norm."),
    ("sem_seg_head.predictor.query_embed.", "transformer_decoder.query_embed."),
    ("sem_seg_head.predictor.input_proj.", "transformer_decoder.input_proj."),
    ("sem_seg_head.predictor.class_embed.", "class_embed."),
    ("sem_seg_head.predictor.mask_embed.", "mask_embed."),
    ("sem_seg_head.pixel_decoder.", "pixel_decoder."),
    ("clip_adapter.non_object_embedding", "non_object_embedding"),
    ("backbone.", "backbone."),
)
# Parts of an OVSeg checkpoint that are not the segmenter (CLIP is loaded by ovseg_jax.clip).
OVSEG_OTHER_PREFIXES = ("clip_adapter.clip_model.", "clip_adapter.pixel_mean", "clip_adapter.pixel_std",
                        "criterion.", "pixel_mean", "pixel_std")
OVSEG_ANCHOR = "sem_seg_head.predictor.query_embed.weight"


def _rename(key: str, table) -> str | None:
    for src, dst in table:
        if key.startswith(src):
            return dst + key[len(src):]
    return None


def split_ovseg(state: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """An OVSeg `model` dict -> (segmenter head keys in our names, backbone keys with `backbone.`
    stripped (checkpoint names), other keys (CLIP adapter, criterion, unknown))."""
    head, backbone, other = {}, {}, {}
    for key, value in state.items():
        if key.startswith("backbone."):
            backbone[key[len("backbone."):]] = value
            continue
        new = _rename(key, OVSEG_PREFIXES)
        (head if new is not None else other)[new if new is not None else key] = value
    return head, backbone, other


def to_ovseg(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our PyTorch-style names -> OVSeg `model` dict names (backbone keys must already be in the
    checkpoint's names under `backbone.`)."""
    inverse = tuple((dst, src) for src, dst in OVSEG_PREFIXES)
    out = {}
    for key, value in state.items():
        new = _rename(key, inverse)
        if new is None:
            raise KeyError(f"no OVSeg name for segmenter parameter {key}")
        out[new] = value
    return out


# ---------------------------------------------------------------------------------------------
# transformers MaskFormer

HF_PREFIX = "model."  # MaskFormerForInstanceSegmentation wraps MaskFormerModel in `model`
HF_BACKBONE = "model.pixel_level_module.encoder."
HF_DROPPED = ("class_predictor.", "criterion.")  # closed-vocabulary classifier, loss buffer

_HF_DECODER_RULES = (
    (r"self_attn_layer_norm\.", "norm1."),
    (r"encoder_attn_layer_norm\.", "norm2."),
    (r"final_layer_norm\.", "norm3."),
    (r"encoder_attn\.", "multihead_attn."),
    (r"^(mlp\.)?fc1\.", "linear1."),  # `mlp.fc1` in memory, `fc1` in saved checkpoints
    (r"^(mlp\.)?fc2\.", "linear2."),
    (r"\.o_proj\.", ".out_proj."),
)


def hf_maskformer_to_ours(state: Mapping[str, np.ndarray], num_features: int, source: str) -> tuple[dict, dict]:
    """transformers MaskFormer state dict -> (head keys in our names, backbone keys with the
    `model.pixel_level_module.encoder.` prefix stripped). `num_features` is the number of backbone
    levels fed to the FPN (4). `class_predictor` (a closed-vocabulary Linear) is dropped."""
    head, backbone, qkv = {}, {}, {}
    unknown = []
    n = num_features
    for key, value in state.items():
        if key.startswith(HF_BACKBONE):
            backbone[key[len(HF_BACKBONE):]] = value
            continue
        if key.startswith(HF_DROPPED):
            continue
        k = key[len(HF_PREFIX):] if key.startswith(HF_PREFIX) else key
        if k.startswith("pixel_level_module.decoder."):
            k = k[len("pixel_level_module.decoder."):]
            m = re.fullmatch(r"fpn\.stem\.([01])\.(\w+)", k)
            if m:
                new = f"pixel_decoder.layer_{n}." + ("" if m[1] == "0" else "norm.") + m[2]
            elif m := re.fullmatch(r"fpn\.layers\.(\d+)\.(proj|block)\.([01])\.(\w+)", k):
                idx = n - 1 - int(m[1])
                name = f"adapter_{idx}" if m[2] == "proj" else f"layer_{idx}"
                new = f"pixel_decoder.{name}." + ("" if m[3] == "0" else "norm.") + m[4]
            elif m := re.fullmatch(r"mask_projection\.(\w+)", k):
                new = f"pixel_decoder.mask_features.{m[1]}"
            else:
                new = None
        elif k.startswith("transformer_module."):
            k = k[len("transformer_module."):]
            if k.startswith("queries_embedder."):
                new = "transformer_decoder.query_embed." + k[len("queries_embedder."):]
            elif k.startswith("input_projection."):
                new = "transformer_decoder.input_proj." + k[len("input_projection."):]
            elif k.startswith("decoder.layernorm."):
                new = "transformer_decoder.norm." + k[len("decoder.layernorm."):]
            elif m := re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", k):
                rest = m[2]
                for pat, rep in _HF_DECODER_RULES:
                    rest = re.sub(pat, rep, rest)
                new = f"transformer_decoder.layers.{m[1]}.{rest}"
                if q := re.fullmatch(r"(.+\.(?:self_attn|multihead_attn))\.([qkv])_proj\.(weight|bias)", new):
                    qkv.setdefault((q[1], q[3]), {})[q[2]] = value
                    continue
            else:
                new = None
        elif m := re.fullmatch(r"mask_embedder\.(\d+)\.0\.(\w+)", k):
            new = f"mask_embed.layers.{m[1]}.{m[2]}"
        else:
            new = None
        if new is None:
            unknown.append(key)
        else:
            head[new] = value
    for (stem, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{source}: {stem}: incomplete q/k/v projections ({sorted(parts)})")
        head[f"{stem}.in_proj_{kind}"] = np.concatenate([parts["q"], parts["k"], parts["v"]])
    if unknown:
        raise CheckpointError(f"{source}: unexpected keys for a MaskFormer ({len(unknown)}): "
                              + ", ".join(unknown[:20]))
    return head, backbone


# ---------------------------------------------------------------------------------------------
# Architecture from weights / configs (what the weights cannot tell comes from the defaults:
# heads of the transformer decoder, dropout rates, Swin drop-path)

def _count(state: Mapping[str, np.ndarray], pattern: str) -> int:
    found = {int(m[1]) for k in state if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def swin_config_from_state(state: Mapping[str, np.ndarray], source: str) -> SwinConfig:
    """Swin architecture from official-layout weights (no `backbone.` prefix)."""
    try:
        proj = state["patch_embed.proj.weight"]
        embed_dim, patch = proj.shape[0], proj.shape[-1]
        stages = _count(state, r"layers\.(\d+)\.blocks\.")
        depths = tuple(_count(state, rf"layers\.{i}\.blocks\.(\d+)\.") for i in range(stages))
        tables = [state[f"layers.{i}.blocks.0.attn.relative_position_bias_table"] for i in range(stages)]
        fc1 = state["layers.0.blocks.0.mlp.fc1.weight"]
    except KeyError as e:
        raise CheckpointError(f"{source}: not a Swin backbone: missing {e}") from None
    window = (int(round(tables[0].shape[0] ** 0.5)) + 1) // 2
    extra = {}
    if "absolute_pos_embed" in state:
        extra = dict(ape=True, pretrain_img_size=state["absolute_pos_embed"].shape[-1] * patch)
    return SwinConfig(embed_dim=embed_dim, depths=depths, num_heads=tuple(t.shape[1] for t in tables),
                      patch_size=patch, window_size=window, mlp_ratio=fc1.shape[0] / embed_dim,
                      qkv_bias="layers.0.blocks.0.attn.qkv.bias" in state,
                      patch_norm="patch_embed.norm.weight" in state,
                      # ImageNet classification checkpoints have no stage norms: all four stages
                      out_indices=tuple(i for i in range(stages) if f"norm{i}.weight" in state)
                      or tuple(range(stages)),
                      **extra).validate()


def resnet_config_from_state(state: Mapping[str, np.ndarray], source: str) -> ResNetConfig:
    """ResNet architecture from detectron2-layout weights: block counts, stem and widths. Dilations
    are not in the weights: the R101c preset's (res5 multi-grid 1, 2, 4) when the blocks are
    3/4/23/3 with the deep stem, none otherwise."""
    try:
        blocks = tuple(_count(state, rf"{stage}\.(\d+)\.") for stage in ("res2", "res3", "res4", "res5"))
        deep = "stem.conv2.weight" in state
        stem_out = state["stem.conv3.weight" if deep else "stem.conv1.weight"].shape[0]
        width = state["res2.0.conv1.weight"].shape[0]
        res2_out = state["res2.0.conv3.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"{source}: not a detectron2 ResNet backbone: missing {e}") from None
    fields = dict(num_blocks=blocks, stem_type="deeplab" if deep else "basic", stem_out_channels=stem_out,
                  width_per_group=width, res2_out_channels=res2_out)
    if blocks == (3, 4, 23, 3) and deep:
        return ResNetConfig.r101c(**fields)
    return ResNetConfig(**fields).validate()


def swin_config_from_hf(cfg: Mapping, source: str) -> SwinConfig:
    """transformers `SwinConfig` / `MaskFormerSwinConfig` dict -> our SwinConfig."""
    if cfg.get("model_type") not in ("swin", "maskformer-swin"):
        raise CheckpointError(f"{source}: backbone model_type {cfg.get('model_type')!r} is not supported; "
                              "expected a Swin backbone ('swin' or 'maskformer-swin')")
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{source}: Swin hidden_act {cfg['hidden_act']!r}; only exact GELU is supported")
    ape = dict(ape=True, pretrain_img_size=cfg.get("image_size", 224)) if cfg.get("use_absolute_embeddings") else {}
    return SwinConfig(embed_dim=cfg["embed_dim"], depths=tuple(cfg["depths"]), num_heads=tuple(cfg["num_heads"]),
                      patch_size=cfg.get("patch_size", 4), window_size=cfg["window_size"],
                      mlp_ratio=cfg.get("mlp_ratio", 4.0), qkv_bias=cfg.get("qkv_bias", True),
                      drop_path_rate=cfg.get("drop_path_rate", 0.1), **ape).validate()


def head_config_from_state(head: Mapping[str, np.ndarray], source: str) -> dict:
    """Decoder/head sizes from our-named head weights -> SegmenterConfig fields."""
    try:
        queries, hidden = head["transformer_decoder.query_embed.weight"].shape
        out = dict(num_queries=queries, hidden_dim=hidden,
                   conv_dim=head["pixel_decoder.layer_1.weight"].shape[0],
                   mask_dim=head["pixel_decoder.mask_features.weight"].shape[0],
                   dec_layers=_count(head, r"transformer_decoder\.layers\.(\d+)\."),
                   dim_feedforward=head["transformer_decoder.layers.0.linear1.weight"].shape[0])
        if "class_embed.layers.0.weight" in head:
            out.update(class_hidden_dim=head["class_embed.layers.0.weight"].shape[0],
                       clip_dim=head["class_embed.layers.1.weight"].shape[0])
    except KeyError as e:
        raise CheckpointError(f"{source}: segmenter head incomplete: missing {e}") from None
    return out


def head_config_from_hf(cfg: Mapping) -> dict:
    """transformers MaskFormerConfig dict -> SegmenterConfig fields of the decoder."""
    dec = cfg.get("decoder_config") or {}
    return dict(num_queries=dec.get("num_queries", 100), hidden_dim=dec.get("d_model", 256),
                conv_dim=cfg.get("fpn_feature_size", 256), mask_dim=cfg.get("mask_feature_size", 256),
                dec_layers=dec.get("decoder_layers", 6), nheads=dec.get("decoder_attention_heads", 8),
                dim_feedforward=dec.get("decoder_ffn_dim", 2048), dropout=dec.get("dropout", 0.1))
