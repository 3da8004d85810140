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
    (r"mlp\.fc1\.", "linear1."),
    (r"mlp\.fc2\.", "linear2."),
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
