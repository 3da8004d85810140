"""`make demo` end to end (quick variant): every stage trains, evaluation runs, the merged checkpoint loads."""

from __future__ import annotations

import json
import math

import numpy as np
from PIL import Image

import ovseg_jax.clip as oclip
import ovseg_jax.segmenter as oseg


def test_quick_demo_trains_evaluates_and_exports(quick_demo):
    tmp_path, result = quick_demo
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["evaluation"] == result["evaluation"]
    assert [r["clip"] for r in saved["evaluation"]] == [None, "pretrain", "clip_ft", "clip_mpt"]
    for row in saved["evaluation"]:
        assert row["images"] == 8
        assert all(math.isfinite(row[k]) and 0 <= row[k] <= 100 for k in ("mIoU", "mIoU_seen", "pACC"))
        # CLIP rows carry CLIP's zero-shot accuracy on masked ground-truth regions
        assert ("crop_acc" in row) == (row["clip"] is not None)
    assert set(saved["stages"]) == {"pretrain", "segmenter", "clip_ft", "clip_mpt"}
    assert all(0 <= s["compile_seconds"] <= s["seconds"] for s in saved["stages"].values())
    picture = Image.open(tmp_path / "unseen_example.png")
    assert picture.width > 3 * 64 and picture.mode == "RGB"
    for stage in ("pretrain", "segmenter", "clip_ft", "clip_mpt"):
        assert (tmp_path / "train" / stage / "checkpoints").is_dir(), stage
    # The segmenter stage's periodic evaluation hook logged its mIoU to TensorBoard.
    events = b"".join(p.read_bytes() for p in (tmp_path / "train" / "segmenter" / "tensorboard").iterdir())
    assert b"eval/mIoU" in events
    events = b"".join(p.read_bytes() for p in (tmp_path / "train" / "clip_mpt" / "tensorboard").iterdir())
    assert b"eval/crop_acc_unseen" in events
    # The merged OVSeg checkpoint holds the trained segmenter and the mask-prompted CLIP.
    clip = oclip.load(tmp_path / "ovseg_synthetic.pth")
    assert clip.config.mask_prompt_depth == 2
    segmenter = oseg.load(tmp_path / "ovseg_synthetic.pth")
    trained = oseg.load(tmp_path / "train" / "segmenter")
    np.testing.assert_array_equal(segmenter.non_object_embedding[...], trained.non_object_embedding[...])
    assert segmenter.config == trained.config
