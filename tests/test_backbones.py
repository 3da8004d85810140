"""Backbones against independent torch references (transformers Swin, torch.nn ResNet) and
checkpoint-layout conversion. Tiny random models, odd image sizes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from ovseg_jax.convert.backbone_keys import swin_from_official, swin_from_transformers
from ovseg_jax.convert.params import nnx_to_torch, torch_to_nnx
from ovseg_jax.convert.torch_io import CheckpointError
from ovseg_jax.models.swin import SwinConfig, SwinTransformer

TOL = 1e-4


def _perturb(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random non-trivial values for every parameter (transformers inits LayerNorms to 1/0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return module.eval()


def _state(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def _nchw(x: jax.Array) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


# Window 3 so the tiny maps get padded and shifted; 50x70 is a multiple of neither 3 nor 32.
SWIN_KW = dict(embed_dim=16, depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 4), window_size=3)
IMAGES = np.random.RandomState(0).randn(2, 3, 50, 70).astype(np.float32)


@pytest.fixture(scope="module")
def hf_swin_backbone():
    from transformers import SwinBackbone, SwinConfig as HFSwinConfig

    torch.manual_seed(0)
    hf = HFSwinConfig(image_size=64, embed_dim=16, depths=[1, 2, 1, 1], num_heads=[1, 2, 2, 4],
                      window_size=3, hidden_act="gelu",
                      out_features=["stage1", "stage2", "stage3", "stage4"])
    model = _perturb(SwinBackbone(hf), 1)
    with torch.no_grad():
        ref = [t.numpy() for t in model(torch.from_numpy(IMAGES)).feature_maps]
    return _state(model), ref


@pytest.fixture(scope="module")
def swin(hf_swin_backbone):
    state, _ = hf_swin_backbone
    model = SwinTransformer(SwinConfig(**SWIN_KW, drop_path_rate=0.2), rngs=nnx.Rngs(0))
    torch_to_nnx(swin_from_transformers(state), model, source="SwinBackbone")
    return model


def test_swin_matches_transformers_swin_backbone(swin, hf_swin_backbone):
    _, ref = hf_swin_backbone
    out = swin(jnp.asarray(IMAGES.transpose(0, 2, 3, 1)))
    assert list(out) == ["res2", "res3", "res4", "res5"]
    for r, key in zip(ref, out):
        assert _nchw(out[key]).shape == r.shape  # 13x18, 7x9, 4x5, 2x3: ceil at each stride
        np.testing.assert_allclose(_nchw(out[key]), r, atol=TOL, rtol=0)
    assert swin.out_channels == {"res2": 16, "res3": 32, "res4": 64, "res5": 128}
    assert swin.strides == {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


def test_swin_matches_maskformer_swin_backbone():
    """The 4.x / MaskFormerSwin layout (separate query/key/value, `intermediate.dense`, ...)."""
    from transformers import MaskFormerSwinConfig
    from transformers.models.maskformer.modeling_maskformer_swin import MaskFormerSwinBackbone

    torch.manual_seed(0)
    hf = MaskFormerSwinConfig(image_size=64, embed_dim=16, depths=[1, 2], num_heads=[1, 2],
                              window_size=3, out_features=["stage1", "stage2"])
    ref_model = _perturb(MaskFormerSwinBackbone(hf), 2)
    x = IMAGES[:1, :, :45, :37]
    with torch.no_grad():
        ref = [t.numpy() for t in ref_model(torch.from_numpy(x)).feature_maps]
    model = SwinTransformer(SwinConfig(embed_dim=16, depths=(1, 2), num_heads=(1, 2), window_size=3,
                                       out_indices=(0, 1)), rngs=nnx.Rngs(0))
    torch_to_nnx(swin_from_transformers(_state(ref_model)), model, source="MaskFormerSwinBackbone")
    out = model(jnp.asarray(x.transpose(0, 2, 3, 1)))
    for r, key in zip(ref, ("res2", "res3")):
        np.testing.assert_allclose(_nchw(out[key]), r, atol=TOL, rtol=0)


def test_swin_absolute_position_embedding_is_resized_bicubic():
    from transformers import SwinBackbone, SwinConfig as HFSwinConfig

    torch.manual_seed(0)
    hf = HFSwinConfig(image_size=32, embed_dim=16, depths=[1, 2], num_heads=[1, 2], window_size=3,
                      hidden_act="gelu", use_absolute_embeddings=True,
                      out_features=["stage1", "stage2"])
    ref_model = _perturb(SwinBackbone(hf), 3)
    # A multiple of the patch size: only then does transformers resize like the reference.
    x = np.random.RandomState(1).randn(1, 3, 52, 68).astype(np.float32)
    with torch.no_grad():
        ref = [t.numpy() for t in
               ref_model(torch.from_numpy(x), interpolate_pos_encoding=True).feature_maps]
    model = SwinTransformer(SwinConfig(embed_dim=16, depths=(1, 2), num_heads=(1, 2), window_size=3,
                                       ape=True, pretrain_img_size=32, out_indices=(0, 1)),
                            rngs=nnx.Rngs(0))
    torch_to_nnx(swin_from_transformers(_state(ref_model)), model)
    out = model(jnp.asarray(x.transpose(0, 2, 3, 1)))
    for r, key in zip(ref, ("res2", "res3")):
        np.testing.assert_allclose(_nchw(out[key]), r, atol=TOL, rtol=0)


def test_swin_stochastic_depth(swin):
    rates = [b.drop_path_rate for layer in swin.layers for b in layer.blocks]
    np.testing.assert_allclose(rates, torch.linspace(0, 0.2, 5).numpy(), rtol=1e-6)
    graphdef, state = nnx.split(swin)

    @jax.jit
    def forward(state, images, key):
        model = nnx.merge(graphdef, state)
        return model(images, deterministic=False, rngs=nnx.Rngs(dropout=key))["res5"]

    x = jnp.asarray(IMAGES.transpose(0, 2, 3, 1))
    a, b = forward(state, x, jax.random.key(0)), forward(state, x, jax.random.key(1))
    assert not np.allclose(a, b)
    assert np.isfinite(np.asarray(a)).all()
    with pytest.raises(ValueError, match="rngs"):
        swin(x, deterministic=False)


def test_swin_official_layout_round_trip(swin):
    """Official / OVSeg names (`backbone.` prefix, buffers, classifier head) load exactly."""
    ours = nnx_to_torch(swin)
    assert "layers.1.blocks.1.attn.qkv.weight" in ours and "norm3.weight" in ours
    official = {f"backbone.{k}": v for k, v in ours.items()}
    official["backbone.layers.1.blocks.1.attn.relative_position_index"] = np.zeros((9, 9), np.int64)
    official["backbone.layers.1.blocks.1.attn_mask"] = np.zeros((9, 9, 9), np.float32)
    official["backbone.head.weight"] = np.zeros((10, 128), np.float32)
    official["backbone.norm.weight"] = np.zeros((128,), np.float32)
    fresh = SwinTransformer(SwinConfig(**SWIN_KW, drop_path_rate=0.2), rngs=nnx.Rngs(7))
    torch_to_nnx(swin_from_official({"model": official}), fresh)
    back = nnx_to_torch(fresh)
    assert back.keys() == ours.keys()
    for k in ours:
        np.testing.assert_array_equal(back[k], ours[k], err_msg=k)


def test_swin_checkpoint_errors_name_the_keys(swin):
    state = swin_from_official(nnx_to_torch(swin))
    missing = {k: v for k, v in state.items() if k != "layers.0.blocks.0.attn.qkv.weight"}
    with pytest.raises(CheckpointError, match=r"missing.*layers\.0\.blocks\.0\.attn\.qkv\.kernel"):
        torch_to_nnx(missing, swin, source="swin.pth")
    extra = {**state, "layers.0.blocks.0.attn.extra": np.zeros(3, np.float32)}
    with pytest.raises(CheckpointError, match=r"(?s)swin\.pth.*unexpected.*attn\.extra"):
        torch_to_nnx(extra, swin, source="swin.pth")
    bad = {**state, "norm0.weight": np.zeros(5, np.float32)}
    with pytest.raises(CheckpointError, match=r"shape.*norm0\.weight"):
        torch_to_nnx(bad, swin)
