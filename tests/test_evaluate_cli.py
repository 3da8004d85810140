"""`python -m ovseg_jax.evaluate`: metrics against a numpy reference, the CLI on the quick demo's
world, one-pass sweeps equal to separate evaluations, flip TTA equal to a hand-made average, the
box-crop variant against torch, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ovseg_jax import evaluate as ev
from ovseg_jax.evaluation import evaluator, metrics, seen
from ovseg_jax.evaluation.report import SEEN_COLOUR, UNSEEN_COLOUR
from ovseg_jax.inference.masked_crops import CLIP_MEAN, CLIP_STD, masked_crops

# ---------------------------------------------------------------------------------------------
# Metrics and parsing (no model)


def reference_metrics(pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore: int) -> dict:
    """detectron2's SemSegEvaluator restated with per-class pixel counts."""
    keep = gt != ignore
    p, g = pred[keep], gt[keep]
    iou, acc, weights = {}, {}, {}
    denominator = 0
    for c in range(num_classes):
        tp, in_gt, in_pred = np.sum((p == c) & (g == c)), np.sum(g == c), np.sum(p == c)
        if in_gt or in_pred:
            denominator += 1
        if in_gt:
            iou[c] = tp / (in_gt + in_pred - tp)
            acc[c] = tp / in_gt
            weights[c] = in_gt / g.size
    return {"mIoU": 100 * sum(iou.values()) / denominator, "mACC": 100 * np.mean(list(acc.values())),
            "fwIoU": 100 * sum(iou[c] * weights[c] for c in iou), "pACC": 100 * np.mean(p == g),
            "IoU": iou, "ACC": acc}


def test_metrics_match_a_numpy_reference():
    rs = np.random.RandomState(0)
    c, ignore = 6, 255
    gt = rs.randint(0, 4, size=(3, 20, 30))  # classes 4, 5 never in the ground truth
    gt[:, :3] = ignore
    pred = np.where(rs.rand(*gt.shape) < 0.6, gt, rs.randint(0, 5, size=gt.shape))  # 4 predicted, 5 never
    pred[gt == ignore] = 5  # predictions on ignored pixels do not count
    pred = np.where(pred == ignore, 0, pred)
    matrix = metrics.ConfusionMatrix(c, ignore)
    for p, g in zip(pred, gt):
        matrix.update(p, g)
    names = [f"class{i}" for i in range(c)]
    got = matrix.metrics(names, unseen=["class1", "class4"])
    want = reference_metrics(pred, gt, c, ignore)
    for key in ("mIoU", "mACC", "fwIoU", "pACC"):
        assert got[key] == pytest.approx(want[key], abs=1e-9), key
    for i, name in enumerate(names):
        if i in want["IoU"]:
            assert got["IoU"][name] == pytest.approx(100 * want["IoU"][i], abs=1e-9)
            assert got["ACC"][name] == pytest.approx(100 * want["ACC"][i], abs=1e-9)
        else:
            assert np.isnan(got["IoU"][name]) and np.isnan(got["ACC"][name])
    # class 4 is predicted but absent: it lowers mIoU (5 classes counted) but not the unseen mean
    assert got["mIoU_unseen"] == pytest.approx(100 * want["IoU"][1], abs=1e-9)
    assert got["mIoU_seen"] == pytest.approx(100 * np.mean([want["IoU"][k] for k in (0, 2, 3)]), abs=1e-9)


def test_sweep_values_and_their_errors():
    assert evaluator.parse_values("0,0.1,...,1") == [round(0.1 * k, 10) for k in range(11)]
    assert evaluator.parse_values("0.6,0.65,...,0.8") == [0.6, 0.65, 0.7, 0.75, 0.8]
    assert evaluator.parse_sweeps(["lambda=0,0.5", "threshold=0.4"]) == {"lambda": [0.0, 0.5], "threshold": [0.4]}
    for bad in (["lambda=0,x"], ["gamma=0.1"], ["lambda=0.5,...,1"], ["threshold=1.5"]):
        with pytest.raises(ValueError):
            evaluator.parse_sweeps(bad)
    assert evaluator.grid([0.0, 0.5], [0.3, 0.4]) == [evaluator.Setting(0.0, 0.3), evaluator.Setting(0.5, 0.3), evaluator.Setting(0.0, 0.4),
                                             evaluator.Setting(0.5, 0.4)]


def test_seen_classes_match_coco_stuff_names_and_synonyms():
    coco = ["person", "airplane", "couch", "wall-brick", "sky-other", "pavement", "dining table", "shelf"]
    names = ["wall", "sky", "sidewalk, pavement", "aeroplane", "sofa", "diningtable", "shelves",
             "escalator, moving staircase", "skyscraper"]
    assert seen.coco_seen(names, coco) == [True, True, True, True, True, True, True, False, False]


@pytest.mark.slow
def test_box_crops_keep_the_background_and_match_torch():
    rs = np.random.RandomState(3)
    h, w = 29, 41
    image = (rs.rand(h, w, 3) * 255).astype(np.float32)
    probs = rs.rand(3, h, w).astype(np.float32) * 0.3
    probs[0, 4:11, 6:30] = 0.9
    probs[1, 20:, :5] = 0.7  # at the border
    got = masked_crops(jnp.asarray(image), jnp.asarray(probs), threshold=0.4, size=16, crop="box")
    np.testing.assert_array_equal(got.valid, [True, True, False])
    mean = torch.tensor(CLIP_MEAN).reshape(3, 1, 1) * 255.0
    std = torch.tensor(CLIP_STD).reshape(3, 1, 1) * 255.0
    for q in (0, 1):
        ys, xs = np.nonzero(probs[q] > 0.4)
        region = (torch.from_numpy(image).permute(2, 0, 1)[:, ys.min():ys.max() + 1, xs.min():xs.max() + 1] - mean) / std
        want = F.interpolate(region[None], size=(16, 16), mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
        np.testing.assert_allclose(got.images[q], want.numpy(), atol=1e-4)
    np.testing.assert_array_equal(got.region_masks, 1.0)
    with pytest.raises(ValueError, match="crop must be one of"):
        masked_crops(jnp.asarray(image), jnp.asarray(probs), threshold=0.4, crop="blurred")


# ---------------------------------------------------------------------------------------------
# On the quick demo's model and world


@pytest.fixture(scope="module")
def demo(quick_demo):
    """(output dir, segmenter, clip, val source) of the session's quick demo."""
    import ovseg_jax.clip
    import ovseg_jax.segmenter
    from ovseg_jax.data import registry

    out, _ = quick_demo
    segmenter = ovseg_jax.segmenter.load(out / "ovseg_synthetic.pth")
    clip = ovseg_jax.clip.load(out / "ovseg_synthetic.pth", tokenizer=out / "world" / "tokenizer")
    return out, segmenter, clip, registry.get("synthetic").make_source(out / "world", "val")


def _predictor(demo, setting: evaluator.Setting, **kwargs):
    from ovseg_jax.inference.ensemble import Predictor

    _, segmenter, clip, _ = demo
    return Predictor(segmenter, clip, mask_threshold=setting.mask_threshold, ensemble_weight=setting.ensemble_weight,
                     templates=["a {}"], **kwargs)


EVAL = dict(ignore_value=255, short=128, max_size=512, bucket=32, batch_size=2, max_images=4, progress=False)


def test_cli_writes_metrics_table_and_chart(demo, tmp_path, capsys):
    from ovseg_jax.data import pipeline

    out, _, _, source = demo
    report = ev.run(["--checkpoint", str(out / "ovseg_synthetic.pth"), "--dataset", "synthetic",
                     "--root", str(out / "world"), "--max-images", "4", "--batch-size", "2", "--out", str(tmp_path),
                     "--ensemble-weight", "0.6", "--mask-threshold", "0.5", "--no-progress"])
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["images"] == 4 and saved["setting"]["ensemble_weight"] == 0.6
    assert saved["setting"]["short"] == 128 and saved["setting"]["templates"] == ["a {}"]  # the demo's settings
    assert saved["unseen"] == json.loads((out / "world" / "classes.json").read_text())["unseen"]
    assert set(saved["IoU"]) == set(source.class_names) == set(saved["ACC"])
    # the batched CLI equals the per-image evaluation of the same setting
    examples = pipeline.eval_loader(source, short=128, max_size=512, bucket=32)
    want = evaluator.evaluate_dataset(_predictor(demo, evaluator.Setting(0.6, 0.5)), examples, list(source.class_names),
                               ignore_value=255, unseen=saved["unseen"], max_examples=4, log_every=0)
    for key in ("mIoU", "mIoU_seen", "mIoU_unseen", "fwIoU", "mACC", "pACC"):
        assert saved[key] == pytest.approx(want[key], abs=1e-9), key
    printed = capsys.readouterr().out
    assert "mIoU" in printed and f"{saved['mIoU']:5.1f}" in printed and "unseen" in printed
    chart = Image.open(tmp_path / "per_class_iou.png").convert("RGB")
    assert chart.height > 16 * len(source.class_names)  # a row per class
    pixels = np.asarray(chart).reshape(-1, 3)
    for colour in (SEEN_COLOUR, UNSEEN_COLOUR):  # both groups drawn
        assert (pixels == colour).all(axis=1).any()
    svg = (tmp_path / "per_class_iou.svg").read_text()  # the same chart as SVG, its text kept as text
    assert all(f">{name}</text>" in svg for name in source.class_names)


def test_sweep_cells_equal_separate_evaluations(demo):
    source = demo[3]
    settings = evaluator.grid([0.0, 0.6], [0.3, 0.5])
    swept = evaluator.evaluate(_predictor(demo, settings[0]), source, settings, **EVAL)
    assert swept.images == 4
    for setting in settings:
        alone = evaluator.evaluate(_predictor(demo, setting), source, [setting], **EVAL)
        np.testing.assert_array_equal(swept.confusion[setting], alone.confusion[setting], err_msg=str(setting))
    assert not np.array_equal(swept.confusion[settings[0]], swept.confusion[settings[3]])


def torch_bilinear(scores: np.ndarray, out_hw) -> np.ndarray:
    """`[h, w, C]` -> `[H, W, C]`, torch bilinear align_corners=False (the reference's final resize)."""
    x = torch.from_numpy(np.array(scores, np.float32)).permute(2, 0, 1)[None]
    return F.interpolate(x, size=tuple(out_hw), mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()


def test_flip_tta_is_the_average_of_the_two_passes(demo):
    source = demo[3]
    setting = evaluator.Setting(0.6, 0.5)
    predictor = _predictor(demo, setting)
    names = list(source.class_names)
    items = list(evaluator.PassExamples(source, short=128, max_size=512, bucket=32, tta=evaluator.TTA(flip=True), max_images=2))
    labels = evaluator.batch_labels(predictor, items, names, [setting])[setting]
    for item, got in zip(items, labels):
        (image, hw, _), (mirrored, _, flag) = item["passes"]
        assert flag and np.array_equal(mirrored[:, :hw[1]], image[:, :hw[1]][:, ::-1])
        plain = np.asarray(predictor.scores(image, names, resized_hw=hw))[:hw[0], :hw[1]]
        flipped = np.asarray(predictor.scores(mirrored, names, resized_hw=hw))[:hw[0], :hw[1]]
        average = 0.5 * (torch_bilinear(plain, item["orig_size"]) + torch_bilinear(flipped, item["orig_size"])[:, ::-1])
        top2 = np.sort(average, axis=-1)[..., -2:]
        clear = top2[..., 1] - top2[..., 0] > 1e-5  # pixels whose winner float rounding cannot change
        assert clear.mean() > 0.5
        np.testing.assert_array_equal(got[clear], average.argmax(-1)[clear])
        assert np.mean(got != average.argmax(-1)) < 0.01


def test_box_crops_reach_clip_through_the_predictor(demo):
    source = demo[3]
    names = list(source.class_names)
    _, _, clip, _ = demo
    masked, box = (_predictor(demo, evaluator.Setting(0.6, 0.5), crop=c) for c in ("masked", "box"))
    item = next(iter(evaluator.PassExamples(source, short=128, max_size=512, bucket=32)))
    image, hw, _ = item["passes"][0]
    proposals = box.proposals(image, names, resized_hw=hw)
    logits, valid = box.classify_crops(image, proposals.mask_probs, names)
    crops = masked_crops(jnp.asarray(image, jnp.float32), proposals.mask_probs, threshold=0.5,
                         size=clip.config.image_size, crop="box")
    features = clip.encode_image(crops.images)  # whole crops, no mask prompts
    want = 100 * np.asarray(features) @ np.asarray(box.text_bank(names)).T
    np.testing.assert_array_equal(valid, crops.valid)
    np.testing.assert_allclose(np.asarray(logits)[valid, :-1], want[np.asarray(valid)], atol=1e-3)
    masked_logits, _ = masked.classify_crops(image, proposals.mask_probs, names)
    assert not np.allclose(np.asarray(masked_logits)[valid], np.asarray(logits)[valid], atol=1e-2)


def test_clip_top_k_through_the_predictor(demo):
    """k = Q is the paper's path exactly; k = 4: CLIP's logits for the 4 valid proposals of highest
    segmenter confidence x mask area, zero logits (a uniform P_clip) for the other valid ones."""
    from ovseg_jax.inference.ensemble import combine

    source = demo[3]
    names = list(source.class_names)
    item = next(iter(evaluator.PassExamples(source, short=128, max_size=512, bucket=32)))
    image, hw, _ = item["passes"][0]
    plain = _predictor(demo, evaluator.Setting(0.7, 0.4))
    q = plain.segmenter.config.num_queries
    every, top4 = (_predictor(demo, evaluator.Setting(0.7, 0.4), clip_top_k=k) for k in (q, 4))
    np.testing.assert_array_equal(every.scores(image, names, resized_hw=hw), plain.scores(image, names, resized_hw=hw))

    proposals = plain.proposals(image, names, resized_hw=hw)
    all_logits, valid = map(np.asarray, plain.classify_crops(image, proposals.mask_probs, names))
    with pytest.raises(ValueError, match="pass pred_logits"):
        top4.classify_crops(image, proposals.mask_probs, names)
    logits, valid4 = top4.classify_crops(image, proposals.mask_probs, names, pred_logits=proposals.pred_logits)
    np.testing.assert_array_equal(valid4, valid)
    pred = np.asarray(proposals.pred_logits, np.float64)
    p = np.exp(pred - pred.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    ranking = np.where(valid, p[:, :-1].max(1) * np.asarray(proposals.mask_probs, np.float64).sum((1, 2)), -np.inf)
    chosen = np.zeros(q, bool)
    chosen[np.argsort(-ranking)[:4]] = True
    assert (valid & ~chosen).any()
    np.testing.assert_allclose(np.asarray(logits)[chosen], all_logits[chosen], atol=1e-3)
    np.testing.assert_array_equal(np.asarray(logits)[valid & ~chosen], 0.0)
    np.testing.assert_allclose(top4.scores(image, names, resized_hw=hw),
                               combine(proposals, logits, valid4, ensemble_weight=0.7), atol=1e-5)


@pytest.mark.parametrize("flags,check", [
    (["--mode", "segmenter"], lambda r: r["setting"]["ensemble_weight"] is None),
    (["--mode", "clip", "--crop", "box", "--no-mask-prompts", "--templates", "a {};the {}"],
     lambda r: r["setting"]["ensemble_weight"] == 0 and r["setting"]["crop"] == "box"
     and r["setting"]["mask_prompts"] is False),
    (["--tta", "flip", "--tta-scales", "0.75,1", "--sweep", "lambda=0.5,1"],
     lambda r: r["setting"]["tta"] == {"scales": [0.75, 1.0], "flip": True} and len(r["sweep"]["cells"]) == 2),
    (["--clip-top-k", "4", "--sweep", "threshold=0.4,0.5"],
     lambda r: r["setting"]["clip_top_k"] == 4 and len(r["sweep"]["cells"]) == 2),
])
def test_cli_variants_run(demo, tmp_path, flags, check):
    out, segmenter, clip, _ = demo
    report = ev.run(["--checkpoint", str(out / "ovseg_synthetic.pth"), "--dataset", "synthetic", "--root",
                     str(out / "world"), "--max-images", "2", "--out", str(tmp_path), "--no-progress", *flags],
                    models=(segmenter, clip))
    assert report["images"] == 2 and 0 <= report["mIoU"] <= 100 and check(report)


def test_clip_top_k_needs_clip(demo, tmp_path):
    out, segmenter, clip, _ = demo
    with pytest.raises(ValueError, match="--clip-top-k needs CLIP"):
        ev.run(["--checkpoint", str(out / "ovseg_synthetic.pth"), "--dataset", "synthetic", "--root",
                str(out / "world"), "--out", str(tmp_path), "--mode", "segmenter", "--clip-top-k", "4"],
               models=(segmenter, clip))


@pytest.mark.parametrize("args,message", [
    (["--dataset", "ade999"], "--dataset 'ade999' unknown"),
    (["--dataset", "ade150", "--root", "/nonexistent/datasets"], "--root /nonexistent/datasets: no such directory"),
])
@pytest.mark.slow
def test_bad_dataset_or_root_is_one_error_line(args, message, tmp_path):
    run = subprocess.run([sys.executable, "-m", "ovseg_jax.evaluate", "--checkpoint", str(tmp_path / "none.pth"),
                          *args], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], run.stderr
