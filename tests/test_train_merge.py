"""Stage hand-off to the segmenter: an adapted CLIP replaces the CLIP inside an OVSeg checkpoint."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

import ovseg_jax.clip as oclip
from ovseg_jax.clip import openai_state_dict
from ovseg_jax.convert.merge import merge
from ovseg_jax.convert.torch_io import CheckpointError
from ovseg_jax.training.trainer import Trainer
from tests.train_helpers import PairBatches, tiny_config


def test_merge_replaces_clip_keys_and_adds_mask_embedding(tmp_path):
    trainer = Trainer(tiny_config("mpt", total_steps=2, lr=0.05), workdir=tmp_path / "mpt")
    trainer.fit(PairBatches(8), num_steps=1)
    trainer.close()
    trained = openai_state_dict(trainer.model(jax.device_get(trainer.state["params"])))
    assert "visual.mask_embedding" in trained

    rng = np.random.default_rng(0)
    head = rng.standard_normal((3, 4)).astype(np.float32)
    old = {f"clip_adapter.clip_model.{k}": torch.zeros(v.shape) for k, v in trained.items()
           if k != "visual.mask_embedding"}
    torch.save({"model": {"sem_seg_head.predictor.class_embed.weight": torch.from_numpy(head), **old},
                "iteration": 119999}, tmp_path / "seg.pth")

    out = merge(tmp_path / "seg.pth", oclip.load(tmp_path / "mpt"), tmp_path / "merged.pth")
    merged = torch.load(out, weights_only=True)["model"]
    np.testing.assert_array_equal(merged["sem_seg_head.predictor.class_embed.weight"].numpy(), head)
    assert sorted(merged) == sorted(["sem_seg_head.predictor.class_embed.weight",
                                     *(f"clip_adapter.clip_model.{k}" for k in trained)])
    for key, value in trained.items():
        np.testing.assert_array_equal(merged[f"clip_adapter.clip_model.{key}"].numpy(), value, err_msg=key)


def test_merge_rejects_a_file_without_clip(tmp_path):
    torch.save({"model": {"backbone.w": torch.zeros(2)}}, tmp_path / "seg.pth")
    trainer = Trainer(tiny_config("ft"))
    with pytest.raises(CheckpointError, match="no model.clip_adapter.clip_model"):
        merge(tmp_path / "seg.pth", trainer.model(trainer.state["params"]), tmp_path / "out.pth")


def test_merge_carries_deep_visual_prompts(tmp_path):
    """The VPT baseline's `visual.vpt_embedding` is not in the original's checkpoint: merge adds it,
    so the merged file evaluates with the prompts it was trained with."""
    import dataclasses  # noqa: PLC0415

    from flax import nnx  # noqa: PLC0415

    from ovseg_jax.models.clip import CLIP  # noqa: PLC0415
    from tests.train_helpers import TINY_CLIP  # noqa: PLC0415

    vpt = CLIP(dataclasses.replace(TINY_CLIP, vpt_tokens=3, vpt_depth=2), rngs=nnx.Rngs(0))
    adapted = openai_state_dict(vpt)
    assert adapted["visual.vpt_embedding"].shape == (2, 3, TINY_CLIP.vision_width)
    old = {f"clip_adapter.clip_model.{k}": torch.zeros(v.shape) for k, v in adapted.items()
           if k != "visual.vpt_embedding"}
    torch.save({"model": old}, tmp_path / "seg.pth")
    merged = torch.load(merge(tmp_path / "seg.pth", vpt, tmp_path / "merged.pth"), weights_only=True)["model"]
    np.testing.assert_array_equal(merged["clip_adapter.clip_model.visual.vpt_embedding"].numpy(),
                                  adapted["visual.vpt_embedding"])
