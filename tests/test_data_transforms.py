"""Segmentation transforms: resize rule, training crop/flip/pad/targets, SSD colour jitter, eval."""

import colorsys

import numpy as np
import pytest
from PIL import Image

from ovseg_jax.data import transforms


def _example(h=40, w=56, seed=0, num_classes=6):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    label = np.repeat(np.repeat(rng.integers(0, num_classes, (h // 8 + 1, w // 8 + 1)), 8, 0), 8, 1)[:h, :w]
    label = label.astype(np.int32)
    label[:3, :3] = 255
    return {"image": image, "label": label}


def test_resize_rule_matches_reference_examples():
    assert transforms.resized_hw(512, 683, 640, 2560) == (640, 854)  # reference 1.1's ADE example
    assert transforms.resized_hw(100, 1000, 640, 2560) == (256, 2560)  # long side capped
    assert transforms.TRAIN_SCALES == (320, 384, 448, 512, 576, 640, 704, 768, 832, 896, 960, 1024, 1088,
                                       1152, 1216, 1280)


def test_train_transform_crop_is_a_window_of_the_resized_image_and_label():
    """Image: PIL bilinear (uint8, as detectron2); label: torch legacy nearest, because MaskFormer's
    mapper reads labels as float64 and detectron2 then resizes them with F.interpolate."""
    import torch
    ex = _example()
    out = transforms.train_transform(ex, np.random.default_rng(5), crop_size=32, scales=(48,), max_masks=8,
                                     photometric=False, flip=False)
    h, w = round(40 * 48 / 40), round(56 * 48 / 40)  # short side 40 -> 48
    image = np.asarray(Image.fromarray(ex["image"]).resize((w, h), Image.BILINEAR))
    label = torch.nn.functional.interpolate(torch.from_numpy(ex["label"].astype(np.float64))[None, None],
                                            size=(h, w), mode="nearest")[0, 0].numpy().astype(np.int32)
    hits = [(y, x) for y in range(h - 32 + 1) for x in range(w - 32 + 1)
            if np.array_equal(image[y:y + 32, x:x + 32], out["image"])]
    assert len(hits) == 1
    y, x = hits[0]
    assert np.array_equal(label[y:y + 32, x:x + 32], out["label"])


def test_train_transform_pads_flips_and_builds_targets():
    ex = _example(20, 28)
    flipped = 0
    for seed in range(6):
        kwargs = dict(crop_size=32, scales=(24,), max_masks=8, photometric=False)
        plain = transforms.train_transform(ex, np.random.default_rng(seed), flip=False, **kwargs)
        out = transforms.train_transform(ex, np.random.default_rng(seed), flip=True, **kwargs)
        # resized to 24 x 34 (< crop 32 on one side): the rest is padding
        assert np.all(out["image"][24:] == 128) and np.all(out["label"][24:] == 255)
        if not np.array_equal(out["image"], plain["image"]):
            flipped += 1
            assert np.array_equal(out["image"][:24, :32], plain["image"][:24, :32][:, ::-1])
        ids = np.unique(out["label"][out["label"] != 255])
        g = len(ids)
        assert out["valid"].tolist() == [True] * g + [False] * (8 - g)
        assert np.array_equal(out["classes"][:g], ids) and np.all(out["classes"][g:] == 0)
        for k in range(g):
            assert np.array_equal(out["masks"][k], (out["label"] == ids[k]).astype(np.uint8))
        assert out["masks"][g:].sum() == 0 and out["masks"].dtype == np.uint8
    assert 0 < flipped < 6


def test_train_transform_is_deterministic_per_generator():
    ex = _example()
    a = transforms.train_transform(ex, np.random.default_rng(7), crop_size=32, scales=(40, 64), max_masks=8)
    b = transforms.train_transform(ex, np.random.default_rng(7), crop_size=32, scales=(40, 64), max_masks=8)
    c = transforms.train_transform(ex, np.random.default_rng(8), crop_size=32, scales=(40, 64), max_masks=8)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["image"], c["image"])


def test_mask_targets_keep_the_largest_classes():
    label = np.array([[0, 0, 0, 1], [2, 2, 1, 255], [3, 0, 2, 255]], np.int32)  # areas 0:4 1:2 2:3 3:1
    out = transforms.mask_targets(label, 2, 255)
    assert out["classes"].tolist() == [0, 2] and out["valid"].tolist() == [True, True]


def _colorsys_hsv(rgb):
    h, s, v = colorsys.rgb_to_hsv(*(rgb / 255.0))
    return np.array([(h * 180.0) % 180.0, s * 255.0, v * 255.0])


def test_hsv_conversions_match_colorsys():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (400, 3), dtype=np.uint8)
    hsv = transforms.rgb_to_hsv(rgb).astype(np.float64)
    ref = np.stack([_colorsys_hsv(p.astype(np.float64)) for p in rgb])
    hue_err = np.abs((hsv[:, 0] - ref[:, 0] + 90) % 180 - 90)
    assert hue_err.max() <= 0.5 + 1e-6 and np.abs(hsv[:, 1:] - ref[:, 1:]).max() <= 0.5 + 1e-6
    hsv8 = rng.integers(0, [180, 256, 256], (400, 3)).astype(np.uint8)
    back = transforms.hsv_to_rgb(hsv8).astype(np.float64)
    ref = np.stack([np.array(colorsys.hsv_to_rgb(h / 180.0, s / 255.0, v / 255.0)) * 255 for h, s, v in
                    hsv8.astype(np.float64)])
    assert np.abs(back - ref).max() <= 0.5 + 1e-6


class _ScriptedRng:
    """Every coin flip says yes; draws come from fixed values (uniform -> `u`, integers(a, b) -> `k`)."""

    def __init__(self, uniforms, k):
        self.uniforms, self.k = list(uniforms), k

    def integers(self, low, high=None):
        return 1 if high is None else self.k

    def uniform(self, low, high):
        return self.uniforms.pop(0)


def test_photometric_distort_follows_ssd_order():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    out = transforms.photometric_distort(image, _ScriptedRng([10.0, 1.2, 0.8], k=5)).astype(np.float64)
    # brightness +10, contrast x1.2 (truncating casts), saturation x0.8, hue +5 (of 180): colorsys reference
    x = np.clip(image.astype(np.float64) + 10.0, 0, 255).astype(np.uint8)
    x = np.clip(x.astype(np.float64) * 1.2, 0, 255).astype(np.uint8).astype(np.float64)
    ref = np.empty_like(x)
    for idx in np.ndindex(x.shape[:2]):
        h, s, v = colorsys.rgb_to_hsv(*(x[idx] / 255.0))
        ref[idx] = np.array(colorsys.hsv_to_rgb((h + 5 / 180.0) % 1.0, s * 0.8, v)) * 255
    assert np.abs(out - ref).max() <= 3.0  # 8-bit HSV rounding twice
    assert np.abs(out - ref).mean() < 1.0


def test_eval_transform_resizes_and_pads_to_buckets():
    ex = _example(50, 70, seed=3)
    out = transforms.eval_transform(ex, short=64, max_size=256, bucket=64)
    h, w = 64, int(70 * 64 / 50 + 0.5)
    assert out["resized_size"].tolist() == [h, w] and out["orig_size"].tolist() == [50, 70]
    assert out["image"].shape == (64, 128, 3)
    expected = np.asarray(Image.fromarray(ex["image"]).resize((w, h), Image.BILINEAR))
    assert np.array_equal(out["image"][:h, :w], expected) and np.all(out["image"][:, w:] == 0)
    assert np.array_equal(out["label"], ex["label"])
    with pytest.raises(ValueError, match="multiple of size_divisibility"):
        transforms.eval_transform(ex, short=64, bucket=48)
