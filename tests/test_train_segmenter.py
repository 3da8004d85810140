"""Segmenter training stage: solver tables of reference 3.4, text bank from the frozen CLIP, steps."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from ovseg_jax import configs
from ovseg_jax.training import optim
from tests import clip_fixtures as demo
from ovseg_jax.models.maskformer import SegmenterConfig
from ovseg_jax.models.swin import SwinConfig
from ovseg_jax.training.trainer import Trainer

CLASSES = demo.CLASS_NAMES[:4]
SIZE, MAX_MASKS = 64, 3


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return demo.build_checkpoint(tmp_path_factory.mktemp("clip"), seed=0)


def tiny_segmenter_config(clip_dir, total_steps=3):
    seg = SegmenterConfig(backbone_config=SwinConfig.tiny_test(), num_queries=5, hidden_dim=32, conv_dim=32,
                          mask_dim=32, dec_layers=2, nheads=2, dim_feedforward=32, class_hidden_dim=32,
                          clip_dim=32)
    c = configs.segmenter_training(seg.to_dict(), clip_init=str(clip_dir), class_names=CLASSES,
                                   lr=1e-3, weight_decay=0.01, backbone_lr_mult=0.1, total_steps=total_steps,
                                   batch_size=2, warmup_steps=1)
    c.log_every = 1
    return c


def segmentation_batches(seed=0):
    rng = np.random.default_rng(seed)
    while True:
        masks = np.zeros((2, MAX_MASKS, SIZE, SIZE), np.uint8)
        masks[:, 0, : SIZE // 2] = 1
        masks[:, 1, SIZE // 2:, : SIZE // 3] = 1
        yield {"image": rng.integers(0, 255, (2, SIZE, SIZE, 3), dtype=np.uint8), "masks": masks,
               "classes": np.array([[0, 2, 0], [1, 3, 0]], np.int32),
               "valid": np.array([[True, True, False], [True, True, False]])}


@pytest.fixture(scope="module")
def trained(clip_dir):
    trainer = Trainer(tiny_segmenter_config(clip_dir))
    before = jax.device_get(trainer.state)
    assert trainer.fit(segmentation_batches()) == "done"
    return trainer, before, jax.device_get(trainer.state)


@pytest.mark.slow  # trains a Swin segmenter for 3 steps (trained)
def test_weight_decay_and_lr_tables_follow_detectron2(trained):
    trainer, _, _ = trained
    groups = optim.param_groups(trainer.trainable, trainer.config.optim)
    no_decay = {p for p, (_, wd) in groups.items() if wd == 0}
    backbone = {p for p, (lr, _) in groups.items() if lr == 0.1}
    assert "segmenter/backbone/layers/0/blocks/0/attn/relative_position_bias_table" in no_decay
    assert "segmenter/backbone/layers/0/blocks/0/norm1/scale" in no_decay
    assert "segmenter/backbone/norm0/bias" in no_decay
    assert "segmenter/pixel_decoder/layer_1/norm/scale" in no_decay
    assert "segmenter/transformer_decoder/layers/0/norm2/bias" in no_decay
    assert "segmenter/transformer_decoder/query_embed/embedding" in no_decay
    for decayed in ["segmenter/backbone/layers/0/blocks/0/attn/qkv/bias", "segmenter/non_object_embedding",
                    "segmenter/class_embed/layers/0/kernel", "segmenter/pixel_decoder/mask_features/bias"]:
        assert decayed in groups and decayed not in no_decay, decayed
    assert backbone == {p for p in groups if p.startswith("segmenter/backbone/")}


@pytest.mark.slow  # trains a Swin segmenter for 3 steps (trained)
def test_text_bank_is_the_frozen_clip_template_ensemble(trained, clip_dir):
    import ovseg_jax.clip as oclip

    _, before, after = trained
    expected = np.asarray(oclip.load(clip_dir).class_embeddings(CLASSES))
    bank = after["model_state"]["text_bank"]
    np.testing.assert_allclose(bank, expected, atol=1e-6)
    np.testing.assert_array_equal(before["model_state"]["text_bank"], bank)


@pytest.mark.slow  # trains a Swin segmenter for 3 steps (trained)
def test_steps_update_every_trained_tensor(trained):
    trainer, before, after = trained
    assert int(after["step"]) == 3
    unchanged = [p for p in trainer.trainable if np.array_equal(before["params"][p], after["params"][p])]
    assert not unchanged, unchanged[:5]


def test_missing_clip_is_reported_before_training(tmp_path, clip_dir):
    from ovseg_jax.training.tasks import segmenter as task

    config = tiny_segmenter_config(clip_dir)
    with config.unlocked():
        config.model.clip_init = str(tmp_path / "ViT-L-14.pt")
    with pytest.raises(FileNotFoundError, match="ViT-L-14.pt.*frozen CLIP"):
        task.check_inputs(config)


@pytest.mark.slow
def test_a_resnet_runs_frozen_batch_norm_statistics_come_back_with_its_workdir(clip_dir, tmp_path):
    """`segmenter.load(workdir)` of an R101c run: the FrozenBN statistics (not parameters: the run
    keeps them in `train/model_state`, as loaded from R-103.pkl at its start) are the run's, not the
    initial identity ones."""
    from ovseg_jax import segmenter as segmenter_api
    from ovseg_jax.convert.params import nnx_to_torch
    from ovseg_jax.models.resnet import ResNetConfig

    c = tiny_segmenter_config(clip_dir, total_steps=1)
    with c.unlocked():
        c.model.segmenter = dataclasses.replace(SegmenterConfig.from_dict(c.model.segmenter.to_dict()), backbone="resnet",
                                                backbone_config=ResNetConfig.tiny_test()).to_dict()
    trainer = Trainer(c, workdir=tmp_path / "run")
    rng = np.random.default_rng(0)  # as a detectron2 file's statistics: anything but 0 / 1
    trainer.state["model_state"] = {k: (v if k.endswith("text_bank") else v + rng.uniform(0.5, 1.0, v.shape))
                                    for k, v in trainer.state["model_state"].items()}
    trainer.save()
    trainer.close()
    state = jax.device_get(trainer.state)
    expected = nnx_to_torch(trainer.model(state["params"], state["model_state"]).segmenter)
    loaded = nnx_to_torch(segmenter_api.load(tmp_path / "run"))
    assert sum("running_var" in k for k in expected) >= 10
    assert loaded.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(loaded[key], expected[key], err_msg=key)
