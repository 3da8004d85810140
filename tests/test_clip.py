"""CLIP parity with PyTorch references, mask prompt tuning, checkpoint layouts and round trips."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import CLIPConfig, CLIPModel

import ovseg_jax.clip as oclip
from ovseg_jax.convert.torch_io import CheckpointError
from ovseg_jax.text import Tokenizer, write_word_vocab
from tests.torch_clip_reference import OpenAIClip

WORDS = ["a photo of the red green blue circle square triangle wall-brick sky grass in scene this is there"]
TOL = 1e-4


def unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    return write_word_vocab(WORDS, tmp_path_factory.mktemp("vocab"))


@pytest.fixture(scope="module")
def tok(vocab_dir):
    return Tokenizer.from_dir(vocab_dir, context_length=16)


# --------------------------------------------------------------------------------------------
# transformers CLIPModel parity (two different patch grids and activations)

HF_VARIANTS = {
    "grid5_quickgelu": dict(image_size=30, patch_size=6, hidden_size=32, intermediate_size=48,
                            num_hidden_layers=2, num_attention_heads=4),
    "grid4_gelu": dict(image_size=28, patch_size=7, hidden_size=48, intermediate_size=80,
                       num_hidden_layers=1, num_attention_heads=3, hidden_act="gelu"),
}


@pytest.fixture(scope="module", params=sorted(HF_VARIANTS))
def hf_pair(request, tmp_path_factory, tok, vocab_dir):
    cfg = CLIPConfig(
        projection_dim=24, vision_config=HF_VARIANTS[request.param],
        text_config=dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=16, vocab_size=tok.vocab_size,
                         eos_token_id=tok.eot_token_id, bos_token_id=tok.sot_token_id,
                         pad_token_id=tok.eot_token_id))
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path)
    tok.save(path)
    return model, oclip.load(path)


def hf_image_features(model, images, **kw):
    with torch.no_grad():
        out = model.get_image_features(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2), **kw)
    return unit(out.pooler_output.numpy())


@pytest.mark.slow
def test_hf_image_and_text_features_match(hf_pair):
    model, clip = hf_pair
    size = model.config.vision_config.image_size
    images = np.random.RandomState(1).randn(3, size, size, 3).astype(np.float32)
    np.testing.assert_allclose(clip.encode_image(images), hf_image_features(model, images), atol=TOL)
    texts = ["a photo of a red circle.", "There is the sky in the scene", "grass"]
    ids = clip.tokenize(texts)
    with torch.no_grad():
        ref = model.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64))).pooler_output.numpy()
    np.testing.assert_allclose(clip.encode_text(texts), unit(ref), atol=TOL)


def test_hf_positional_interpolation_matches(hf_pair):
    model, clip = hf_pair
    patch = model.config.vision_config.patch_size
    images = np.random.RandomState(2).randn(2, 7 * patch, 5 * patch + 3, 3).astype(np.float32)
    ref = hf_image_features(model, images[:, :, : 5 * patch], interpolate_pos_encoding=True)
    np.testing.assert_allclose(clip.encode_image(images), ref, atol=TOL)


def test_class_embeddings_are_the_template_ensemble(hf_pair):
    model, clip = hf_pair
    names = ["red circle", " wall-brick "]
    templates = ["a photo of a {}.", "There is a {} in the scene"]
    per_template = []
    for t in templates:
        ids = clip.tokenize([t.format(n.strip()) for n in names])
        with torch.no_grad():
            f = model.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64))).pooler_output.numpy()
        per_template.append(unit(f))
    ref = unit(np.mean(per_template, axis=0))
    np.testing.assert_allclose(clip.class_embeddings(names, templates=templates), ref, atol=TOL)
    assert clip.class_embeddings(names).shape == (2, model.config.projection_dim)
    # one template may be given as a plain string
    np.testing.assert_array_equal(clip.class_embeddings(names, templates=templates[0]),
                                  clip.class_embeddings(names, templates=templates[:1]))


def test_template_specs():
    from ovseg_jax.text import VILD_TEMPLATES, templates  # noqa: PLC0415

    assert templates("vild") == VILD_TEMPLATES and len(VILD_TEMPLATES) == 14
    assert templates("a {}") == ("a {}",) and templates(["a {}", "the {}."]) == ("a {}", "the {}.")
    with pytest.raises(ValueError, match="unknown template set 'photo'"):
        templates("photo")
    with pytest.raises(ValueError, match="exactly one"):
        templates(["a {} {}"])


# --------------------------------------------------------------------------------------------
# OpenAI-layout reference with mask prompts (reference 1.9)


def make_reference(depth: int, shared: bool = False, vocab: int = 60):
    torch.manual_seed(depth + 10 * shared)
    return OpenAIClip(vision_layers=3, mask_depth=depth, shared=shared, vocab=vocab).eval()


def region_masks(n=4, size=32, patch=8):
    """All-on, all-off, one pixel in one patch, and a random blob (per image)."""
    rs = np.random.RandomState(3)
    m = np.zeros((n, size, size), np.float32)
    m[0] = 1
    m[2, patch + 3, 2 * patch + 1] = 1
    m[3] = rs.rand(size, size) > 0.7
    m[3, :, :patch] = 0
    return m


def reference_image_features(ref, images, masks=None):
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2)
        m = None if masks is None else torch.from_numpy(masks)[:, None]
        return unit(ref.encode_image(x, m).numpy())


@pytest.mark.parametrize("depth,shared", [(1, False), (3, False), (3, True)])
def test_mask_prompt_forward_matches_reference(tmp_path, depth, shared):
    ref = make_reference(depth, shared)
    path = tmp_path / "openai.pt"
    torch.save(ref.state_dict(), path)
    clip = oclip.load(path)
    assert clip.config.mask_prompt_depth == depth and clip.config.mask_prompt_shared == shared
    images = np.random.RandomState(4).randn(4, 32, 32, 3).astype(np.float32)
    masks = region_masks()
    ours = np.asarray(clip.encode_image(images, masks))
    np.testing.assert_allclose(ours, reference_image_features(ref, images, masks), atol=TOL)
    # The prompts matter: background patches change the features (image 1 is all background).
    plain = np.asarray(clip.encode_image(images))
    np.testing.assert_allclose(plain, reference_image_features(ref, images), atol=TOL)
    assert np.abs(ours[1] - plain[1]).max() > 1e-3
    # A full mask leaves every patch token as is at every depth.
    np.testing.assert_allclose(ours[0], plain[0], atol=TOL)


def test_openai_text_tower_matches_reference(tmp_path, vocab_dir, tok):
    ref = make_reference(0, vocab=tok.vocab_size)
    path = tmp_path / "openai.pt"
    torch.save(ref.state_dict(), path)
    clip = oclip.load(path, tokenizer=vocab_dir)
    texts = ["a photo of a green triangle.", "sky"]
    ids = clip.tokenize(texts)
    with torch.no_grad():
        expected = unit(ref.encode_text(torch.from_numpy(ids[:, :12].astype(np.int64))).numpy())
    np.testing.assert_allclose(clip.encode_text(texts), expected, atol=TOL)


def test_depth_override(tmp_path):
    ref = make_reference(3)
    path = tmp_path / "openai.pt"
    torch.save(ref.state_dict(), path)
    images = np.random.RandomState(5).randn(4, 32, 32, 3).astype(np.float32)
    off = oclip.load(path, mask_prompt_depth=0)
    assert off.config.mask_prompt_depth == 0
    np.testing.assert_allclose(off.encode_image(images, region_masks()), reference_image_features(ref, images),
                               atol=TOL)
    with pytest.raises(CheckpointError, match="depth 3"):
        oclip.load(path, mask_prompt_depth=2)
    plain = make_reference(0)
    torch.save(plain.state_dict(), tmp_path / "plain.pt")
    fresh = oclip.load(tmp_path / "plain.pt", mask_prompt_depth=2)
    emb = np.asarray(fresh.model.visual.mask_embedding[...])
    assert emb.shape == (2, 16, 64) and 0.01 < emb.std() < 0.03


# --------------------------------------------------------------------------------------------
# Checkpoint layouts users have


def openai_state(ref):
    return {k: v.clone() for k, v in ref.state_dict().items()}


def test_ovseg_checkpoint_layout(tmp_path):
    ref = make_reference(3)
    model = {f"clip_adapter.clip_model.{k}": v for k, v in openai_state(ref).items()}
    model.update({"sem_seg_head.predictor.query_embed.weight": torch.randn(100, 256),
                  "clip_adapter.non_object_embedding": torch.randn(1, 16),
                  "clip_adapter.pixel_mean": torch.ones(1, 3, 1, 1)})
    torch.save({"model": model, "iteration": 119999}, tmp_path / "ovseg.pth")
    clip = oclip.load(tmp_path / "ovseg.pth")
    assert clip.config.mask_prompt_depth == 3
    images = np.random.RandomState(6).randn(4, 32, 32, 3).astype(np.float32)
    np.testing.assert_allclose(clip.encode_image(images, region_masks()),
                               reference_image_features(ref, images, region_masks()), atol=TOL)


def test_open_clip_training_checkpoint_layout(tmp_path):
    ref = make_reference(1)
    state = {f"module.{k}": v for k, v in openai_state(ref).items()}
    torch.save({"epoch": 5, "name": "mpt", "state_dict": state,
                "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 0.05}]}},
               tmp_path / "epoch_5.pt")
    clip = oclip.load(tmp_path / "epoch_5.pt")
    images = np.random.RandomState(7).randn(4, 32, 32, 3).astype(np.float32)
    np.testing.assert_allclose(clip.encode_image(images, region_masks()),
                               reference_image_features(ref, images, region_masks()), atol=TOL)


def test_fp16_openai_file(tmp_path):
    ref = make_reference(0)
    torch.save({k: v.half() for k, v in openai_state(ref).items()}, tmp_path / "fp16.pt")
    clip = oclip.load(tmp_path / "fp16.pt")
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.half().float())
    images = np.random.RandomState(8).randn(2, 32, 32, 3).astype(np.float32)
    np.testing.assert_allclose(clip.encode_image(images), reference_image_features(ref, images), atol=TOL)
    assert clip.model.visual.proj[...].dtype == np.float32


def test_torchscript_archive_is_read_without_running_code(tmp_path):
    ref = make_reference(0)

    class TextOnly(torch.nn.Module):  # traced like OpenAI's releases; all weights are kept
        def __init__(self, clip):
            super().__init__()
            self.visual, self.transformer = clip.visual, clip.transformer
            self.token_embedding, self.positional_embedding = clip.token_embedding, clip.positional_embedding
            self.ln_final, self.text_projection = clip.ln_final, clip.text_projection
            self.logit_scale = clip.logit_scale
            self.clip = [clip]

        def forward(self, ids):
            return self.clip[0].encode_text(ids)

    traced = torch.jit.trace(TextOnly(ref), torch.randint(0, 59, (1, 12)), check_trace=False)
    traced.save(str(tmp_path / "ViT-tiny.pt"))
    clip = oclip.load(tmp_path / "ViT-tiny.pt")
    images = np.random.RandomState(9).randn(2, 32, 32, 3).astype(np.float32)
    np.testing.assert_allclose(clip.encode_image(images), reference_image_features(ref, images), atol=TOL)


# --------------------------------------------------------------------------------------------
# Round trips through our exporters


@pytest.mark.parametrize("fmt,name", [("hf", "exported_hf"), ("openai", "clip.pt"), ("openai", "clip.safetensors")])
def test_export_import_round_trip(tmp_path, fmt, name, vocab_dir, tok):
    ref = make_reference(3, vocab=tok.vocab_size)
    torch.save(ref.state_dict(), tmp_path / "src.pt")
    clip = oclip.load(tmp_path / "src.pt", tokenizer=vocab_dir)
    out = oclip.export(clip, tmp_path / name, format=fmt)
    again = oclip.load(out, tokenizer=vocab_dir)
    assert again.config == clip.config
    for (path_a, a), (path_b, b) in zip(sorted(oclip.openai_state_dict(clip).items()),
                                        sorted(oclip.openai_state_dict(again).items())):
        assert path_a == path_b
        np.testing.assert_array_equal(a, b)


def test_hf_export_loads_in_transformers(tmp_path, hf_pair):
    model, clip = hf_pair
    out = oclip.export(clip, tmp_path / "hf", format="hf")
    reloaded = CLIPModel.from_pretrained(out).eval()
    size = model.config.vision_config.image_size
    images = np.random.RandomState(10).randn(2, size, size, 3).astype(np.float32)
    np.testing.assert_allclose(hf_image_features(reloaded, images), hf_image_features(model, images), atol=1e-6)


def test_bfloat16_compute_keeps_float32_params(tmp_path, hf_pair):
    model, clip = hf_pair
    low = oclip.load(oclip.export(clip, tmp_path / "hf", format="hf"), dtype=jnp.bfloat16)
    params = nnx.state(low.model, nnx.Param)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    size = model.config.vision_config.image_size
    images = np.random.RandomState(11).randn(4, size, size, 3).astype(np.float32)
    cosine = np.sum(np.asarray(low.encode_image(images)) * hf_image_features(model, images), axis=-1)
    assert cosine.min() > 0.99, cosine


def test_openai_export_loads_in_reference_module(tmp_path):
    ref = make_reference(3)
    torch.save(ref.state_dict(), tmp_path / "src.pt")
    oclip.export(oclip.load(tmp_path / "src.pt"), tmp_path / "out.pt", format="openai")
    fresh = make_reference(3)
    fresh.load_state_dict(torch.load(tmp_path / "out.pt", weights_only=True), strict=True)
    for (k, a), (_, b) in zip(ref.state_dict().items(), fresh.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


# --------------------------------------------------------------------------------------------
# Bad input


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        oclip.load(tmp_path / "nope.pt")


def test_truncated_file(tmp_path):
    torch.save(make_reference(0).state_dict(), tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt"):
        oclip.load(tmp_path / "cut.pt")


def test_wrong_shapes_and_unknown_keys_are_listed(tmp_path):
    state = openai_state(make_reference(0))
    state["visual.ln_post.weight"] = torch.ones(65)
    state["visual.extra_head.weight"] = torch.ones(3, 3)
    del state["visual.transformer.resblocks.1.mlp.c_fc.bias"]
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as err:
        oclip.load(tmp_path / "bad.pt")
    msg = str(err.value)
    assert "visual.ln_post.weight" in msg and "[65]" in msg
    assert "visual.extra_head.weight" in msg
    assert "visual.transformer.resblocks.1.mlp.c_fc.bias" in msg


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    state = openai_state(make_reference(0))
    state["payload"] = _Exploit(marker)
    torch.save(state, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused"):
        oclip.load(tmp_path / "evil.pt")
    assert not marker.exists()


def test_tokenizer_truncates_keeping_eot_and_warns_once(tok):
    long = "red " * 40
    with pytest.warns(UserWarning, match="truncated"):
        ids = tok([long, long])
    assert ids.shape == (2, 16)
    assert ids[0, 0] == tok.sot_token_id and ids[0, -1] == tok.eot_token_id
    short = tok(["sky"])[0]
    assert list(short[:3]) == [tok.sot_token_id, short[1], tok.eot_token_id] and not short[3:].any()
