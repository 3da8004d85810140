"""Stacks of blocks run as a scan and with rematerialisation (`ovseg_jax.models.layers.set_stack_options`):
same outputs and gradients as the loop (and as the independent torch references), same parameter
paths and checkpoints, config fields checked. (`--config.scan_layers` / `--config.remat` through
`python -m ovseg_jax.train`: tests/test_train_cli.py.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import ovseg_jax.clip as oclip
from ovseg_jax import configs
from ovseg_jax.convert.params import nnx_to_torch, torch_to_nnx
from ovseg_jax.models.clip import CLIP
from ovseg_jax.models.layers import run_layers, set_stack_options
from ovseg_jax.models.swin import SwinConfig, SwinTransformer
from ovseg_jax.models.transformer_decoder import TransformerDecoder
from ovseg_jax.training.checkpoint import load_params
from ovseg_jax.training.trainer import Trainer
from tests.test_ablate import torch_vpt_features
from tests.test_clip import make_reference, reference_image_features, region_masks
from tests.torch_clip_reference import OpenAIClip
from tests.train_helpers import TINY_CLIP, PairBatches, assert_adam_runs_match, tiny_config

SAME = 1e-5  # scan / remat vs the loop, float32
TOL = 1e-4  # vs the torch references (as tests/test_clip.py)


def with_options(model, scan_layers, remat):
    """A copy of `model` (same parameters) whose stacks run with the given options."""
    graphdef, state = nnx.split(model)
    return set_stack_options(nnx.merge(graphdef, state), scan_layers=scan_layers, remat=remat)


def assert_same_grads(grads, expected, what: str) -> None:
    """Equal to float32 rounding: within 1e-5 of each tensor's largest entry."""
    for (path, a), (_, b) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(expected)):
        b = np.asarray(b[...])
        np.testing.assert_allclose(a[...], b, atol=SAME * max(1.0, np.abs(b).max()), rtol=0, err_msg=f"{path} {what}")


def jaxpr_text(fn, *args) -> str:
    return str(jax.make_jaxpr(fn)(*args))


# ------------------------------------------------------------------------------------------ CLIP

@pytest.mark.slow
@pytest.mark.parametrize("depth,shared,options", [(2, False, [(True, "none")]),
                                                   (3, True, [(True, "block"), (False, "dots")])])
def test_clip_scan_and_remat_keep_mask_prompt_features(tmp_path, depth, shared, options):
    ref = make_reference(depth, shared)
    torch.save(ref.state_dict(), tmp_path / "openai.pt")
    loop = oclip.load(tmp_path / "openai.pt").model
    images = np.random.RandomState(4).randn(4, 32, 32, 3).astype(np.float32)
    masks = region_masks()
    ids = np.random.RandomState(5).randint(1, 59, (3, 12)).astype(np.int32)
    ids[:, 7] = 59  # the end-of-text token (the largest id) pools
    expected = loop.encode_image(images, masks), loop.encode_text(ids)
    torch_image = reference_image_features(ref, images, masks)
    for scan, remat in options:
        model = with_options(loop, scan, remat)
        image, text = model.encode_image(images, masks), model.encode_text(ids)
        np.testing.assert_allclose(image, expected[0], atol=SAME, err_msg=f"{scan=} {remat=}")
        np.testing.assert_allclose(text, expected[1], atol=SAME, err_msg=f"{scan=} {remat=}")
        features = image / np.linalg.norm(image, axis=-1, keepdims=True)
        np.testing.assert_allclose(features, torch_image, atol=TOL, err_msg=f"{scan=} {remat=}")
        assert nnx_to_torch(model).keys() == nnx_to_torch(loop).keys()  # export layout unchanged


@pytest.mark.slow
def test_clip_scan_keeps_deep_visual_prompts(tmp_path):
    torch.manual_seed(7)
    ref = OpenAIClip(vision_layers=4, mask_depth=2).eval()
    prompts = np.random.RandomState(1).randn(3, 2, 64).astype(np.float32)  # VPT depth 3, 2 tokens
    torch.save({**ref.state_dict(), "visual.vpt_embedding": torch.from_numpy(prompts)}, tmp_path / "vpt.pt")
    loop = oclip.load(tmp_path / "vpt.pt").model
    assert (loop.config.vpt_depth, loop.config.mask_prompt_depth) == (3, 2)
    images = np.random.RandomState(2).randn(3, 32, 32, 3).astype(np.float32)
    masks = np.zeros((3, 32, 32), np.float32)
    masks[0], masks[1, :12, 4:20] = 1, 1
    expected = loop.encode_image(images, masks)
    scanned = with_options(loop, True, "dots").encode_image(images, masks)
    np.testing.assert_allclose(scanned, expected, atol=SAME)
    unit = np.asarray(scanned) / np.linalg.norm(scanned, axis=-1, keepdims=True)
    np.testing.assert_allclose(unit, torch_vpt_features(ref, images, prompts, masks), atol=TOL)


@pytest.mark.slow  # forward and backward of three variants
def test_clip_gradients_are_the_same_with_scan_and_remat():
    model = CLIP(TINY_CLIP.replace(vision_layers=3, text_layers=2, mask_prompt_depth=2), rngs=nnx.Rngs(0))
    batch = PairBatches(4).global_batch_at(0)
    graphdef, params = nnx.split(model)

    def loss(params, graphdef):
        m = nnx.merge(graphdef, params)
        image = m.encode_image(batch["image"], batch["region_mask"])
        text = m.encode_text(batch["token_ids"])
        return jnp.sum(jnp.tanh(image @ text.T))

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    expected = grad(params, graphdef)
    for scan, remat in [(True, "dots"), (False, "block")]:
        variant = nnx.graphdef(with_options(model, scan, remat))
        text = jaxpr_text(lambda p: loss(p, variant), params)
        assert ("scan[" in text) == scan and ("checkpoint[" in text or "remat" in text) == (remat != "none")
        assert_same_grads(grad(params, variant), expected, f"{scan=} {remat=}")


# ---------------------------------------------------------------------------------- Swin, decoder

@pytest.mark.slow
def test_swin_scan_matches_transformers_with_an_odd_stage_depth():
    """Stages of 1, 3 and 2 blocks: scanned (unshifted, shifted) pairs plus an odd last block."""
    from transformers import SwinBackbone, SwinConfig as HFSwinConfig

    torch.manual_seed(0)
    hf = HFSwinConfig(image_size=64, embed_dim=16, depths=[1, 3, 2], num_heads=[1, 2, 2], window_size=3,
                      hidden_act="gelu", out_features=["stage1", "stage2", "stage3"])
    ref = SwinBackbone(hf).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    images = np.random.RandomState(0).randn(2, 3, 50, 70).astype(np.float32)
    with torch.no_grad():
        expected = [t.numpy().transpose(0, 2, 3, 1) for t in ref(torch.from_numpy(images)).feature_maps]
    from ovseg_jax.convert.backbone_keys import swin_from_transformers

    loop = SwinTransformer(SwinConfig(embed_dim=16, depths=(1, 3, 2), num_heads=(1, 2, 2), window_size=3,
                                      out_indices=(0, 1, 2)), rngs=nnx.Rngs(0))
    torch_to_nnx(swin_from_transformers({k: v.numpy() for k, v in ref.state_dict().items()}), loop)
    x = jnp.asarray(images.transpose(0, 2, 3, 1))
    plain = loop(x)
    scanned = with_options(loop, True, "block")(x)
    for key, ref_out in zip(("res2", "res3", "res4"), expected):
        np.testing.assert_allclose(scanned[key], plain[key], atol=SAME, err_msg=key)
        np.testing.assert_allclose(scanned[key], ref_out, atol=TOL, err_msg=key)


@pytest.mark.slow  # forward and backward of three variants
def test_swin_training_forward_and_gradients_are_the_same_with_scan_and_remat():
    """Drop path on (rates differ per block, odd stage depth): with the same PRNG key every block
    draws the same keys in the loop and in the scan."""
    swin = SwinTransformer(SwinConfig(embed_dim=16, depths=(3, 2), num_heads=(1, 2), window_size=3,
                                      drop_path_rate=0.3, out_indices=(0, 1)), rngs=nnx.Rngs(0))
    images = jnp.asarray(np.random.RandomState(0).randn(2, 26, 30, 3), jnp.float32)
    graphdef, params = nnx.split(swin)

    def loss(params, graphdef):
        out = nnx.merge(graphdef, params)(images, deterministic=False, rngs=nnx.Rngs(dropout=3))
        return jnp.mean(out["res2"] ** 2) + jnp.mean(jnp.tanh(out["res3"]))

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    expected_loss, expected = value_and_grad(params, graphdef)
    value, grads = value_and_grad(params, nnx.graphdef(with_options(swin, True, "block")))
    np.testing.assert_allclose(value, expected_loss, rtol=SAME)
    assert_same_grads(grads, expected, "swin scan, remat block")


@pytest.mark.slow  # forward and backward of three variants
def test_decoder_training_forward_and_gradients_are_the_same_with_scan_and_remat():
    """Dropout on: each layer's key is a scanned input, the same as the loop's."""
    decoder = TransformerDecoder(8, dim=32, num_queries=5, heads=4, ffn_dim=64, num_layers=3, dropout=0.1,
                                 rngs=nnx.Rngs(0))
    features = jnp.asarray(np.random.RandomState(0).randn(2, 3, 4, 8), jnp.float32)
    graphdef, params = nnx.split(decoder)

    def run(params, graphdef):
        hs = nnx.merge(graphdef, params)(features, deterministic=False, rngs=nnx.Rngs(dropout=3))
        return jnp.mean(jnp.tanh(hs) * jnp.arange(hs.size).reshape(hs.shape) / hs.size), hs

    value_and_grad = jax.jit(jax.value_and_grad(run, has_aux=True), static_argnums=1)
    (_, expected_hs), expected = value_and_grad(params, graphdef)
    (_, hs), grads = value_and_grad(params, nnx.graphdef(with_options(decoder, True, "dots")))
    assert hs.shape == (3, 2, 5, 32)
    np.testing.assert_allclose(hs, expected_hs, atol=SAME)
    assert_same_grads(grads, expected, "decoder scan, remat dots")


def test_scan_refuses_blocks_of_different_structure():
    blocks = [nnx.Linear(4, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 4, use_bias=False, rngs=nnx.Rngs(0))]
    with pytest.raises(ValueError, match="differ in structure"):
        run_layers(lambda block, x, _: (block(x), None), blocks, jnp.ones((1, 4)), scan=True)
    assert run_layers(lambda block, x, _: (block(x), None), blocks, jnp.ones((1, 4)))[0].shape == (1, 4)


# ------------------------------------------------------------------------- config and checkpoints

def test_stack_options_are_checked():
    with pytest.raises(ValueError, match="remat must be one of"):
        set_stack_options(CLIP(TINY_CLIP, rngs=nnx.Rngs(0)), remat="all")
    c = tiny_config()
    c.remat = "everything"
    with pytest.raises(configs.ConfigError, match=r"config.remat='everything': must be one of \('none', 'block'"):
        configs.validate(c, data=False)


@pytest.mark.slow  # trains two tiny CLIPs for 3 steps
def test_checkpoints_do_not_depend_on_scan(tmp_path):
    """A run trained with scan + remat saves the loop's parameter paths; a loop run resumes it, the
    public loader reads it, and both runs train to the same parameters."""
    def trainer(workdir, scan, remat, steps):
        c = tiny_config("mpt", total_steps=steps, batch_size=4)
        c.scan_layers, c.remat = scan, remat
        c.optim.trainable = None  # everything trains, so every block's gradient matters
        return Trainer(c, workdir)

    scanned = trainer(tmp_path / "scan", True, "block", 3)
    scanned.fit(PairBatches(4))
    scanned.close()
    loop = trainer(tmp_path / "loop", False, "none", 3)
    loop.fit(PairBatches(4))
    loop.close()
    saved_scan, saved_loop = load_params(tmp_path / "scan"), load_params(tmp_path / "loop")
    assert saved_scan.keys() == saved_loop.keys() and "visual/transformer/resblocks/1/ln_1/scale" in saved_scan
    assert_adam_runs_match(saved_scan, saved_loop, lr=scanned.config.optim.lr, steps=3)
    resumed = trainer(tmp_path / "scan", False, "none", 3)  # scan and remat may change on resume
    assert resumed.restore() == 3
    for path, value in saved_scan.items():
        np.testing.assert_array_equal(resumed.state["params"][path], value, err_msg=path)
    resumed.close()
    loaded = nnx_to_torch(oclip.load(tmp_path / "scan").model)
    assert loaded.keys() == nnx_to_torch(CLIP(TINY_CLIP.replace(mask_prompt_depth=2), rngs=nnx.Rngs(0))).keys()
    np.testing.assert_array_equal(loaded["visual.mask_embedding"], saved_scan["visual/mask_embedding"])
