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


def _hsv_formula(rgb):
    """OpenCV's 8-bit RGB -> HSV as float32 formulas evaluated per pixel (the definition the
    lookup tables must reproduce bit for bit)."""
    x = rgb.astype(np.float32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = np.maximum(np.maximum(r, g), b)
    diff = v - np.minimum(np.minimum(r, g), b)
    s = np.where(v > 0, diff * 255.0 / np.maximum(v, 1), 0.0)
    d = np.maximum(diff, 1e-6)
    h = np.where(v == r, 60.0 * (g - b) / d, np.where(v == g, 120.0 + 60.0 * (b - r) / d, 240.0 + 60.0 * (r - g) / d))
    h = np.where(diff == 0, 0.0, np.mod(h, 360.0))
    return np.stack([np.mod(np.rint(h / 2.0), 180.0), np.rint(s), v], -1).astype(np.uint8)


def _rgb_formula(hsv):
    """8-bit HSV -> RGB as float32 formulas per pixel (sector, p, q, t)."""
    h = hsv[..., 0].astype(np.float32) * 2.0 / 60.0
    s = hsv[..., 1].astype(np.float32) / 255.0
    v = hsv[..., 2].astype(np.float32) / 255.0
    sector = np.floor(h)
    f = h - sector
    sector = sector.astype(np.int32) % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    rgb = np.stack([np.choose(sector, (v, q, p, p, t, v)), np.choose(sector, (t, v, v, q, p, p)),
                    np.choose(sector, (p, p, t, v, v, q))], -1)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


@pytest.mark.slow
def test_hsv_lookup_tables_equal_the_per_pixel_formulas_on_every_8bit_value():
    """All 2^24 RGB colours, and all 2^24 byte triples as HSV (H >= 180 included)."""
    codes = np.arange(1 << 24, dtype=np.uint32).reshape(4096, 4096)
    triples = np.stack([(codes >> 16) & 255, (codes >> 8) & 255, codes & 255], -1).astype(np.uint8)
    for rows in np.array_split(np.arange(4096), 4):  # (bounded memory)
        part = triples[rows]
        assert np.array_equal(transforms.rgb_to_hsv(part), _hsv_formula(part))
        assert np.array_equal(transforms.hsv_to_rgb(part), _rgb_formula(part))


def test_training_crop_equals_cropping_the_fully_resized_arrays():
    """The transform crops before leaving PIL and gathers only the crop's label rows: the result is
    the window of `resize_image` / `resize_label` of the whole example, for up- and downscaling."""
    rng = np.random.default_rng(3)
    for h, w, short in [(60, 80, 112), (80, 60, 40), (45, 45, 45), (30, 90, 64)]:
        ex = _example(h, w, seed=h)
        hw = transforms.resized_hw(h, w, short, 4 * short)
        ch, cw = min(48, hw[0]), min(48, hw[1])
        for _ in range(3):
            y0, x0 = int(rng.integers(hw[0] - ch + 1)), int(rng.integers(hw[1] - cw + 1))
            image, label = transforms._resized_crop(ex["image"], ex["label"], hw, (y0, x0, ch, cw))
            window = np.s_[y0:y0 + ch, x0:x0 + cw]
            assert np.array_equal(image, transforms.resize_image(ex["image"], hw)[window])
            assert np.array_equal(label, transforms.resize_label(ex["label"], hw)[window])
            assert label.dtype == np.int32


def test_masks_of_a_batch_equal_each_example_s_mask_targets():
    examples = [_example(24, 32, seed=s, num_classes=9)["label"] for s in range(3)]
    targets = [transforms.mask_targets(label, 5, 255) for label in examples]
    batched = transforms.masks_of(np.stack(examples), np.stack([t["classes"] for t in targets]),
                                  np.stack([t["valid"] for t in targets]))
    assert batched.dtype == np.uint8 and batched.shape == (3, 5, 24, 32)
    assert np.array_equal(batched, np.stack([t["masks"] for t in targets]))
    no_masks = transforms.train_transform(_example(), np.random.default_rng(1), crop_size=32, max_masks=8, masks=False)
    full = transforms.train_transform(_example(), np.random.default_rng(1), crop_size=32, max_masks=8)
    assert set(full) - set(no_masks) == {"masks"} and all(np.array_equal(no_masks[k], full[k]) for k in no_masks)


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
