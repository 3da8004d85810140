"""Semantic-segmentation metrics with the original evaluator's math (reference 5).

One confusion matrix over the whole dataset (rows = prediction, columns = ground truth, ignored
pixels excluded); IoU for classes with ground-truth pixels, mIoU = their sum / the number of classes
in the ground truth *or* the predictions; fwIoU, mACC, pACC as detectron2's `SemSegEvaluator`.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


class ConfusionMatrix:
    """`[C, C]` int64 counts, rows = prediction, columns = ground truth; ignored pixels excluded."""

    def __init__(self, num_classes: int, ignore_value: int = 255):
        self.num_classes = num_classes
        self.ignore_value = ignore_value
        self.counts = np.zeros((num_classes, num_classes), np.int64)

    def update(self, pred, label) -> None:
        """Add one image (or a batch): `pred`, `label` int `[..., H, W]` of equal shape.

        Labels other than `ignore_value` must lie in `[0, num_classes)`."""
        pred, label = np.asarray(pred, np.int64), np.asarray(label, np.int64)
        if pred.shape != label.shape:
            raise ValueError(f"prediction {pred.shape} and label {label.shape} differ in shape")
        valid = label != self.ignore_value
        bad = valid & ((label < 0) | (label >= self.num_classes))
        if bad.any():
            raise ValueError(f"labels outside [0, {self.num_classes}) other than ignore {self.ignore_value}: "
                             f"{np.unique(label[bad])[:10].tolist()}")
        if ((pred < 0) | (pred >= self.num_classes)).any():
            raise ValueError(f"predictions outside [0, {self.num_classes})")
        c = self.num_classes
        self.counts += np.bincount(pred[valid] * c + label[valid], minlength=c * c).reshape(c, c)

    def metrics(self, class_names: Sequence[str] | None = None, unseen: Iterable[str] = ()) -> dict:
        return segmentation_metrics(self.counts, class_names, unseen)


def segmentation_metrics(confusion: np.ndarray, class_names: Sequence[str] | None = None,
                         unseen: Iterable[str] = ()) -> dict:
    """`[C, C]` confusion (rows = prediction, cols = GT) -> `{"mIoU", "fwIoU", "mACC", "pACC",
    "IoU": {name: value or nan}, "ACC": {name: value or nan}}` in percent, as the original
    evaluator (nan: no ground-truth pixels). With `unseen` class names, also `mIoU_seen` /
    `mIoU_unseen`: mean IoU over the classes of each group that have GT pixels."""
    conf = np.asarray(confusion, np.float64)
    tp = np.diag(conf)
    pos_gt = conf.sum(axis=0)
    pos_pred = conf.sum(axis=1)
    acc_valid = pos_gt > 0
    iou_valid = (pos_gt + pos_pred) > 0
    iou = np.full(len(tp), np.nan)
    acc = np.full(len(tp), np.nan)
    union = pos_gt + pos_pred - tp
    iou[acc_valid] = tp[acc_valid] / union[acc_valid]
    acc[acc_valid] = tp[acc_valid] / pos_gt[acc_valid]
    total = pos_gt.sum()
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(tp))]
    if len(names) != len(tp):
        raise ValueError(f"{len(names)} class names for a {len(tp)}-class confusion matrix")
    unseen = set(unseen)
    groups = {}
    if unseen:
        is_unseen = np.array([n in unseen for n in names])
        for group, members in (("seen", ~is_unseen), ("unseen", is_unseen)):
            keep = members & acc_valid
            groups[f"mIoU_{group}"] = 100 * float(np.mean(iou[keep])) if keep.any() else float("nan")
    return {
        **groups,
        "mIoU": 100 * np.sum(iou[acc_valid]) / max(np.sum(iou_valid), 1),
        "fwIoU": 100 * np.sum(iou[acc_valid] * pos_gt[acc_valid] / max(total, 1)),
        "mACC": 100 * np.sum(acc[acc_valid]) / max(np.sum(acc_valid), 1),
        "pACC": 100 * np.sum(tp) / max(total, 1),
        "IoU": {n: 100 * v for n, v in zip(names, iou)},
        "ACC": {n: 100 * v for n, v in zip(names, acc)},
    }
