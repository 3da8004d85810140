"""CLIP's zero-shot accuracy on masked ground-truth regions: the CLIP stages' evaluation.

Each class present in a val image gives one masked crop, built exactly as OVSeg's CLIP branch
builds crops of proposals (`ovseg_jax.inference.masked_crops`, reference 1.8) but from the ground-truth
mask; CLIP classifies it against the text embeddings of *all* class names. This isolates what
mask adaptation changes (how well CLIP recognises masked regions) from the segmenter's proposals.

    crops = ground_truth_crops(source, image_size=224, max_examples=500)
    metrics = crop_accuracy(clip, crops, source.class_names, unseen=("snow",))
    # {"crop_acc": ..., "crop_acc_seen": ..., "crop_acc_unseen": ..., "crops": N}   (percent)
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ovseg_jax.inference.masked_crops import masked_crops

_BATCH = 64  # crops per CLIP call (the last batch is padded)


class GroundTruthCrops(NamedTuple):
    images: np.ndarray  # [N, S, S, 3] CLIP-normalised masked crops
    region_masks: np.ndarray  # [N, S, S] float32 0/1
    labels: np.ndarray  # [N] int32 class indices into the source's class names


@functools.partial(jax.jit, static_argnames=("size",))
def _crops_of(image: jax.Array, masks: jax.Array, *, size: int):
    return masked_crops(image, masks, threshold=0.5, size=size)


def ground_truth_crops(source, *, image_size: int, min_pixels: int = 16, max_regions: int = 16,
                       max_examples: int | None = None) -> GroundTruthCrops:
    """One masked crop per class with >= `min_pixels` pixels in each of the first `max_examples`
    images of `source` (the largest `max_regions` classes of an image), at the image's own size."""
    images, region_masks, labels = [], [], []
    count = len(source) if max_examples is None else min(len(source), max_examples)
    for index in range(count):
        example = source[index]
        label = np.asarray(example["label"])
        ids, pixels = np.unique(label[label != source.ignore_value], return_counts=True)
        ids = ids[pixels >= min_pixels][np.argsort(-pixels[pixels >= min_pixels], kind="stable")][:max_regions]
        if not ids.size:
            continue
        masks = np.zeros((max_regions, *label.shape), np.float32)
        masks[:ids.size] = label[None] == ids[:, None, None]
        crops = _crops_of(jnp.asarray(example["image"], jnp.float32), jnp.asarray(masks), size=image_size)
        images.append(np.asarray(crops.images[:ids.size]))
        region_masks.append(np.asarray(crops.region_masks[:ids.size]))
        labels.append(ids.astype(np.int32))
    if not labels:
        raise ValueError(f"no labelled region of >= {min_pixels} pixels in the first {count} images")
    return GroundTruthCrops(np.concatenate(images), np.concatenate(region_masks), np.concatenate(labels))


def crop_accuracy(clip, crops: GroundTruthCrops, class_names: Sequence[str], *, templates="vild",
                  unseen: Sequence[str] = (), mask_prompts: bool = True) -> dict[str, float]:
    """Top-1 accuracy (percent) of `clip` (an `ovseg_jax.clip.Clip`) on `crops` over `class_names`,
    also over the crops of seen and of `unseen` classes -> {"crop_acc", "crop_acc_seen",
    "crop_acc_unseen", "crops"}; the region masks drive the mask prompts when CLIP has them."""
    text = clip.class_embeddings(list(class_names), templates)
    use_masks = mask_prompts and clip.config.mask_prompt_depth > 0
    predictions = []
    for start in range(0, len(crops.labels), _BATCH):
        images = _pad(crops.images[start:start + _BATCH])
        masks = _pad(crops.region_masks[start:start + _BATCH]) if use_masks else None
        features = clip.encode_image(images, masks)
        predictions.append(np.asarray(jnp.argmax(features @ text.T, axis=-1))[:len(crops.labels) - start])
    correct = np.concatenate(predictions) == crops.labels
    is_unseen = np.isin(crops.labels, [list(class_names).index(n) for n in unseen if n in class_names])
    out = {"crop_acc": 100.0 * correct.mean(), "crops": int(correct.size)}
    for key, keep in (("crop_acc_seen", ~is_unseen), ("crop_acc_unseen", is_unseen)):
        out[key] = 100.0 * correct[keep].mean() if keep.any() else float("nan")
    return out


def _pad(x: np.ndarray) -> np.ndarray:
    """Pad the leading axis to `_BATCH` with zeros, so that every CLIP call has one shape."""
    if len(x) == _BATCH:
        return x
    return np.concatenate([x, np.zeros((_BATCH - len(x), *x.shape[1:]), x.dtype)])
