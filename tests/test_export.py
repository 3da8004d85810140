"""One way to load every model (files and training workdirs) and `python -m ovseg_jax.export`: the
exported files load into the torch reference CLIP, transformers and the OVSeg key layout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
import torch
from flax import nnx

import ovseg_jax.clip as oclip
import ovseg_jax.segmenter as osegmenter
from ovseg_jax import configs, export, merge
from ovseg_jax.clip import Clip, openai_state_dict
from ovseg_jax.convert.params import nnx_to_torch
from ovseg_jax.convert.torch_io import CheckpointError
from ovseg_jax.models.clip import CLIP, ClipConfig
from ovseg_jax.models.maskformer import Segmenter
from ovseg_jax.text import Tokenizer, VILD_TEMPLATES, write_word_vocab
from ovseg_jax.training.tasks.segmenter import model_config
from ovseg_jax.training.trainer import Trainer
from tests.test_segmenter import _reference_ovseg_keys
from tests.test_train_segmenter import CLASSES, tiny_segmenter_config
from tests.torch_clip_reference import OpenAIClip
from tests.train_helpers import PairBatches

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4
CONTEXT, MASK_DEPTH = 16, 2
TEXTS = ["a photo of a red circle.", "There is a green square in the scene.", "grass"]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's pixel statistics (reference 6.1: x255)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    return write_word_vocab([*VILD_TEMPLATES, *CLASSES, *TEXTS], tmp_path_factory.mktemp("vocab"))


@pytest.fixture(scope="module")
def tok(vocab_dir):
    return Tokenizer.from_dir(vocab_dir, context_length=CONTEXT)


def reference_clip(tok, mask_depth=MASK_DEPTH) -> OpenAIClip:
    """The torch reference with the architecture of `openai_clip_config` (heads = width / 64)."""
    return OpenAIClip(embed_dim=32, resolution=32, patch=8, vision_width=64, vision_layers=2, context=CONTEXT,
                      vocab=tok.vocab_size, text_width=64, text_layers=1, mask_depth=mask_depth).eval()


def openai_clip_config(tok) -> ClipConfig:
    return ClipConfig(embed_dim=32, image_size=32, patch_size=8, vision_width=64, vision_layers=2, vision_heads=1,
                      vision_mlp_dim=256, context_length=CONTEXT, vocab_size=tok.vocab_size, text_width=64,
                      text_layers=1, text_heads=1, text_mlp_dim=256, eot_token_id=tok.eot_token_id)


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory, vocab_dir, tok):
    """A mask prompt tuning run of 2 steps (checkpoints 1 and 2) that records its tokenizer."""
    c = configs.mask_prompt_tuning(openai_clip_config(tok), depth=MASK_DEPTH, lr=0.05, total_steps=2,
                                   warmup_steps=1, batch_size=8)
    c.checkpoint.interval = 1
    c.data = ml_collections.ConfigDict({"kind": "python", "factory": "tests.train_helpers:pair_batches",
                                        "tokenizer": str(vocab_dir)})
    workdir = tmp_path_factory.mktemp("runs") / "clip_mpt"
    trainer = Trainer(c, workdir=workdir)
    assert trainer.fit(PairBatches(8, context=CONTEXT, eot=tok.eot_token_id)) == "done"
    trainer.close()
    return workdir, trainer.model(jax.device_get(trainer.state["params"]))


@pytest.fixture(scope="module")
def seg_run(clip_run):
    """A segmenter run whose frozen CLIP is the CLIP run (tokenizer not repeated), saved by the
    trainer at its start (step 0: compiling a segmenter step would cost a minute here)."""
    clip_workdir, _ = clip_run
    c = tiny_segmenter_config(clip_workdir, total_steps=1)
    workdir = clip_workdir.parent / "segmenter"
    trainer = Trainer(c, workdir=workdir)
    trainer.save()
    trainer.close()
    state = jax.device_get(trainer.state)
    return workdir, trainer.model(state["params"], state.get("model_state")), model_config(c)


def same_params(a, b) -> bool:
    a, b = nnx_to_torch(a), nnx_to_torch(b)
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------
# Loading training workdirs


@pytest.mark.slow
def test_clip_workdir_loads_the_trained_clip_with_the_run_tokenizer(clip_run, tok):
    workdir, trained = clip_run
    clip = oclip.load(workdir)
    assert clip.config == trained.config and clip.config.mask_prompt_depth == MASK_DEPTH
    assert same_params(clip.model, trained)
    np.testing.assert_array_equal(clip.tokenize(TEXTS), tok(TEXTS))
    first = oclip.load(workdir, step=1)
    assert not np.array_equal(first.model.visual.mask_embedding[...], clip.model.visual.mask_embedding[...])
    plain = oclip.load(workdir, mask_prompt_depth=0)
    assert plain.config.mask_prompt_depth == 0 and "visual.mask_embedding" not in openai_state_dict(plain)


@pytest.mark.slow
def test_segmenter_workdir_loads_the_saved_segmenter(seg_run):
    workdir, saved, config = seg_run
    segmenter = osegmenter.load(workdir)
    assert isinstance(segmenter, Segmenter) and segmenter.config == config
    assert same_params(segmenter, saved.segmenter)
    assert same_params(osegmenter.load(workdir / "checkpoints", step=0), saved.segmenter)


@pytest.mark.slow
def test_clip_of_a_segmenter_workdir_is_its_frozen_clip(seg_run, clip_run):
    workdir, saved, _ = seg_run
    clip = oclip.load(workdir)
    assert same_params(clip.model, clip_run[1])
    # the text bank the run trains against came from this CLIP and the CLIP run's tokenizer
    np.testing.assert_allclose(clip.class_embeddings(CLASSES), saved.text_bank[...], atol=1e-6)


@pytest.mark.slow
def test_wrong_workdirs_and_steps_are_refused(clip_run, seg_run, tmp_path):
    with pytest.raises(CheckpointError, match="'clip' run; expected a 'segmenter' stage"):
        osegmenter.load(clip_run[0])
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 7; saved steps: \[1, 2\]"):
        oclip.load(clip_run[0], step=7)
    path = oclip.export(oclip.load(clip_run[0]), tmp_path / "clip.pt", format="openai")
    with pytest.raises(ValueError, match="only for training workdirs"):
        oclip.load(path, step=1)


def test_class_embeddings_of_no_names_is_an_error(clip_run):
    with pytest.raises(ValueError, match="at least one class name"):
        oclip.load(clip_run[0]).class_embeddings([])


# --------------------------------------------------------------------------------------------
# Export: the files load where the original code loads them


def reference_features(ref: OpenAIClip, images, masks, ids):
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2)
        image = ref.encode_image(x, torch.from_numpy(masks)[:, None])
        text = ref.encode_text(torch.from_numpy(ids.astype(np.int64)))
    return unit(image.numpy()), unit(text.numpy())


def inputs():
    rs = np.random.RandomState(0)
    images = rs.randn(3, 32, 32, 3).astype(np.float32)
    masks = np.zeros((3, 32, 32), np.float32)
    masks[0], masks[1, 4:20, 9:30] = 1, 1  # all on, a region, all off (background prompts everywhere)
    return images, masks


def assert_reference_matches(ref: OpenAIClip, clip: Clip):
    images, masks = inputs()
    image, text = reference_features(ref, images, masks, clip.tokenize(TEXTS))
    np.testing.assert_allclose(clip.encode_image(images, masks), image, atol=TOL)
    np.testing.assert_allclose(clip.encode_text(TEXTS), text, atol=TOL)


def test_openai_export_runs_in_the_torch_reference(clip_run, tok, tmp_path):
    workdir, _ = clip_run
    export.main(["--from", str(workdir), "--format", "openai", "--out", str(tmp_path / "clip.pt")])
    ref = reference_clip(tok)
    ref.load_state_dict(torch.load(tmp_path / "clip.pt", weights_only=True), strict=True)
    assert ref.visual.mask_embedding.shape == (MASK_DEPTH, 16, 64)
    assert_reference_matches(ref, oclip.load(workdir))


def test_hf_export_loads_in_transformers(clip_run, tmp_path):
    from transformers import CLIPModel

    workdir, _ = clip_run
    export.main(["--from", str(workdir), "--format", "hf", "--out", str(tmp_path / "hf")])
    model = CLIPModel.from_pretrained(tmp_path / "hf").eval()
    clip = oclip.load(workdir)
    images, _ = inputs()
    ids = Tokenizer.from_dir(tmp_path / "hf", context_length=CONTEXT)(TEXTS)  # the run's tokenizer went along
    np.testing.assert_array_equal(ids, clip.tokenize(TEXTS))
    with torch.no_grad():
        image = model.get_image_features(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2)).pooler_output
        text = model.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64))).pooler_output
    np.testing.assert_allclose(clip.encode_image(images), unit(image.numpy()), atol=TOL)
    np.testing.assert_allclose(clip.encode_text(TEXTS), unit(text.numpy()), atol=TOL)


@pytest.mark.slow
def test_ovseg_export_of_a_segmenter_workdir_has_the_released_layout(seg_run, tok, tmp_path):
    workdir, _, config = seg_run
    out = tmp_path / "ovseg.pth"
    export.main(["--from", str(workdir), "--format", "ovseg", "--out", str(out)])
    raw = torch.load(out, weights_only=True)
    assert set(raw) == {"model"}
    state = raw["model"]
    ref = reference_clip(tok)
    clip_keys = {f"clip_adapter.clip_model.{k}" for k in ref.state_dict()}
    expected = _reference_ovseg_keys(depths=config.backbone_config.depths, layers=config.dec_layers)
    assert set(state) == expected | clip_keys | {"clip_adapter.pixel_mean", "clip_adapter.pixel_std"}
    np.testing.assert_allclose(state["clip_adapter.pixel_mean"].flatten(), 255 * np.array(CLIP_MEAN), rtol=1e-6)
    np.testing.assert_allclose(state["clip_adapter.pixel_std"].flatten(), 255 * np.array(CLIP_STD), rtol=1e-6)
    # the CLIP inside is the frozen CLIP of the run, mask prompts included, runnable by the reference
    prefix = "clip_adapter.clip_model."
    ref.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    assert_reference_matches(ref, oclip.load(workdir))
    # and the segmenter part is the run's segmenter
    back = osegmenter.load(out)
    assert back.config == config and same_params(back, osegmenter.load(workdir))


@pytest.mark.slow
def test_merge_accepts_workdirs_for_both_models(seg_run, clip_run, tmp_path):
    out = tmp_path / "merged.pth"
    merge.main(["--segmenter", str(seg_run[0]), "--clip", str(clip_run[0]), "--out", str(out)])
    state = torch.load(out, weights_only=True)["model"]
    for key, value in openai_state_dict(clip_run[1]).items():
        np.testing.assert_array_equal(state[f"clip_adapter.clip_model.{key}"].numpy(), value, err_msg=key)
    assert same_params(osegmenter.load(out), seg_run[1].segmenter)


def test_ovseg_export_takes_another_clip(seg_run, tok, tmp_path):
    other = Clip(CLIP(openai_clip_config(tok), rngs=nnx.Rngs(7)))
    clip_file = oclip.export(other, tmp_path / "other.pt", format="openai")
    out = tmp_path / "ovseg.safetensors"
    export.main(["--from", str(seg_run[0]), "--format", "ovseg", "--out", str(out), "--clip", str(clip_file)])
    assert same_params(oclip.load(out).model, other.model)


# --------------------------------------------------------------------------------------------
# Command-line errors: one line on stderr, exit status 2


@pytest.mark.parametrize("args, message", [
    (["--from", "{tmp}/nope", "--format", "openai", "--out", "{tmp}/x.pt"], "nope: no such file or directory"),
    (["--from", "{clip}", "--format", "ovseg", "--out", "{tmp}/x.pth"], "'clip' run; expected a 'segmenter' stage"),
    (["--from", "{tmp}/notes.pth", "--format", "hf", "--out", "{tmp}/hf"], "notes.pth is not a PyTorch checkpoint"),
    (["--from", "{clip}", "--format", "openai", "--out", "{tmp}/x.pt", "--clip", "{clip}"], "--clip is for --format ovseg"),
])
def test_export_cli_errors(clip_run, tmp_path, capsys, args, message):
    (tmp_path / "notes.pth").write_text("not weights\n")
    argv = [a.format(tmp=tmp_path, clip=clip_run[0]) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        export.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize("module, args", [
    ("ovseg_jax.export", ["--from", "missing.pth", "--format", "ovseg", "--out", "x.pth"]),
    ("ovseg_jax.merge", ["--segmenter", "missing.pth", "--clip", "missing.pt", "--out", "x.pth"]),
])
@pytest.mark.slow
def test_cli_exit_status_without_traceback(tmp_path, module, args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "missing" in proc.stderr
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
