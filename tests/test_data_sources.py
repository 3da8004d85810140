"""Dataset sources in OVSeg's prepared layouts, the registry's class lists, and bad input."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovseg_jax.data import pipeline, registry
from ovseg_jax.data.sources import BadExampleError, DatasetLayoutError

# (name, split, image dir, label dir, label ext) as OVSeg's prepare scripts write them
LAYOUTS = [
    ("coco_stuff_171", "train", "coco/train2017", "coco/stuffthingmaps_detectron2/train2017", ".png"),
    ("coco_stuff_171", "val", "coco/val2017", "coco/stuffthingmaps_detectron2/val2017", ".png"),
    ("ade20k_150", "val", "ADEChallengeData2016/images/validation",
     "ADEChallengeData2016/annotations_detectron2/validation", ".png"),
    ("ade20k_847", "val", "ADE20K_2021_17_01/images_detectron2/validation",
     "ADE20K_2021_17_01/annotations_detectron2/validation", ".tif"),
    ("pascal_context_59", "val", "VOCdevkit/VOC2010/JPEGImages", "VOCdevkit/VOC2010/annotations_detectron2/pc59_val",
     ".png"),
    ("pascal_context_459", "val", "VOCdevkit/VOC2010/JPEGImages",
     "VOCdevkit/VOC2010/annotations_detectron2/pc459_val", ".tif"),
    ("pascal_voc_20", "val", "VOCdevkit/VOC2012/JPEGImages", "VOCdevkit/VOC2012/annotations_detectron2/val", ".png"),
]


def _write_pair(root: Path, image_dir: str, label_dir: str, stem: str, label: np.ndarray, label_ext: str,
                rng: np.random.Generator) -> np.ndarray:
    (root / image_dir).mkdir(parents=True, exist_ok=True)
    (root / label_dir).mkdir(parents=True, exist_ok=True)
    image = rng.integers(0, 256, (*label.shape, 3), dtype=np.uint8)
    Image.fromarray(image).save(root / image_dir / f"{stem}.jpg")
    Image.fromarray(label).save(root / label_dir / f"{stem}{label_ext}")
    return image


@pytest.mark.parametrize("name,split,image_dir,label_dir,label_ext", LAYOUTS)
def test_reads_prepared_layout(tmp_path, name, split, image_dir, label_dir, label_ext):
    spec = registry.get(name)
    rng = np.random.default_rng(0)
    dtype = np.uint16 if label_ext == ".tif" else np.uint8
    labels = {}
    for stem, (h, w) in (("b_img", (21, 30)), ("a_img", (33, 17))):
        label = rng.integers(0, len(spec.class_names), (h, w)).astype(dtype)
        label[0, :3] = spec.ignore_value
        labels[stem] = label
        _write_pair(tmp_path, image_dir, label_dir, stem, label, label_ext, rng)
    if not name.startswith("ade"):  # label-indexed: images without a label (other splits) are not examples
        Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp_path / image_dir / "other.jpg")
    source = spec.make_source(tmp_path, split)
    assert len(source) == 2 and source.ignore_value == spec.ignore_value
    for i, stem in enumerate(["a_img", "b_img"]):  # sorted by file name
        example = source[i]
        expected_image = np.asarray(Image.open(tmp_path / image_dir / f"{stem}.jpg").convert("RGB"))
        assert example["image"].dtype == np.uint8 and np.array_equal(example["image"], expected_image)
        assert example["label"].dtype == np.int32 and np.array_equal(example["label"], labels[stem].astype(np.int32))


def test_class_lists():
    expected = {"coco_stuff_171": 171, "ade20k_150": 150, "ade20k_847": 847, "pascal_context_59": 59,
                "pascal_context_459": 459, "pascal_voc_20": 20}
    for name, n in expected.items():
        names = registry.get(name).class_names
        assert len(names) == n and len(set(names)) == n, name
    coco = registry.get("coco_stuff_171").class_names
    assert coco[0] == "person" and coco[79] == "toothbrush" and coco[80] == "banner" and coco[-1] == "wood"
    assert registry.get("ade20k_150").class_names[6] == "road, route"
    assert registry.get("ade20k_150").class_names[8] == "window"
    assert registry.get("pascal_context_59").class_names[10] == "table"
    assert registry.get("pascal_voc_20").class_names[10] == "diningtable"
    assert registry.get("pascal_context_459").class_names[-1] == "wool"
    assert registry.get("ade20k_150").ensemble_weight == 0.7
    assert registry.get("pascal_voc_20").ensemble_weight == 0.45
    with pytest.raises(KeyError, match="registered"):
        registry.get("coco")


def test_missing_or_empty_dataset_names_expected_layout(tmp_path):
    spec = registry.get("ade20k_150")
    with pytest.raises(DatasetLayoutError, match="(?s)Expected layout.*annotations_detectron2/validation"):
        spec.make_source(tmp_path, "val")
    (tmp_path / "ADEChallengeData2016/images/validation").mkdir(parents=True)
    (tmp_path / "ADEChallengeData2016/annotations_detectron2/validation").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match=r"no \*\.jpg files"):
        spec.make_source(tmp_path, "val")
    with pytest.raises(ValueError, match="split 'test' unknown"):
        spec.make_source(tmp_path, "test")
    with pytest.raises(DatasetLayoutError, match="python -m ovseg_jax.data.synthetic"):
        registry.get("synthetic").make_source(tmp_path, "train")


@pytest.fixture()
def ade_with_bad_files(tmp_path):
    """Six ADE20K-150-layout examples: 2 good, then one of each kind of bad input."""
    image_dir, label_dir = "ADEChallengeData2016/images/training", "ADEChallengeData2016/annotations_detectron2/training"
    rng = np.random.default_rng(1)
    good = np.full((20, 24), 3, np.uint8)
    for stem in ("0_good", "1_good", "2_corrupt", "3_nolabel", "4_size", "5_values"):
        _write_pair(tmp_path, image_dir, label_dir, stem, good, ".png", rng)
    (tmp_path / image_dir / "2_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / label_dir / "3_nolabel.png").unlink()
    Image.fromarray(np.zeros((19, 24), np.uint8)).save(tmp_path / label_dir / "4_size.png")
    Image.fromarray(np.full((20, 24), 200, np.uint8)).save(tmp_path / label_dir / "5_values.png")
    return registry.get("ade20k_150").make_source(tmp_path, "train")


def test_bad_examples_name_the_file(ade_with_bad_files):
    source = ade_with_bad_files
    assert source[0]["label"].max() == 3
    cases = {2: r"2_corrupt\.jpg: cannot decode image", 3: r"3_nolabel\.png: label file not found",
             4: r"4_size\.png: label size 24x19 \(WxH\) differs from image .*4_size\.jpg size 24x20",
             5: r"5_values\.png: label values \[200\] outside 0\.\.149 \(ignore value 255\)"}
    for index, message in cases.items():
        with pytest.raises(BadExampleError, match=message):
            source[index]


@pytest.mark.slow
def test_loader_raises_or_skips_and_counts(ade_with_bad_files):
    kwargs = dict(batch_size=2, crop_size=16, max_masks=4, scales=(20,), shuffle=False, num_epochs=1,
                  process_index=0, process_count=1)
    with pytest.raises(BadExampleError, match="2_corrupt"):
        list(pipeline.segmentation_loader(ade_with_bad_files, **kwargs))
    it = iter(pipeline.segmentation_loader(ade_with_bad_files, skip_bad_examples=True, **kwargs))
    batches = list(it)
    assert len(batches) == 1 and batches[0]["image"].shape == (2, 16, 16, 3)
    assert it.num_skipped == 0  # the four bad ones come after the last good one: nothing follows them
    it = iter(pipeline.segmentation_loader(ade_with_bad_files, skip_bad_examples=True, **{**kwargs, "num_epochs": 2}))
    batches = list(it)
    assert len(batches) == 2 and it.num_skipped == 4  # epoch 1's bad files precede epoch 2's good ones
    assert it.get_state()["num_skipped"] == 4
    it = iter(pipeline.segmentation_loader(ade_with_bad_files, skip_bad_examples=True, num_workers=1,
                                           **{**kwargs, "num_epochs": 2}))
    try:  # the count travels with the examples out of the worker process
        assert len(list(it)) == 2 and it.num_skipped == 4
    finally:
        it.close()
    examples = iter(pipeline.eval_loader(ade_with_bad_files, short=24, bucket=32, skip_bad_examples=True,
                                         process_index=0, process_count=1))
    assert [int(e["index"]) for e in examples] == [0, 1] and examples.num_skipped == 4  # trailing skips counted
