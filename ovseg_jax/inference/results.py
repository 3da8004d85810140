"""One image's result for people: the overlay picture with its legend, the labels PNG, the numbers."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from ovseg_jax.inference import visualize
from ovseg_jax.inference.ensemble import Segmentation, UNLABELED
from ovseg_jax.inference.inputs import load_image


def summarize(segmentation: Segmentation, class_names: Sequence[str]) -> dict:
    """One image's result in numbers: `{"class_names", "size": [H, W], "classes": [{"index", "name",
    "pixels", "share", "mean_confidence"}] (present classes, largest first), "unlabeled_share"}`.
    Confidence is the winning class's score `Σ_q p[q, c] · M[q]` (reference 1.7), not a probability."""
    labels, confidence = np.asarray(segmentation.labels), np.asarray(segmentation.confidence)
    total, num = labels.size, len(class_names)
    inside = (labels >= 0) & (labels < num)
    pixels = np.bincount(labels[inside], minlength=num)
    score = np.bincount(labels[inside], weights=confidence[inside], minlength=num)
    classes = [{"index": int(i), "name": class_names[i], "pixels": int(pixels[i]),
                "share": round(float(pixels[i]) / total, 6), "mean_confidence": round(float(score[i] / pixels[i]), 6)}
               for i in np.argsort(-pixels, kind="stable") if pixels[i] > 0]
    return {"class_names": list(class_names), "size": list(labels.shape), "classes": classes,
            "unlabeled_share": round(float(total - inside.sum()) / total, 6)}


def render(image: np.ndarray, segmentation: Segmentation, class_names: Sequence[str],
           side_by_side: bool = False) -> Image.Image:
    """uint8 `[H, W, 3]` image and its `Segmentation` (same size) -> a PIL picture: class colours
    blended over the image (unlabeled pixels left as they are, boundaries drawn), optionally the
    input on the left, and a legend of the classes present with their pixel share."""
    image = load_image(image)
    colours = visualize.palette(len(class_names))
    picture = visualize.overlay(image, segmentation.labels, colours)
    if side_by_side:
        picture = visualize.side_by_side([image, picture])
    entries = [(f"{c['name']}  {100 * c['share']:.1f}%", colours[c["index"]])
               for c in summarize(segmentation, class_names)["classes"]]
    return visualize.with_legend(picture, entries)


def label_image(labels: np.ndarray, num_classes: int) -> Image.Image:
    """int `[H, W]` labels (UNLABELED = -1) -> the labels PNG: uint8 with 255 for unlabeled pixels
    when `num_classes` < 255, else uint16 with 65535."""
    labels = np.asarray(labels)
    dtype = np.uint8 if num_classes < 255 else np.uint16
    out = np.where(labels == UNLABELED, np.iinfo(dtype).max, labels).astype(dtype)
    return Image.fromarray(out)
