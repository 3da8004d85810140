"""SAM automatic mask generation against segment_anything's `SamAutomaticMaskGenerator` and its
`utils/amg.py` (imported through tests/sam_reference.py's torchvision stand-in), the box NMS
against a transcription of torchvision's kernel, and `python -m ovseg_jax.amg`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ovseg_jax.sam
from ovseg_jax.inference import amg_utils as ours
from ovseg_jax.inference.amg import AutomaticMaskGenerator
from tests.sam_reference import import_segment_anything, tiny_sam

import_segment_anything()
from segment_anything import SamAutomaticMaskGenerator  # noqa: E402
from segment_anything.utils import amg as ref  # noqa: E402

# ----------------------------------------------------------------------------------------------
# Utilities


@pytest.mark.parametrize("n_per_side, n_layers, scale", [(1, 0, 1), (7, 2, 2), (32, 1, 1), (30, 3, 3)])
def test_point_grids_equal_reference(n_per_side, n_layers, scale):
    got = ours.build_all_layer_point_grids(n_per_side, n_layers, scale)
    want = ref.build_all_layer_point_grids(n_per_side, n_layers, scale)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("size, n_layers, overlap", [((480, 640), 0, 512 / 1500), ((480, 640), 2, 512 / 1500),
                                                     ((333, 517), 3, 0.2), ((100, 60), 1, 0.5)])
def test_crop_boxes_equal_reference(size, n_layers, overlap):
    assert ours.generate_crop_boxes(size, n_layers, overlap) == ref.generate_crop_boxes(size, n_layers, overlap)


def test_stability_score_equals_reference():
    rs = np.random.RandomState(0)
    logits = (rs.randn(6, 37, 41) * 3).astype(np.float32)
    logits[0] = -5  # an empty mask: 0 / 0
    got = np.asarray(ours.calculate_stability_score(logits, 0.0, 1.0))
    want = ref.calculate_stability_score(torch.from_numpy(logits), 0.0, 1.0).numpy()
    np.testing.assert_array_equal(got, want)


def test_mask_boxes_equal_reference():
    rs = np.random.RandomState(1)
    masks = np.zeros((2, 5, 23, 31), bool)
    for i, j in np.ndindex(2, 5):
        y0, x0 = rs.randint(0, 23), rs.randint(0, 31)
        masks[i, j, y0:y0 + rs.randint(1, 9), x0:x0 + rs.randint(1, 9)] = rs.rand() > 0.2
    masks[1, 4, 3, 7] = True  # one pixel
    want = ref.batched_mask_to_box(torch.from_numpy(masks)).numpy()
    np.testing.assert_array_equal(np.asarray(ours.batched_mask_to_box(masks)), want)
    np.testing.assert_array_equal(ours.masks_to_boxes_np(masks.reshape(10, 23, 31)), want.reshape(10, 4))


def test_near_crop_edge_equals_reference():
    rs = np.random.RandomState(2)
    crop_box, orig_box = [40, 30, 140, 110], [0, 0, 140, 200]
    top_left = rs.randint(0, 80, (64, 2))  # the crop's frame: 100 x 80
    boxes = np.concatenate([top_left, np.minimum(top_left + rs.randint(0, 40, (64, 2)), [99, 79])], axis=1)
    want = ref.is_box_near_crop_edge(torch.from_numpy(boxes), crop_box, orig_box).numpy()
    np.testing.assert_array_equal(np.asarray(ours.is_box_near_crop_edge(boxes, crop_box, orig_box)), want)
    assert 0 < want.sum() < len(want)


def test_uncrop_equals_reference():
    rs = np.random.RandomState(3)
    crop_box = [5, 7, 25, 19]
    boxes, points = rs.randint(0, 12, (4, 4)), rs.rand(4, 2) * 12
    masks = rs.rand(3, 12, 20) > 0.5
    np.testing.assert_array_equal(ours.uncrop_boxes_xyxy(boxes, crop_box),
                                  ref.uncrop_boxes_xyxy(torch.from_numpy(boxes), crop_box).numpy())
    np.testing.assert_array_equal(ours.uncrop_points(points, crop_box),
                                  ref.uncrop_points(torch.from_numpy(points), crop_box).numpy())
    np.testing.assert_array_equal(ours.uncrop_masks(masks, crop_box, 30, 40),
                                  ref.uncrop_masks(torch.from_numpy(masks), crop_box, 30, 40).numpy())


def _random_masks(rs, n, h, w):
    masks = rs.rand(n, h, w) > 0.6
    masks[0], masks[1] = False, True  # empty, full
    masks[2, 0, 0] = True
    return masks


def test_rle_equals_reference_and_round_trips():
    rs = np.random.RandomState(4)
    masks = _random_masks(rs, 6, 9, 13)
    got = ours.mask_to_rle(masks)
    assert got == ref.mask_to_rle_pytorch(torch.from_numpy(masks))
    for mask, rle in zip(masks, got):
        np.testing.assert_array_equal(ours.rle_to_mask(rle), mask)
        np.testing.assert_array_equal(ref.rle_to_mask(rle), mask)
        assert ours.area_from_rle(rle) == mask.sum()


def test_coco_encoding_equals_pycocotools():
    mask_utils = pytest.importorskip("pycocotools.mask")
    rs = np.random.RandomState(5)
    masks = _random_masks(rs, 5, 40, 37)
    masks[3] = False
    masks[3, 10:30, 5:30] = True  # long runs: multi-character counts, negative differences
    for rle in ours.mask_to_rle(masks):
        want = mask_utils.frPyObjects(rle, *rle["size"])
        assert ours.coco_encode(rle) == {"size": want["size"], "counts": want["counts"].decode()}


@pytest.mark.parametrize("mode", ["holes", "islands"])
def test_small_region_removal_equals_reference(mode):
    pytest.importorskip("cv2")
    rs = np.random.RandomState(6)
    for trial in range(6):
        mask = rs.rand(30, 34) > (0.5 if trial % 2 else 0.75)
        got, changed = ours.remove_small_regions(mask, 4 + trial, mode)
        want, want_changed = ref.remove_small_regions(mask, 4 + trial, mode)
        assert changed == want_changed
        np.testing.assert_array_equal(got, want)
    lone = np.zeros((9, 9), bool)
    lone[2, 2] = lone[6, 6:8] = True  # every island small: keep the largest
    np.testing.assert_array_equal(ours.remove_small_regions(lone, 5, mode)[0],
                                  ref.remove_small_regions(lone, 5, mode)[0])


def torchvision_nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """torchvision's CPU `nms` kernel, transcribed: stable sort by decreasing score, float32 IoUs
    compared with the float64 threshold, suppression of later boxes only."""
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))  # Python's sort is stable
    x0, y0, x1, y1 = boxes.astype(np.float32).T
    area = (x1 - x0) * (y1 - y0)
    suppressed, keep = set(), []
    with np.errstate(invalid="ignore", divide="ignore"):
        for rank, i in enumerate(order):
            if i in suppressed:
                continue
            keep.append(i)
            for j in order[rank + 1:]:
                w = max(np.float32(0), min(x1[i], x1[j]) - max(x0[i], x0[j]))
                h = max(np.float32(0), min(y1[i], y1[j]) - max(y0[i], y0[j]))
                inter = np.float32(w * h)
                if float(inter / (area[i] + area[j] - inter)) > threshold:
                    suppressed.add(j)
    return keep


def _nms_case(rs, n):
    """Integer boxes in a small frame (many equal IoUs), tied scores, degenerate boxes."""
    xy = rs.randint(0, 12, (n, 2))
    boxes = np.concatenate([xy, xy + rs.randint(0, 7, (n, 2))], axis=1).astype(np.float32)
    scores = rs.choice([0.5, 0.7, 0.9, 1.0], n).astype(np.float32)
    scores[: n // 2] = rs.rand(n // 2)
    return boxes, scores


@pytest.mark.slow
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.7])
def test_box_nms_equals_torchvision_greedy_nms(threshold):
    rs = np.random.RandomState(7)
    for n in (1, 9, 70):
        boxes, scores = _nms_case(rs, n)
        valid = rs.rand(n) > 0.2
        order, kept = ours.box_nms(boxes, scores, valid, ours.float32_floor(threshold))
        index = np.flatnonzero(valid)
        want = index[torchvision_nms(boxes[index], scores[index], threshold)]
        np.testing.assert_array_equal(np.asarray(order)[: int(kept)], want)


def test_box_nms_threshold_compares_in_float64():
    """IoU 3/10 is 0.30000001 in float32: above a threshold of 0.3 for torchvision (float64)."""
    boxes = np.array([[0, 0, 10, 1], [0, 0, 3, 1]], np.float32)
    _, kept = ours.box_nms(boxes, np.array([1.0, 0.5], np.float32), np.ones(2, bool), ours.float32_floor(0.3))
    assert int(kept) == 1 and torchvision_nms(boxes, np.array([1.0, 0.5]), 0.3) == [0]


# ----------------------------------------------------------------------------------------------
# The generator against SamAutomaticMaskGenerator

PHOTO = Path(__file__).parent / "assets" / "chelsea_150x100.png"  # scikit-image's chelsea.png (CC0), downscaled
RECORD_KEYS = {"segmentation", "area", "bbox", "predicted_iou", "point_coords", "stability_score", "crop_box"}
# Thresholds low enough for a random SAM to give ten or more masks (defaults: 0.88, 0.95, 0.7, 0.7).
LOW_THRESHOLDS = dict(pred_iou_thresh=0.5, stability_score_thresh=0.3, box_nms_thresh=0.9)


def photo() -> np.ndarray:
    return np.asarray(Image.open(PHOTO).convert("RGB"))


def smooth_noise(height: int = 100, width: int = 150) -> np.ndarray:
    small = np.random.RandomState(0).randint(0, 256, (6, 8, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(segment_anything Sam, its checkpoint, ovseg_jax.sam.SamModel loaded from it). The random
    model's masks are sharpened so that they vary between point prompts: the hypernetwork outputs
    scaled x8, the mask upscaling's transposed convs given one kernel tap for all four output
    phases (random taps make a checkerboard that covers every mask's whole box)."""
    reference = tiny_sam(image_size=128, patch_size=16, embed_dim=32, depth=4, num_heads=2, global_attn_indexes=(1,),
                         window_size=4, prompt_embed_dim=32, mask_in_chans=8, decoder_heads=8, decoder_mlp_dim=64,
                         seed=1)
    with torch.no_grad():
        for mlp in reference.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(8.0)
        for conv in (reference.mask_decoder.output_upscaling[0], reference.mask_decoder.output_upscaling[3]):
            conv.weight.copy_(conv.weight[..., :1, :1].expand_as(conv.weight))
    path = tmp_path_factory.mktemp("sam_amg") / "sam_tiny.pth"
    torch.save(reference.state_dict(), path)
    return reference, path, ovseg_jax.sam.load(path)


def as_mask(segmentation) -> np.ndarray:
    if isinstance(segmentation, np.ndarray):
        return segmentation
    if isinstance(segmentation["counts"], str):
        from pycocotools import mask as mask_utils

        return mask_utils.decode({"size": segmentation["size"], "counts": segmentation["counts"].encode()}).astype(bool)
    return ref.rle_to_mask(segmentation)


def assert_same_records(got: list[dict], want: list[dict], min_count: int) -> None:
    """Same number of records in the same order, each with its mask (IoU >= 0.99), scores within
    1e-4 and the integer/point fields equal (the reference's bbox/crop_box turn float when some
    batch found nothing; values are compared)."""
    assert len(want) >= min_count
    assert len(got) == len(want)
    masks_got, masks_want = [as_mask(r["segmentation"]) for r in got], [as_mask(r["segmentation"]) for r in want]
    inter = np.array([[np.sum(a & b) for b in masks_want] for a in masks_got])
    union = np.array([[np.sum(a | b) for b in masks_want] for a in masks_got])
    iou = inter / np.maximum(union, 1)
    np.testing.assert_array_equal(iou.argmax(1), np.arange(len(want)))  # each mask's match is its rank
    for i, (g, w) in enumerate(zip(got, want)):
        assert set(g) == RECORD_KEYS
        assert iou[i, i] >= 0.99
        assert g["area"] == w["area"] and g["bbox"] == w["bbox"] and g["crop_box"] == w["crop_box"]
        assert g["point_coords"] == w["point_coords"]
        assert abs(g["predicted_iou"] - w["predicted_iou"]) < 1e-4
        assert abs(g["stability_score"] - w["stability_score"]) < 1e-4


def run_both(models, image, **options):
    reference, _, sam = models
    want = SamAutomaticMaskGenerator(reference, **options).generate(image)
    got = AutomaticMaskGenerator(sam, **options).generate(image)
    return got, want


@pytest.mark.slow
def test_generator_equals_reference_on_a_photo(models):
    got, want = run_both(models, photo(), points_per_batch=50, points_per_side=24, **LOW_THRESHOLDS)  # 26 in the last
    assert_same_records(got, want, min_count=12)
    assert all(r["segmentation"].dtype == bool and r["segmentation"].shape == (100, 150) for r in got)


@pytest.mark.slow
def test_generator_equals_reference_coco_rle(models):
    pytest.importorskip("pycocotools")
    got, want = run_both(models, smooth_noise(), points_per_side=24, points_per_batch=50, output_mode="coco_rle",
                         **LOW_THRESHOLDS)
    assert_same_records(got, want, min_count=6)
    assert [r["segmentation"] for r in got] == [r["segmentation"] for r in want]


@pytest.mark.slow
def test_generator_equals_reference_with_crops_and_small_regions(models):
    pytest.importorskip("cv2")  # the reference's small-region removal
    got, want = run_both(models, photo(), points_per_side=16, points_per_batch=128, crop_n_layers=1,
                         crop_nms_thresh=0.9, min_mask_region_area=20, output_mode="uncompressed_rle", **LOW_THRESHOLDS)
    assert_same_records(got, want, min_count=12)
    assert len({tuple(r["crop_box"]) for r in want}) >= 3  # masks from the image and from crops


def test_generator_without_masks_returns_no_records(models):
    """When nothing passes the filters (the reference then fails in its cross-crop NMS)."""
    image = photo()
    generator = AutomaticMaskGenerator(models[2], points_per_side=16, points_per_batch=128, crop_n_layers=1,
                                       min_mask_region_area=20, pred_iou_thresh=1e3)
    assert generator.generate(image) == []


def test_generator_refuses_bad_arguments(models):
    sam = models[2]
    with pytest.raises(ValueError, match="exactly one of points_per_side and point_grids"):
        AutomaticMaskGenerator(sam, points_per_side=None)
    with pytest.raises(ValueError, match="output_mode"):
        AutomaticMaskGenerator(sam, output_mode="png")
    with pytest.raises(ValueError, match="uint8"):
        AutomaticMaskGenerator(sam).generate(np.zeros((20, 30, 3), np.float32))


# ----------------------------------------------------------------------------------------------
# The command

# segment_anything's scripts/amg.py writes this header (and one row per mask) into metadata.csv.
REFERENCE_HEADER = ("id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,predicted_iou,"
                    "stability_score,crop_box_x0,crop_box_y0,crop_box_w,crop_box_h")
CLI_SETTINGS = ["--points-per-side", "24", "--points-per-batch", "50", "--pred-iou-thresh", "0.5",
                "--stability-score-thresh", "0.3", "--box-nms-thresh", "0.9"]
GENERATOR_SETTINGS = dict(points_per_side=24, points_per_batch=50, **LOW_THRESHOLDS)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Two images (cat.png, noise.png) and a text file that is no image."""
    folder = tmp_path_factory.mktemp("amg_inputs")
    Image.fromarray(photo()).save(folder / "cat.png")
    Image.fromarray(smooth_noise()).save(folder / "noise.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def run_cli(*args: str) -> int:
    from ovseg_jax import amg as amg_cli

    return amg_cli.main([str(a) for a in args])


@pytest.mark.slow
def test_cli_writes_mask_folders_as_the_reference(models, image_folder, tmp_path, capsys):
    _, checkpoint, sam = models
    assert run_cli("--checkpoint", checkpoint, "--input", image_folder, "--output", tmp_path, *CLI_SETTINGS) == 0
    assert "Could not load" in capsys.readouterr().err  # notes.txt is skipped
    generator = AutomaticMaskGenerator(sam, **GENERATOR_SETTINGS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat", "noise"]
    for stem, image in (("cat", photo()), ("noise", smooth_noise())):
        records = generator.generate(image)
        folder = tmp_path / stem
        assert sorted(p.name for p in folder.iterdir()) == sorted([f"{i}.png" for i in range(len(records))]
                                                                  + ["metadata.csv"])
        lines = (folder / "metadata.csv").read_text().split("\n")
        assert lines[0] == REFERENCE_HEADER and len(lines) == len(records) + 1
        for i, (record, line) in enumerate(zip(records, lines[1:])):
            png = Image.open(folder / f"{i}.png")
            assert png.mode == "L"
            np.testing.assert_array_equal(np.asarray(png), record["segmentation"] * 255)
            expected = [i, record["area"], *record["bbox"], *record["point_coords"][0], record["predicted_iou"],
                        record["stability_score"], *record["crop_box"]]
            assert line.split(",") == [str(v) for v in expected]


@pytest.mark.slow
def test_cli_writes_coco_rle_json(models, image_folder, tmp_path):
    mask_utils = pytest.importorskip("pycocotools.mask")
    _, checkpoint, sam = models
    assert run_cli("--checkpoint", checkpoint, "--input", image_folder / "cat.png", "--output", tmp_path,
                   "--convert-to-rle", *CLI_SETTINGS) == 0
    records = json.loads((tmp_path / "cat.json").read_text())
    want = AutomaticMaskGenerator(sam, **GENERATOR_SETTINGS).generate(photo())
    assert len(records) == len(want) > 0
    for record, expected in zip(records, want):
        assert set(record) == RECORD_KEYS
        assert record["segmentation"]["size"] == [100, 150] and isinstance(record["segmentation"]["counts"], str)
        rle = {"size": record["segmentation"]["size"], "counts": record["segmentation"]["counts"].encode()}
        np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), expected["segmentation"])
        assert {k: record[k] for k in RECORD_KEYS - {"segmentation", "point_coords"}} == \
            {k: expected[k] for k in RECORD_KEYS - {"segmentation", "point_coords"}}
        assert record["point_coords"] == expected["point_coords"]


def test_cli_refuses_bad_inputs_in_one_line(models, image_folder, tmp_path, capsys):
    _, checkpoint, _ = models
    not_sam = tmp_path / "not_sam.pth"
    torch.save({"visual.conv1.weight": torch.zeros(2, 3, 4, 4)}, not_sam)
    (tmp_path / "taken" / "cat").mkdir(parents=True)
    cases = [
        (["--checkpoint", tmp_path / "missing.pth", "--input", image_folder], "missing.pth"),
        (["--checkpoint", checkpoint, "--input", tmp_path / "nowhere"], "nowhere"),
        (["--checkpoint", not_sam, "--input", image_folder], "not a SAM checkpoint"),
        (["--checkpoint", checkpoint, "--input", image_folder, "--model-type", "vit_b"], "is not vit_b"),
        (["--checkpoint", checkpoint, "--input", image_folder / "cat.png", "--output", tmp_path / "taken"],
         "already exists"),
        (["--checkpoint", checkpoint, "--input", image_folder, "--points-per-side", "2", "--crop-n-layers", "2",
          "--crop-n-points-downscale-factor", "2"], "no points"),
    ]
    for args, message in cases:
        args = args if "--output" in args else [*args, "--output", tmp_path / "out"]
        assert run_cli(*args) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_cli_unreadable_image_is_skipped_with_exit_status_1(models, image_folder, tmp_path, capsys):
    _, checkpoint, _ = models
    assert run_cli("--checkpoint", checkpoint, "--input", image_folder / "notes.txt", "--output", tmp_path) == 1
    assert "Could not load" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_dtype_reaches_the_loader(models, image_folder, tmp_path, monkeypatch):
    import jax.numpy as jnp

    asked = {}

    def fake_load(path, dtype=jnp.float32, **kwargs):
        asked["dtype"] = dtype
        raise ovseg_jax.sam.CheckpointError(f"{path}: stop here")

    monkeypatch.setattr(ovseg_jax.sam, "load", fake_load)
    assert run_cli("--checkpoint", models[1], "--input", image_folder, "--output", tmp_path, "--dtype", "bfloat16") == 2
    assert asked["dtype"] == jnp.bfloat16
