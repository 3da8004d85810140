"""Backbone factory: `build_backbone("swin" | "resnet", config)`.

Both backbones share one interface: `model(images [B, H, W, 3], *, deterministic, rngs) ->
{"res2".."res5": [B, h, w, C]}` NHWC, with `model.out_channels` and `model.strides` dicts.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from ovseg_jax.models.resnet import ResNet, ResNetConfig
from ovseg_jax.models.swin import SwinConfig, SwinTransformer

BACKBONES = {"swin": (SwinConfig, SwinTransformer), "resnet": (ResNetConfig, ResNet)}


def build_backbone(name: str, config: SwinConfig | ResNetConfig | None = None, *,
                   dtype=jnp.float32, rngs: nnx.Rngs) -> SwinTransformer | ResNet:
    """Build the named backbone; `config=None` gives OVSeg's preset (Swin-B or R101c)."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(BACKBONES)}")
    config_cls, model_cls = BACKBONES[name]
    if config is None:
        config = SwinConfig.swin_b() if name == "swin" else ResNetConfig.r101c()
    if not isinstance(config, config_cls):
        raise TypeError(f"backbone {name!r} needs a {config_cls.__name__}; got {type(config).__name__}")
    return model_cls(config, dtype=dtype, rngs=rngs)
