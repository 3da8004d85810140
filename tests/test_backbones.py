"""Backbones against independent torch references (transformers Swin, torch.nn ResNet) and
checkpoint-layout conversion. Tiny random models, odd image sizes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from ovseg_jax.convert.backbone_keys import (load_backbone_weights, swin_from_official,
                                             swin_from_transformers)
from ovseg_jax.convert.params import nnx_to_torch, torch_to_nnx
from ovseg_jax.convert.torch_io import CheckpointError, read_state_dict
from ovseg_jax.models.backbone import build_backbone
from ovseg_jax.models.resnet import FrozenStat, ResNet, ResNetConfig
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
    return _state(model), ref, model


@pytest.fixture(scope="module")
def swin(hf_swin_backbone):
    state, _, _ = hf_swin_backbone
    model = SwinTransformer(SwinConfig(**SWIN_KW, drop_path_rate=0.2), rngs=nnx.Rngs(0))
    torch_to_nnx(swin_from_transformers(state), model, source="SwinBackbone")
    return model


@pytest.mark.slow
def test_swin_matches_transformers_swin_backbone(swin, hf_swin_backbone):
    _, ref, _ = hf_swin_backbone
    out = swin(jnp.asarray(IMAGES.transpose(0, 2, 3, 1)))
    assert list(out) == ["res2", "res3", "res4", "res5"]
    for r, key in zip(ref, out):
        assert _nchw(out[key]).shape == r.shape  # 13x18, 7x9, 4x5, 2x3: ceil at each stride
        np.testing.assert_allclose(_nchw(out[key]), r, atol=TOL, rtol=0)
    assert swin.out_channels == {"res2": 16, "res3": 32, "res4": 64, "res5": 128}
    assert swin.strides == {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


@pytest.mark.slow
def test_swin_gradients_match_transformers(swin, hf_swin_backbone):
    """Every parameter's gradient (relative position bias tables included: their gradient sums over
    images and shifted, masked windows) equals transformers' for the same loss."""
    _, ref, hf_model = hf_swin_backbone
    weights = [np.random.RandomState(i).randn(*r.shape).astype(np.float32) for i, r in enumerate(ref)]
    hf_model.zero_grad()
    sum((f * torch.from_numpy(w)).sum() for f, w in zip(hf_model(torch.from_numpy(IMAGES)).feature_maps, weights)).backward()
    expected = SwinTransformer(SwinConfig(**SWIN_KW), rngs=nnx.Rngs(1))
    torch_grads = {k: p.grad.numpy() for k, p in hf_model.named_parameters()
                   if p.grad is not None}  # not transformers' final `layernorm`, which the backbone does not use
    torch_to_nnx(swin_from_transformers(torch_grads), expected)

    def loss(model):
        out = model(jnp.asarray(IMAGES.transpose(0, 2, 3, 1)))
        return sum(jnp.sum(out[key] * w.transpose(0, 2, 3, 1)) for key, w in zip(out, weights))

    grads = nnx.state(nnx.jit(nnx.grad(loss))(swin), nnx.Param).flat_state()
    expected = nnx.state(expected, nnx.Param).flat_state()
    assert [path for path, _ in grads] == [path for path, _ in expected]
    for (path, grad), (_, ref) in zip(grads, expected):
        ref = np.asarray(ref.get_value())
        np.testing.assert_allclose(np.asarray(grad.get_value()), ref, atol=TOL * max(1.0, np.abs(ref).max()), rtol=0,
                                   err_msg="/".join(map(str, path)))


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_swin_bfloat16_compute_stays_close(swin):
    model = SwinTransformer(SwinConfig(**SWIN_KW, drop_path_rate=0.2), dtype=jnp.bfloat16,
                            rngs=nnx.Rngs(0))
    nnx.update(model, nnx.state(swin))
    x = jnp.asarray(IMAGES.transpose(0, 2, 3, 1))
    low, full = model(x)["res5"], swin(x)["res5"]
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(low, np.float32), np.asarray(full), atol=0.15, rtol=0.05)


@pytest.mark.slow
def test_swin_stochastic_depth(swin):
    rates = [rate for layer in swin.layers for rate in layer.drop_path_rates]  # per block, on its stage
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


def test_swin_imagenet_classification_checkpoint_initialises_the_backbone(swin):
    """Official IN-22K files have `head.*`, the final `norm.*`, `attn_mask` buffers and no stage
    norms; the stage norms then start at weight 1, bias 0."""
    ours = nnx_to_torch(swin)
    official = {k: v for k, v in ours.items() if not k.startswith(("norm0", "norm1", "norm2", "norm3"))}
    official.update({"head.weight": np.zeros((10, 128), np.float32), "norm.bias": np.ones(128, np.float32),
                     "layers.0.blocks.0.attn.relative_position_index": np.zeros((9, 9), np.int64)})
    fresh = SwinTransformer(SwinConfig(**SWIN_KW), rngs=nnx.Rngs(3))
    load_backbone_weights(fresh, {"model": official}, source="swin_base_patch4_window12_384_22k.pth")
    back = nnx_to_torch(fresh)
    for k in official.keys() & back.keys():
        np.testing.assert_array_equal(back[k], official[k], err_msg=k)
    np.testing.assert_array_equal(back["norm2.weight"], np.ones(64, np.float32))
    np.testing.assert_array_equal(back["norm2.bias"], np.zeros(64, np.float32))


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


# ---------------------------------------------------------------------------------------- ResNet
# Torch references written here from the detectron2 / torchvision definitions.

class TorchFrozenBN(torch.nn.Module):
    """detectron2 FrozenBatchNorm2d with random statistics."""

    def __init__(self, c: int, gen: torch.Generator):
        super().__init__()
        self.register_buffer("weight", 0.6 + 0.1 * torch.randn(c, generator=gen))
        self.register_buffer("bias", 0.2 * torch.randn(c, generator=gen))
        self.register_buffer("running_mean", 0.2 * torch.randn(c, generator=gen))
        self.register_buffer("running_var", 0.5 + torch.rand(c, generator=gen))

    def forward(self, x):
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        return x * scale[:, None, None] + (self.bias - self.running_mean * scale)[:, None, None]


class TorchConvBN(torch.nn.Conv2d):
    """detectron2 Conv2d(bias=False, norm=FrozenBN): weights `x.weight`, `x.norm.*`."""

    def __init__(self, cin, cout, k, gen, stride=1, padding=0, dilation=1):
        super().__init__(cin, cout, k, stride=stride, padding=padding, dilation=dilation, bias=False)
        with torch.no_grad():
            self.weight.copy_(torch.randn(self.weight.shape, generator=gen) * (1 / (k * k * cin)) ** 0.5)
        self.norm = TorchFrozenBN(cout, gen)

    def forward(self, x):
        return self.norm(super().forward(x))


class TorchD2Bottleneck(torch.nn.Module):
    def __init__(self, cin, cout, mid, stride, dilation, gen):
        super().__init__()
        self.shortcut = TorchConvBN(cin, cout, 1, gen, stride=stride) if cin != cout else None
        self.conv1 = TorchConvBN(cin, mid, 1, gen)
        self.conv2 = TorchConvBN(mid, mid, 3, gen, stride=stride, padding=dilation, dilation=dilation)
        self.conv3 = TorchConvBN(mid, cout, 1, gen)

    def forward(self, x):
        y = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        y = self.conv3(y)
        return torch.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class TorchDeepLabResNet(torch.nn.Module):
    """Deep stem (3x3/2 -> 3x3 -> 3x3, FrozenBN + ReLU each, 3x3/2 max-pool) + bottleneck stages;
    `stages`: per stage (first stride, per-block dilations)."""

    def __init__(self, stem, width, mid, stages, gen):
        super().__init__()
        self.stem = torch.nn.Module()
        self.stem.conv1 = TorchConvBN(3, stem // 2, 3, gen, stride=2, padding=1)
        self.stem.conv2 = TorchConvBN(stem // 2, stem // 2, 3, gen, padding=1)
        self.stem.conv3 = TorchConvBN(stem // 2, stem, 3, gen, padding=1)
        cin = stem
        for i, (stride, dilations) in enumerate(stages):
            blocks = [TorchD2Bottleneck(cin if b == 0 else width, width, mid, stride if b == 0 else 1, d, gen)
                      for b, d in enumerate(dilations)]
            setattr(self, f"res{i + 2}", torch.nn.Sequential(*blocks))
            cin, width, mid = width, width * 2, mid * 2

    def forward(self, x):
        for conv in (self.stem.conv1, self.stem.conv2, self.stem.conv3):
            x = torch.relu(conv(x))
        x = torch.nn.functional.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        outs = []
        for i in range(4):
            x = getattr(self, f"res{i + 2}")(x)
            outs.append(x.numpy())
        return outs


RESNET_IMAGES = np.random.RandomState(2).randn(2, 3, 45, 61).astype(np.float32)


def _resnet_outputs(model, images=RESNET_IMAGES):
    out = model(jnp.asarray(images.transpose(0, 2, 3, 1)))
    return [_nchw(out[k]) for k in ("res2", "res3", "res4", "res5")]


@pytest.mark.parametrize("res5_dilation, stages", [
    # R101c: res5 multi-grid (1, 2, 4) at dilation 1 keeps stride 2 (output stride 32).
    (1, [(1, [1, 1]), (2, [1]), (2, [1]), (2, [1, 2, 4])]),
    # res5 dilation 2: no downsampling in res5, dilations 2 x multi-grid (output stride 16).
    (2, [(1, [1, 1]), (2, [1]), (2, [1]), (1, [2, 4, 8])]),
])
@pytest.mark.slow
def test_resnet_r101c_matches_torch_reference_from_detectron2_pkl(tmp_path, res5_dilation, stages):
    import pickle

    gen = torch.Generator().manual_seed(res5_dilation)
    ref = TorchDeepLabResNet(16, 32, 8, stages, gen).eval()
    with torch.no_grad():
        expected = ref(torch.from_numpy(RESNET_IMAGES))
    path = tmp_path / "R-103.pkl"  # detectron2 layout: numpy arrays under "model"
    with open(path, "wb") as f:
        pickle.dump({"model": _state(ref), "__author__": "test", "matching_heuristics": True}, f)
    cfg = ResNetConfig.r101c(num_blocks=(2, 1, 1, 3), stem_out_channels=16, res2_out_channels=32,
                             width_per_group=8, res5_dilation=res5_dilation)
    model = ResNet(cfg, rngs=nnx.Rngs(0))
    load_backbone_weights(model, read_state_dict(path), source=str(path))
    got = _resnet_outputs(model)
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        np.testing.assert_allclose(g, e, atol=TOL, rtol=0)
    assert got[3].shape[2:] == ((2, 2) if res5_dilation == 1 else (3, 4))  # from 45x61
    assert model.out_channels == {"res2": 32, "res3": 64, "res4": 128, "res5": 256}
    assert model.strides["res5"] == (32 if res5_dilation == 1 else 16)


class TorchvisionBottleneck(torch.nn.Module):
    """torchvision's Bottleneck (v1.5: stride in the 3x3), eval-mode BatchNorm2d."""

    def __init__(self, cin, cout, mid, stride, gen):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(mid)
        self.conv2 = torch.nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(mid)
        self.conv3 = torch.nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = torch.nn.BatchNorm2d(cout)
        self.downsample = (torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                               torch.nn.BatchNorm2d(cout)) if cin != cout else None)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchvisionResNet(torch.nn.Module):
    def __init__(self, blocks, gen):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 16, 7, stride=2, padding=3, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(16)
        cin, width, mid = 16, 32, 8
        for i, n in enumerate(blocks):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", torch.nn.Sequential(*[
                TorchvisionBottleneck(cin if b == 0 else width, width, mid, stride if b == 0 else 1, gen)
                for b in range(n)]))
            cin, width, mid = width, width * 2, mid * 2
        self.fc = torch.nn.Linear(cin, 10)
        for m in self.modules():  # random BN statistics; eval mode uses them
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.nn.functional.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        outs = []
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
            outs.append(x.numpy())
        return outs


@pytest.fixture(scope="module")
def torchvision_resnet():
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    ref = _perturb(TorchvisionResNet((2, 1, 1, 1), gen), 6)
    with torch.no_grad():
        expected = ref(torch.from_numpy(RESNET_IMAGES))
    return _state(ref), expected


@pytest.mark.slow
def test_resnet_basic_stem_matches_torchvision_layout(torchvision_resnet):
    state, expected = torchvision_resnet
    assert "layer1.0.bn1.num_batches_tracked" in state and "fc.weight" in state
    cfg = ResNetConfig(num_blocks=(2, 1, 1, 1), stem_type="basic", stem_out_channels=16,
                       res2_out_channels=32, width_per_group=8)
    model = ResNet(cfg, rngs=nnx.Rngs(0))
    load_backbone_weights(model, state, source="resnet.pth")
    for g, e in zip(_resnet_outputs(model), expected):
        np.testing.assert_allclose(g, e, atol=TOL, rtol=0)


def test_resnet_torchvision_into_deep_stem_needs_stages_only(torchvision_resnet):
    state, _ = torchvision_resnet
    cfg = ResNetConfig.tiny_test(num_blocks=(2, 1, 1, 1))
    model = ResNet(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(CheckpointError, match=r"resnet\.pth: .*7x7.*stages_only=True"):
        load_backbone_weights(model, state, source="resnet.pth")
    stem_before = np.asarray(model.stem.conv2.kernel[...])
    load_backbone_weights(model, state, source="resnet.pth", stages_only=True)
    np.testing.assert_array_equal(model.stem.conv2.kernel[...], stem_before)
    np.testing.assert_array_equal(np.asarray(model.res3[0].conv2.kernel[...]),
                                  state["layer2.0.conv2.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(np.asarray(model.res2[1].conv1.norm.running_var[...]),
                                  state["layer1.1.bn1.running_var"])


def test_resnet_frozen_bn_is_not_a_param_and_round_trips():
    model = ResNet(ResNetConfig.tiny_test(), rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    frozen = nnx.state(model, FrozenStat)
    param_keys = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(params)}
    frozen_keys = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(frozen)}
    assert "res2.0.conv1.kernel" in param_keys and not any("norm" in k for k in param_keys)
    assert "stem.conv1.norm.running_mean" in frozen_keys and "res5.0.shortcut.norm.weight" in frozen_keys
    state = nnx_to_torch(model)
    assert "res2.0.conv1.norm.running_var" in state and "res2.0.shortcut.weight" in state
    fresh = ResNet(ResNetConfig.tiny_test(), rngs=nnx.Rngs(1))
    load_backbone_weights(fresh, {f"backbone.{k}": v for k, v in state.items()})
    for k, v in nnx_to_torch(fresh).items():
        np.testing.assert_array_equal(v, state[k], err_msg=k)
    with pytest.raises(CheckpointError, match=r"missing.*res3\.0\.conv2\.norm\.running_mean"):
        load_backbone_weights(fresh, {k: v for k, v in state.items()
                                      if k != "res3.0.conv2.norm.running_mean"}, source="r.pkl")


@pytest.mark.slow
def test_build_backbone_presets_and_errors():
    swin = nnx.eval_shape(lambda: build_backbone("swin", rngs=nnx.Rngs(0)))
    assert swin.out_channels == {"res2": 128, "res3": 256, "res4": 512, "res5": 1024}
    assert len(swin.layers[2].blocks) == 18 and swin.layers[2].shifts[1] == 6  # per block, on its stage
    assert swin.layers[0].blocks[0].attn.relative_position_bias_table.shape == (529, 4)
    resnet = nnx.eval_shape(lambda: build_backbone("resnet", rngs=nnx.Rngs(0)))
    assert resnet.out_channels == {"res2": 256, "res3": 512, "res4": 1024, "res5": 2048}
    assert resnet.strides == {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
    assert len(resnet.res4) == 23 and resnet.res5[2].conv2.dilation == 4
    assert resnet.stem.conv1.kernel.shape == (3, 3, 3, 64) and resnet.stem.conv3.kernel.shape[-1] == 128
    with pytest.raises(TypeError, match="ResNetConfig"):
        build_backbone("resnet", SwinConfig.tiny_test(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("vit", rngs=nnx.Rngs(0))
