"""Resizes and masked crops against torch.nn.functional.interpolate and a torch port of reference 1.8."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovseg_jax.inference.masked_crops import CLIP_MEAN, CLIP_STD, masked_crops
from ovseg_jax.utils import image_ops

TOL = 1e-4


def torch_resize(x_nhwc: np.ndarray, out_hw, mode: str) -> np.ndarray:
    kw = {} if mode == "nearest" else dict(align_corners=False)
    y = F.interpolate(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2), size=out_hw, mode=mode, **kw)
    return y.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("mode", ["nearest", "bilinear", "bicubic"])
@pytest.mark.parametrize("in_hw,out_hw", [((7, 11), (20, 9)), ((33, 18), (8, 18)), ((5, 5), (224, 3))])
def test_resize_matches_torch(mode, in_hw, out_hw):
    x = np.random.RandomState(0).randn(2, *in_hw, 3).astype(np.float32)
    got = image_ops.resize(jnp.asarray(x), out_hw, mode)
    np.testing.assert_allclose(got, torch_resize(x, out_hw, mode), atol=TOL)


def test_resize_other_axes_layout():
    x = np.random.RandomState(1).randn(3, 9, 14).astype(np.float32)  # [..., H, W]
    got = image_ops.resize_bilinear(jnp.asarray(x), (4, 21), axes=(-2, -1))
    np.testing.assert_allclose(got, torch_resize(x[..., None], (4, 21), "bilinear")[..., 0], atol=TOL)


def reference_crops(image: np.ndarray, probs: np.ndarray, threshold: float, size: int, ratio: float):
    """Reference 1.8 written with torch ops, one proposal at a time as the original adapter."""
    fill = torch.tensor([255.0 * c for c in CLIP_MEAN]).reshape(3, 1, 1)
    mean = torch.tensor(CLIP_MEAN).reshape(3, 1, 1) * 255.0
    std = torch.tensor(CLIP_STD).reshape(3, 1, 1) * 255.0
    img = torch.from_numpy(image).permute(2, 0, 1)
    crops, masks, valid = [], [], []
    for prob in probs:
        b = torch.from_numpy(prob > threshold)
        valid.append(bool(b.any()))
        if not b.any():
            crops.append(None)
            masks.append(None)
            continue
        ys, xs = torch.nonzero(b, as_tuple=True)
        x1, y1, x2, y2 = (float(v) for v in (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
        cx, cy, w, h = 0.5 * (x1 + x2), 0.5 * (y1 + y2), (x2 - x1) * ratio, (y2 - y1) * ratio
        left, top, right, bottom = (int(v) for v in (cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h))
        left, top = max(left, 0), max(top, 0)
        right, bottom = min(right, image.shape[1]), min(bottom, image.shape[0])
        m = b.float()[None, top:bottom, left:right]
        region = (img[:, top:bottom, left:right] * m + (1 - m) * fill - mean) / std
        crops.append(F.interpolate(region[None], size=(size, size), mode="bicubic")[0].permute(1, 2, 0).numpy())
        masks.append(F.interpolate(m[None], size=(size, size), mode="nearest")[0, 0].numpy())
    return crops, masks, valid


@pytest.mark.slow
@pytest.mark.parametrize("ratio", [1.0, 1.3])
def test_masked_crops_match_reference(ratio):
    rs = np.random.RandomState(2)
    h, w = 37, 53
    image = (rs.rand(h, w, 3) * 255).astype(np.float32)
    probs = rs.rand(6, h, w).astype(np.float32) * 0.3
    probs[0, 5:9, 10:30] = 0.9  # a box inside the image
    probs[1] = 0.9  # whole image
    probs[3, 0, w - 1] = 0.8  # a single corner pixel: box at the border
    probs[4, 20:, :7] = 0.6
    probs[5] = rs.rand(h, w) * 0.8  # scattered pixels
    # probs[2] stays below the threshold: an invalid proposal
    got = masked_crops(jnp.asarray(image), jnp.asarray(probs), threshold=0.4, size=24, expand_ratio=ratio, chunk=4)
    crops, masks, valid = reference_crops(image, probs, 0.4, 24, ratio)
    np.testing.assert_array_equal(got.valid, valid)
    for q in np.flatnonzero(valid):
        np.testing.assert_allclose(got.images[q], crops[q], atol=TOL, err_msg=f"proposal {q}")
        np.testing.assert_array_equal(got.region_masks[q], masks[q])


def test_masked_crops_reject_mismatched_shapes():
    with pytest.raises(ValueError, match=r"mask_probs must be \[Q, H, W\]"):
        masked_crops(jnp.zeros((8, 8, 3)), jnp.zeros((2, 8, 9)), threshold=0.5)
