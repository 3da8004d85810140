"""Semantic inference (reference 1.6-1.7) against a torch port of the original, and the metrics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovseg_jax.evaluation.metrics import ConfusionMatrix
from ovseg_jax.inference.ensemble import (Proposals, combine, demo_scores, ensemble_class_probs, filtered_clip_logits,
                                mask_probabilities, predict_labels, proposal_ranking, top_proposals)

TOL = 1e-4
Q, C = 7, 5


def original_semantic_inference(mask_cls, mask_pred, clip_cls, valid, resized_hw, weight):
    """`OVSeg.semantic_inference` of the original, with the data-dependent valid subset."""
    mask_pred = F.interpolate(mask_pred[None], scale_factor=4, mode="bilinear", align_corners=False)[0]
    mask_pred = mask_pred[:, : resized_hw[0], : resized_hw[1]].sigmoid()
    mask_cls = F.softmax(mask_cls, dim=-1)[..., :-1]
    if clip_cls is None:
        return torch.einsum("qc,qhw->chw", mask_cls, mask_pred)
    clip_cls = F.softmax(clip_cls[valid][:, :-1], dim=-1)
    if weight > 0:
        full = torch.ones_like(mask_cls)
        full[valid] = clip_cls
        mask_cls = torch.pow(mask_cls, 1 - weight) * torch.pow(full, weight)
    else:
        mask_cls, mask_pred = clip_cls, mask_pred[valid]
    return torch.einsum("qc,qhw->chw", mask_cls, mask_pred)


@pytest.fixture(scope="module")
def outputs():
    rs = np.random.RandomState(0)
    pred_logits = rs.randn(Q, C + 1).astype(np.float32) * 3
    mask_logits = rs.randn(Q, 6, 9).astype(np.float32) * 4  # stride 4 of a 24 x 36 padded input
    clip_logits = rs.randn(Q, C + 1).astype(np.float32) * 5
    valid = rs.rand(Q) > 0.3
    valid[0], valid[1] = True, False
    return pred_logits, mask_logits, clip_logits, valid


@pytest.mark.parametrize("weight", [0.7, 0.45, 0.0, None])
def test_semantic_scores_match_original(outputs, weight):
    pred_logits, mask_logits, clip_logits, valid = outputs
    resized = (22, 33)
    use_clip = weight is not None
    ref = original_semantic_inference(torch.from_numpy(pred_logits), torch.from_numpy(mask_logits),
                                      torch.from_numpy(clip_logits) if use_clip else None,
                                      torch.from_numpy(valid), resized, weight or 0.0)
    proposals = Proposals(jnp.asarray(pred_logits), mask_probabilities(jnp.asarray(mask_logits), (24, 36),
                                                                       jnp.asarray(resized)))
    got = combine(proposals, jnp.asarray(clip_logits) if use_clip else None, jnp.asarray(valid),
                  ensemble_weight=weight)
    np.testing.assert_allclose(got[:22, :33], ref.permute(1, 2, 0).numpy(), atol=TOL, rtol=TOL)
    assert float(jnp.abs(got[22:]).max()) == 0.0 and float(jnp.abs(got[:, 33:]).max()) == 0.0


def original_demo_inference(mask_pred, clip_cls, valid, threshold, num_named):
    """`OVSegDEMO`'s CLIP-only semantic inference (reference 1.10) on the data-dependent valid subset:
    each named class keeps its best valid proposal's probability row over its hard mask."""
    mask_pred, probs = mask_pred[valid], F.softmax(clip_cls[valid][:, :-1], dim=-1)
    select = torch.zeros_like(probs)
    for c in range(num_named):
        q = probs[:, c].argmax()
        select[q] = probs[q]
    return torch.einsum("qc,qhw->chw", select, (mask_pred > threshold).float())


@pytest.mark.parametrize("num_named", [C, C - 1])
def test_demo_scores_match_the_original_demo(outputs, num_named):
    _, mask_logits, clip_logits, valid = outputs
    probs = torch.sigmoid(F.interpolate(torch.from_numpy(mask_logits)[None], scale_factor=4, mode="bilinear",
                                        align_corners=False)[0])
    ref = original_demo_inference(probs, torch.from_numpy(clip_logits), torch.from_numpy(valid), 0.35, num_named)
    class_probs = jnp.where(jnp.asarray(valid)[:, None], jax.nn.softmax(jnp.asarray(clip_logits)[:, :-1], -1), 0.0)
    got = demo_scores(class_probs, jnp.asarray(probs.numpy()), jnp.asarray(valid), mask_threshold=0.35,
                      num_named=num_named)
    np.testing.assert_allclose(got, ref.permute(1, 2, 0).numpy(), atol=TOL, rtol=TOL)
    labels = predict_labels(got, (24, 36), num_named=num_named)
    ref_labels = np.where(ref[0].numpy() == 0, -1, ref.argmax(0).numpy())  # the original's visualiser
    ref_labels[ref_labels >= num_named] = -1  # "others" is not a user's class
    np.testing.assert_array_equal(labels, ref_labels)


def test_demo_mode_with_ensemble_weight_picks_among_valid_proposals(outputs):
    """The original crashes for λ > 0 (issue #18). Here the demo keeps, per class, the valid
    proposal with the highest ensemble probability (invalid ones keep p_mf^(1-λ) and are never picked)."""
    pred_logits, mask_logits, clip_logits, valid = outputs
    weight, threshold = 0.5, 0.35
    probs = torch.sigmoid(F.interpolate(torch.from_numpy(mask_logits)[None], scale_factor=4, mode="bilinear",
                                        align_corners=False)[0])
    p_mf = F.softmax(torch.from_numpy(pred_logits), -1)[:, :-1][valid]
    p_clip = F.softmax(torch.from_numpy(clip_logits)[:, :-1], -1)[valid]
    ensembled = p_mf ** (1 - weight) * p_clip ** weight
    select = torch.zeros_like(ensembled)
    for c in range(C):
        q = ensembled[:, c].argmax()
        select[q] = ensembled[q]
    ref = torch.einsum("qc,qhw->hwc", select, (probs[valid] > threshold).float())
    proposals = Proposals(jnp.asarray(pred_logits), jnp.asarray(probs.numpy()))
    got = combine(proposals, jnp.asarray(clip_logits), jnp.asarray(valid), ensemble_weight=weight, mode="demo",
                  mask_threshold=threshold)
    np.testing.assert_allclose(got, ref.numpy(), atol=TOL, rtol=TOL)


# ---------------------------------------------------------------------------------------------
# The CLIP top-k filter


def _probs_of(outputs):
    pred_logits, mask_logits, clip_logits, valid = outputs
    return pred_logits, np.asarray(mask_probabilities(jnp.asarray(mask_logits), (24, 36), jnp.asarray((22, 33)))), \
        clip_logits, valid


@pytest.mark.parametrize("weight", [0.7, 0.0])
def test_clip_top_k_of_all_proposals_is_the_unfiltered_ensemble(outputs, weight):
    pred_logits, mask_probs, clip_logits, valid = _probs_of(outputs)
    chosen = top_proposals(proposal_ranking(jnp.asarray(pred_logits), jnp.asarray(mask_probs)), jnp.asarray(valid), Q)
    np.testing.assert_array_equal(chosen, np.arange(Q))
    logits = filtered_clip_logits(chosen, jnp.asarray(clip_logits)[chosen], Q)
    proposals = Proposals(jnp.asarray(pred_logits), jnp.asarray(mask_probs))
    np.testing.assert_array_equal(
        combine(proposals, logits, jnp.asarray(valid), ensemble_weight=weight),
        combine(proposals, jnp.asarray(clip_logits), jnp.asarray(valid), ensemble_weight=weight))


@pytest.mark.parametrize("weight", [0.7, 0.0])
def test_proposals_clip_skips_get_a_uniform_clip_distribution(outputs, weight):
    """k = 2 of the valid proposals, ranked by confidence x soft mask area: the chosen ones keep the
    ensemble of the original; the other valid ones get `p_mf^(1-λ) · (1/C)^λ` (CLIP only: `1/C`);
    invalid ones `p_mf^(1-λ)` (CLIP only: 0) as before."""
    pred_logits, mask_probs, clip_logits, valid = _probs_of(outputs)
    k = 2
    p_all = torch.softmax(torch.from_numpy(pred_logits), -1).numpy()
    ranking = p_all[:, :-1].max(1) * mask_probs.sum((1, 2), dtype=np.float64)
    want_chosen = np.sort(np.flatnonzero(valid)[np.argsort(-ranking[valid])[:k]])
    chosen = top_proposals(proposal_ranking(jnp.asarray(pred_logits), jnp.asarray(mask_probs)), jnp.asarray(valid), k)
    np.testing.assert_array_equal(chosen, want_chosen)
    logits = filtered_clip_logits(chosen, jnp.asarray(clip_logits)[chosen], Q)
    got = np.asarray(ensemble_class_probs(jnp.asarray(pred_logits), logits, jnp.asarray(valid), weight))

    p_mf = p_all[:, :-1]
    p_clip = torch.softmax(torch.from_numpy(clip_logits)[:, :-1], -1).numpy()
    uniform = np.full_like(p_clip, 1.0 / C)
    skipped = valid.copy()
    skipped[want_chosen] = False
    assert skipped.any() and (~valid).any()

    def ensemble(rows, p_classifier):  # reference 1.7 step 5; λ = 0 is the original's CLIP-only mode
        return p_classifier[rows] if weight == 0 else p_mf[rows] ** (1 - weight) * p_classifier[rows] ** weight

    np.testing.assert_allclose(got[want_chosen], ensemble(want_chosen, p_clip), rtol=TOL, atol=1e-6)
    np.testing.assert_allclose(got[skipped], ensemble(skipped, uniform), rtol=TOL, atol=1e-6)
    np.testing.assert_allclose(got[~valid], p_mf[~valid] ** (1 - weight) if weight else 0.0, rtol=TOL, atol=1e-6)


def test_predict_labels_resizes_to_the_original_size(outputs):
    scores = np.random.RandomState(1).rand(22, 33, C).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(scores).permute(2, 0, 1)[None], size=(41, 50), mode="bilinear",
                        align_corners=False)[0].argmax(0).numpy()
    np.testing.assert_array_equal(predict_labels(jnp.asarray(scores), (41, 50)), ref)


def direct_miou(preds, labels, num_classes, ignore):
    """mIoU from per-class pixel sets (the evaluator's definition, written without a confusion matrix)."""
    ious, present = [], 0
    for c in range(num_classes):
        tp = fp = fn = 0
        for p, g in zip(preds, labels):
            keep = g != ignore
            tp += np.sum((p == c) & (g == c) & keep)
            fp += np.sum((p == c) & (g != c) & keep)
            fn += np.sum((p != c) & (g == c) & keep)
        if tp + fn > 0:
            ious.append(tp / (tp + fp + fn))
        if tp + fp + fn > 0:
            present += 1
    return 100 * sum(ious) / present


def test_confusion_matrix_miou():
    rs = np.random.RandomState(2)
    num_classes, ignore = 6, 255
    preds = [rs.randint(0, 5, (8, 11)), rs.randint(0, 6, (5, 4))]  # class 5 predicted only in image 2
    labels = [rs.randint(0, 4, (8, 11)), rs.randint(0, 4, (5, 4))]  # classes 4, 5 never in the GT
    labels[0][:2] = ignore
    cm = ConfusionMatrix(num_classes, ignore)
    for p, g in zip(preds, labels):
        cm.update(p, g)
    m = cm.metrics()
    assert m["mIoU"] == pytest.approx(direct_miou(preds, labels, num_classes, ignore))
    kept = np.concatenate([(p == g)[g != ignore] for p, g in zip(preds, labels)])
    assert m["pACC"] == pytest.approx(100 * kept.mean())
    assert np.isnan(m["IoU"]["4"]) and np.isnan(m["IoU"]["5"])


def test_confusion_matrix_rejects_out_of_range_labels():
    cm = ConfusionMatrix(3, ignore_value=65535)
    with pytest.raises(ValueError, match=r"labels outside \[0, 3\).*\[7\]"):
        cm.update(np.zeros((2, 2)), np.array([[0, 7], [65535, 1]]))


def test_seen_and_unseen_miou():
    pred = np.array([[0, 0, 1, 2], [2, 2, 1, 0]])
    label = np.array([[0, 1, 1, 2], [2, 0, 1, 255]])
    cm = ConfusionMatrix(3)
    cm.update(pred, label)
    m = cm.metrics(["a", "b", "c"], unseen=["c"])
    # (pred, gt) pairs without ignore: (0,0) (0,1) (1,1) (2,2) (2,2) (2,0) (1,1)
    # c: TP 2, FP 1, FN 0 -> 2/3; a: TP 1, FP 1, FN 1 -> 1/3; b: TP 2, FP 0, FN 1 -> 2/3
    assert m["mIoU_unseen"] == pytest.approx(100 * 2 / 3)
    assert m["mIoU_seen"] == pytest.approx(100 * (1 / 3 + 2 / 3) / 2)


@pytest.mark.parametrize("kwargs,message", [
    (dict(clip_top_k=0), "clip_top_k must be a positive number"),
    (dict(clip_top_k=True), "clip_top_k must be a positive number"),
    (dict(clip_top_k=4, mode="demo", ensemble_weight=0.0), "clip_top_k is for the semantic mode"),
])
def test_clip_top_k_settings_are_checked(kwargs, message):
    from ovseg_jax.inference.ensemble import Predictor

    with pytest.raises(ValueError, match=message):
        Predictor(None, None, **kwargs)  # refused before the models are looked at
