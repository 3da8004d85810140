"""Semantic inference (reference 1.6-1.7) against a torch port of the original, and the metrics."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovseg_jax.evaluate import ConfusionMatrix
from ovseg_jax.ensemble import predict_labels, semantic_scores

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
    got = semantic_scores(jnp.asarray(pred_logits), jnp.asarray(mask_logits),
                          jnp.asarray(clip_logits) if use_clip else None, jnp.asarray(valid),
                          resized_hw=resized, ensemble_weight=weight or 0.0)
    np.testing.assert_allclose(got, ref.permute(1, 2, 0).numpy(), atol=TOL, rtol=TOL)


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
