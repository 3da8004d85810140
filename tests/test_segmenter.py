"""Segmenter parity: pixel decoder, transformer decoder and mask head against transformers' torch
MaskFormer (tiny random Swin config), the open-vocabulary head against reference 1.5 in numpy,
OVSeg .pth export/load round trips and checkpoint errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flax import nnx
import jax.numpy as jnp

from ovseg_jax.convert.params import torch_to_nnx
from ovseg_jax.convert.segmenter_keys import hf_maskformer_to_ours
from ovseg_jax.convert.torch_io import tensor_to_numpy
from ovseg_jax.models.pixel_decoder import BasePixelDecoder
from ovseg_jax.models.transformer_decoder import TransformerDecoder, sine_position_embedding

TOL = 1e-4
SWIN = dict(patch_size=4, embed_dim=16, depths=[1, 2, 1, 1], num_heads=[1, 2, 2, 4], window_size=3)
DECODER = dict(d_model=32, decoder_layers=3, decoder_ffn_dim=64, decoder_attention_heads=4, num_queries=7)
FPN, MASK = 64, 48
CHANNELS = {"res2": 16, "res3": 32, "res4": 64, "res5": 128}


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def torch_maskformer():
    from transformers import MaskFormerConfig, MaskFormerForInstanceSegmentation, SwinConfig

    torch.manual_seed(0)
    swin = SwinConfig(image_size=64, out_features=["stage1", "stage2", "stage3", "stage4"], **SWIN)
    config = MaskFormerConfig(backbone_config=swin, fpn_feature_size=FPN, mask_feature_size=MASK, num_labels=5,
                              decoder_config=dict(model_type="detr", encoder_layers=0, **DECODER))
    model = MaskFormerForInstanceSegmentation(config).eval()
    with torch.no_grad():  # random GroupNorm/LayerNorm affines so that a wrong mapping shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith((".1.weight", ".1.bias")):
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def torch_outputs(torch_maskformer):
    """Outputs at an odd size (70 x 90: stride-32 map 3 x 3, FPN upsampling 3->5->9->18)."""
    x = torch.randn(2, 3, 70, 90, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = torch_maskformer(x, output_hidden_states=True)
        norm = torch_maskformer.model.transformer_module.decoder.layernorm
        # transformers returns the zero input, the un-normalised outputs of the layers but the last,
        # and the last layer's output after the shared final norm; MaskFormer's deep supervision
        # uses every layer's output after that norm.
        states = out.transformer_decoder_hidden_states
        hs = torch.stack([norm(h) for h in states[1:-1]] + [states[-1]])
        assert torch.equal(states[-1], out.transformer_decoder_last_hidden_state)
    return {"features": {k: nhwc(t) for k, t in zip(CHANNELS, out.encoder_hidden_states)},
            "mask_features": nhwc(out.pixel_decoder_last_hidden_state), "hs": hs.numpy(),
            "masks": out.masks_queries_logits.numpy()}


@pytest.fixture(scope="module")
def hf_head_state(torch_maskformer):
    state = {k: tensor_to_numpy(v) for k, v in torch_maskformer.state_dict().items()}
    head, _ = hf_maskformer_to_ours(state, num_features=4, source="test")
    return head


def _load(module, state, prefix):
    torch_to_nnx({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, module, source=prefix)


def test_sine_position_embedding_matches_transformers():
    from transformers.models.maskformer.modeling_maskformer import MaskFormerSinePositionEmbedding

    ref = MaskFormerSinePositionEmbedding(num_position_features=16, normalize=True)((1, 32, 5, 7), "cpu", torch.float32)
    ours = sine_position_embedding(5, 7, 32)
    np.testing.assert_allclose(ours, nhwc(ref).reshape(35, 32), atol=1e-6)


@pytest.mark.slow
def test_pixel_decoder_matches_transformers(torch_outputs, hf_head_state):
    decoder = BasePixelDecoder(CHANNELS, FPN, MASK, rngs=nnx.Rngs(0))
    _load(decoder, hf_head_state, "pixel_decoder.")
    features = {k: jnp.asarray(v) for k, v in torch_outputs["features"].items()}
    np.testing.assert_allclose(decoder(features), torch_outputs["mask_features"], atol=TOL)


@pytest.mark.slow
def test_transformer_decoder_matches_transformers_per_layer(torch_outputs, hf_head_state):
    decoder = TransformerDecoder(CHANNELS["res5"], dim=DECODER["d_model"], num_queries=DECODER["num_queries"],
                                 heads=DECODER["decoder_attention_heads"], ffn_dim=DECODER["decoder_ffn_dim"],
                                 num_layers=DECODER["decoder_layers"], rngs=nnx.Rngs(0))
    _load(decoder, hf_head_state, "transformer_decoder.")
    hs = decoder(jnp.asarray(torch_outputs["features"]["res5"]))
    assert hs.shape == torch_outputs["hs"].shape == (3, 2, 7, 32)
    np.testing.assert_allclose(hs, torch_outputs["hs"], atol=TOL)


@pytest.mark.slow
def test_decoder_dropout_needs_rngs_and_is_reproducible():
    decoder = TransformerDecoder(8, dim=32, num_queries=5, heads=4, ffn_dim=64, num_layers=2, dropout=0.5,
                                 rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.RandomState(0).randn(1, 3, 4, 8), jnp.float32)
    with pytest.raises(ValueError, match="rngs"):
        decoder(x, deterministic=False)
    a = decoder(x, deterministic=False, rngs=nnx.Rngs(dropout=1))
    b = decoder(x, deterministic=False, rngs=nnx.Rngs(dropout=1))
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a) - np.asarray(decoder(x))).max() > 1e-2


# ---------------------------------------------------------------------------------------------
# The whole segmenter, loaded through ovseg_jax.segmenter.load

CLIP_DIM, NUM_CLASSES = 24, 5
H, W = 70, 100  # padded inside the segmenter to 96 x 128 (reference 1.1)


@pytest.fixture(scope="module")
def images():
    return np.random.RandomState(2).randn(2, H, W, 3).astype(np.float32)


@pytest.fixture(scope="module")
def text_bank():
    t = np.random.RandomState(3).randn(NUM_CLASSES, CLIP_DIM).astype(np.float32)
    return t / np.linalg.norm(t, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def torch_padded_outputs(torch_maskformer, images):
    """transformers on the image zero-padded (in normalised space) to a multiple of 32."""
    x = np.zeros((2, 3, 96, 128), np.float32)
    x[:, :, :H, :W] = images.transpose(0, 3, 1, 2)
    m = torch_maskformer
    with torch.no_grad():
        out = m(torch.from_numpy(x), output_hidden_states=True)
        norm = m.model.transformer_module.decoder.layernorm
        states = out.transformer_decoder_hidden_states
        hs = torch.stack([norm(h) for h in states[1:-1]] + [states[-1]])
        pixel = out.pixel_decoder_last_hidden_state
        all_masks = torch.einsum("lbqc,bchw->lbqhw", m.mask_embedder(hs), pixel)
    torch.testing.assert_close(all_masks[-1], out.masks_queries_logits)
    return {"mask_features": nhwc(pixel), "hs": hs.numpy(), "masks": all_masks.numpy()}


@pytest.fixture(scope="module")
def hf_dir(torch_maskformer, tmp_path_factory):
    d = tmp_path_factory.mktemp("maskformer")
    torch_maskformer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def segmenter(hf_dir):
    from ovseg_jax.segmenter import load

    model = load(hf_dir, clip_dim=CLIP_DIM)
    config = model.config
    assert config.clip_dim == CLIP_DIM and config.nheads == 4 and config.dec_layers == 3
    return model


def _run(model, images, text_bank):
    """(mask features, decoder states, outputs) of one jitted forward, as numpy."""
    import jax

    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, x, t):
        m = nnx.merge(graphdef, state)
        return m.decode(x), m(x, t)

    (mf, hs), out = jax.tree.map(np.asarray, forward(state, jnp.asarray(images), jnp.asarray(text_bank)))
    return mf, hs, out


@pytest.fixture(scope="module")
def ours(segmenter, images, text_bank):
    return _run(segmenter, images, text_bank)


@pytest.mark.slow
def test_segmenter_from_transformers_matches_torch(ours, torch_padded_outputs):
    mf, hs, out = ours
    ref = torch_padded_outputs
    assert mf.shape == (2, 24, 32, MASK) and out["pred_masks"].shape == (2, 7, 24, 32)
    np.testing.assert_allclose(mf, ref["mask_features"], atol=TOL)
    np.testing.assert_allclose(hs, ref["hs"], atol=TOL)
    np.testing.assert_allclose(out["pred_masks"], ref["masks"][-1], atol=TOL)
    assert len(out["aux"]) == 2
    for aux, ref_masks in zip(out["aux"], ref["masks"][:-1]):
        np.testing.assert_allclose(aux["pred_masks"], ref_masks, atol=TOL)


def test_open_vocab_logits_match_reference_numpy(segmenter, ours, torch_padded_outputs, text_bank):
    """Reference 1.5 in numpy on the torch decoder states: class-embedding MLP, L2 normalisation,
    100 * cosine against [text bank; normalised non-object embedding]."""
    _, _, out = ours
    hs = torch_padded_outputs["hs"].astype(np.float64)
    w0, b0, w1, b1 = (np.asarray(p[...], np.float64) for p in (
        segmenter.class_embed.layers[0].kernel, segmenter.class_embed.layers[0].bias,
        segmenter.class_embed.layers[1].kernel, segmenter.class_embed.layers[1].bias))
    emb = np.maximum(hs @ w0 + b0, 0) @ w1 + b1
    n = np.asarray(segmenter.non_object_embedding[...], np.float64)
    bank = np.concatenate([text_bank, n / np.linalg.norm(n, axis=-1, keepdims=True)])
    logits = 100 * (emb / np.linalg.norm(emb, axis=-1, keepdims=True)) @ bank.T
    assert out["pred_logits"].shape == (2, 7, NUM_CLASSES + 1)
    np.testing.assert_allclose(out["pred_embeddings"], emb[-1], atol=TOL)
    np.testing.assert_allclose(out["pred_logits"], logits[-1], atol=1e-3)  # x100 scale
    for aux, ref in zip(out["aux"], logits[:-1]):
        np.testing.assert_allclose(aux["pred_logits"], ref, atol=1e-3)


def _reference_ovseg_keys(depths=SWIN["depths"], layers=DECODER["decoder_layers"]) -> set[str]:
    """OVSeg checkpoint key names (reference 6.1) for the tiny architecture."""
    keys = {"backbone.patch_embed.proj.weight", "backbone.patch_embed.proj.bias",
            "backbone.patch_embed.norm.weight", "backbone.patch_embed.norm.bias"}
    for i, depth in enumerate(depths):
        for j in range(depth):
            b = f"backbone.layers.{i}.blocks.{j}."
            keys |= {b + s for s in ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias",
                                     "attn.proj.weight", "attn.proj.bias", "attn.relative_position_bias_table",
                                     "attn.relative_position_index", "norm2.weight", "norm2.bias",
                                     "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")}
        if i < len(depths) - 1:
            keys |= {f"backbone.layers.{i}.downsample.{s}" for s in ("reduction.weight", "norm.weight", "norm.bias")}
        keys |= {f"backbone.norm{i}.weight", f"backbone.norm{i}.bias"}
    pd = "sem_seg_head.pixel_decoder."
    for k in (1, 2, 3):
        keys |= {f"{pd}adapter_{k}.weight", f"{pd}adapter_{k}.norm.weight", f"{pd}adapter_{k}.norm.bias"}
    for k in (1, 2, 3, 4):
        keys |= {f"{pd}layer_{k}.weight", f"{pd}layer_{k}.norm.weight", f"{pd}layer_{k}.norm.bias"}
    keys |= {f"{pd}mask_features.weight", f"{pd}mask_features.bias"}
    p = "sem_seg_head.predictor."
    keys |= {p + "query_embed.weight", p + "input_proj.weight", p + "input_proj.bias",
             p + "transformer.decoder.norm.weight", p + "transformer.decoder.norm.bias"}
    for i in range(layers):
        b = f"{p}transformer.decoder.layers.{i}."
        for attn in ("self_attn", "multihead_attn"):
            keys |= {f"{b}{attn}.{s}" for s in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")}
        keys |= {f"{b}{s}.{t}" for s in ("linear1", "linear2", "norm1", "norm2", "norm3") for t in ("weight", "bias")}
    keys |= {f"{p}class_embed.layers.{i}.{t}" for i in (0, 1) for t in ("weight", "bias")}
    keys |= {f"{p}mask_embed.layers.{i}.{t}" for i in (0, 1, 2) for t in ("weight", "bias")}
    return keys | {"clip_adapter.non_object_embedding"}


@pytest.fixture(scope="module")
def exported(segmenter, tmp_path_factory):
    from ovseg_jax.segmenter import export

    return export(segmenter, tmp_path_factory.mktemp("ovseg") / "segmenter.pth")


def test_export_writes_the_ovseg_layout(exported):
    raw = torch.load(exported, weights_only=True)
    assert set(raw) == {"model"}
    state = raw["model"]
    assert set(state) == _reference_ovseg_keys()
    shapes = {
        "sem_seg_head.pixel_decoder.adapter_1.weight": (FPN, 16, 1, 1),
        "sem_seg_head.pixel_decoder.layer_4.weight": (FPN, 128, 3, 3),
        "sem_seg_head.pixel_decoder.mask_features.weight": (MASK, FPN, 3, 3),
        "sem_seg_head.predictor.input_proj.weight": (32, 128, 1, 1),
        "sem_seg_head.predictor.query_embed.weight": (7, 32),
        "sem_seg_head.predictor.transformer.decoder.layers.0.self_attn.in_proj_weight": (96, 32),
        "sem_seg_head.predictor.class_embed.layers.0.weight": (1024, 32),
        "sem_seg_head.predictor.class_embed.layers.1.weight": (CLIP_DIM, 1024),
        "sem_seg_head.predictor.mask_embed.layers.2.weight": (MASK, 32),
        "clip_adapter.non_object_embedding": (1, CLIP_DIM),
        "backbone.layers.0.blocks.0.attn.relative_position_bias_table": (25, 1),
        "backbone.layers.0.blocks.0.attn.relative_position_index": (9, 9),
    }
    assert {k: tuple(state[k].shape) for k in shapes} == shapes
    # heads 4 != the default 8 cannot be read off the weights: a sidecar records the architecture
    assert exported.with_name(exported.name + ".ovseg_jax.json").is_file()


def test_ovseg_round_trip_gives_identical_outputs(exported, ours, segmenter, images, text_bank):
    from ovseg_jax.segmenter import load

    model = load(exported)
    assert model.config == segmenter.config
    mf, hs, out = _run(model, images, text_bank)
    np.testing.assert_array_equal(mf, ours[0])
    np.testing.assert_array_equal(hs, ours[1])
    np.testing.assert_array_equal(out["pred_logits"], ours[2]["pred_logits"])
    np.testing.assert_array_equal(out["pred_masks"], ours[2]["pred_masks"])


def test_safetensors_export_loads_back(segmenter, tmp_path):
    from ovseg_jax.convert.params import nnx_to_torch
    from ovseg_jax.segmenter import export, load

    path = export(segmenter, tmp_path / "segmenter.safetensors")
    model = load(path)
    assert model.config == segmenter.config
    a, b = nnx_to_torch(segmenter), nnx_to_torch(model)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_backbone_only_file_initialises_the_backbone(segmenter, tmp_path):
    """An official ImageNet Swin `{"model": ...}` file (classifier, final norm, buffers, no stage
    norms) initialises only the backbone; the stage norms start at 1 / 0."""
    from ovseg_jax.convert.params import nnx_to_torch
    from ovseg_jax.segmenter import load

    backbone = nnx_to_torch(segmenter.backbone)
    stages = {k: v for k, v in backbone.items() if not k.startswith("norm")}
    official = {**stages, "norm.weight": np.ones(128, np.float32), "norm.bias": np.zeros(128, np.float32),
                "head.weight": np.zeros((10, 128), np.float32), "head.bias": np.zeros(10, np.float32),
                "layers.0.blocks.0.attn.relative_position_index": np.zeros((9, 9), np.int64)}
    torch.save({"model": {k: torch.from_numpy(np.asarray(v)) for k, v in official.items()}}, tmp_path / "swin.pth")
    model = load(tmp_path / "swin.pth", clip_dim=CLIP_DIM)
    config = model.config
    expected = segmenter.config.backbone_config.replace(drop_path_rate=config.backbone_config.drop_path_rate)
    assert config.backbone_config == expected and config.clip_dim == CLIP_DIM and config.num_queries == 100
    loaded = nnx_to_torch(model.backbone)
    assert loaded.keys() == backbone.keys() and all(np.array_equal(loaded[k], stages[k]) for k in stages)
    assert all(np.all(loaded[f"norm{i}.weight"] == 1) and np.all(loaded[f"norm{i}.bias"] == 0) for i in range(4))


@pytest.mark.slow
def test_resnet_segmenter_ovseg_round_trip(tmp_path):
    """R101c-style segmenter: detectron2 backbone names under `backbone.`, exact reload."""
    from ovseg_jax.convert.params import nnx_to_torch
    from ovseg_jax.models.maskformer import Segmenter, SegmenterConfig
    from ovseg_jax.models.resnet import ResNetConfig
    from ovseg_jax.segmenter import export, load

    config = SegmenterConfig(backbone="resnet", backbone_config=ResNetConfig.tiny_test(res5_dilation=2),
                             num_queries=5, hidden_dim=32, conv_dim=32, mask_dim=32, dec_layers=2, nheads=4,
                             dim_feedforward=64, class_hidden_dim=16, clip_dim=CLIP_DIM)
    model = Segmenter(config, rngs=nnx.Rngs(1))
    path = export(model, tmp_path / "r101c.pth")
    state = torch.load(path, weights_only=True)["model"]
    assert {"backbone.stem.conv1.weight", "backbone.stem.conv1.norm.running_mean", "backbone.res5.0.shortcut.weight",
            "sem_seg_head.pixel_decoder.layer_4.weight"} <= set(state)
    loaded = load(path)
    assert loaded.config == config
    a, b = nnx_to_torch(model), nnx_to_torch(loaded)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_bfloat16_compute_stays_close_to_float32(hf_dir, ours, images, text_bank):
    from ovseg_jax.segmenter import load

    model = load(hf_dir, clip_dim=CLIP_DIM, dtype=jnp.bfloat16)
    _, _, out = _run(model, images, text_bank)
    assert out["pred_masks"].dtype == np.float32 and out["pred_logits"].dtype == np.float32
    scale = np.abs(ours[2]["pred_masks"]).max()
    assert np.abs(out["pred_masks"] - ours[2]["pred_masks"]).max() < 0.05 * scale


def test_normalize_images():
    from ovseg_jax.models.maskformer import normalize_images

    x = np.random.RandomState(0).randint(0, 256, (1, 5, 6, 3)).astype(np.uint8)
    ref = (x.astype(np.float64) - [123.675, 116.28, 103.53]) / [58.395, 57.12, 57.375]
    np.testing.assert_allclose(normalize_images(x), ref, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Errors

def _bad_file(exported, tmp_path, edit) -> str:
    state = dict(torch.load(exported, weights_only=True)["model"])
    edit(state)
    path = tmp_path / "bad.pth"
    torch.save({"model": state}, path)
    (tmp_path / "bad.pth.ovseg_jax.json").write_text(
        exported.with_name(exported.name + ".ovseg_jax.json").read_text())
    return str(path)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("sem_seg_head.pixel_decoder.layer_1.norm.bias"), "missing parameters.*pixel_decoder.layer_1.norm.bias"),
    (lambda s: s.__setitem__("sem_seg_head.predictor.query_embed.weight", torch.zeros(9, 32)),
     "shape mismatches.*query_embed"),
    (lambda s: s.__setitem__("sem_seg_head.predictor.extra.weight", torch.zeros(2)), "unexpected keys.*predictor.extra"),
])
def test_bad_ovseg_checkpoints_name_the_problem(exported, tmp_path, edit, message):
    from ovseg_jax.convert.torch_io import CheckpointError
    from ovseg_jax.segmenter import load

    with pytest.raises(CheckpointError, match=f"(?s)bad.pth.*{message}"):
        load(_bad_file(exported, tmp_path, edit))


def test_unreadable_inputs_give_clear_errors(tmp_path):
    from ovseg_jax.convert.torch_io import CheckpointError
    from ovseg_jax.segmenter import load

    with pytest.raises(CheckpointError, match="no such file"):
        load(tmp_path / "missing.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        load(tmp_path / "garbage.pth")
    with pytest.raises(CheckpointError, match="config.json"):
        load(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "detr"}')
    with pytest.raises(CheckpointError, match="maskformer"):
        load(tmp_path)
