"""TFDS sources (`ovseg_jax.data.tfds`) on TFDS's own mock data and on prepared ArrayRecord files.

TensorFlow is not installed here, and nothing below imports it:
- `tfds.testing.mock_data` builds the datasets from their TFDS builder code and draws random
  examples. For data sources it does not forward its generator's options, so every image feature
  gets its own random size (image 27x13, annotation 43x33) and values up to 254 in each channel;
  `_consistent_mock` passes TFDS's own `constant_dynamic_shape` (all 10x10) and `max_value=101`
  (valid scene_parse150 categories). TFDS's `coco` builder names `tf.int64` in its features, which
  imports TensorFlow; `_coco_without_tf` gives it numpy's int64, the dtype TFDS maps it to.
- `_prepare` writes a prepared dataset with TFDS's own serializer, ArrayRecord writer and
  DatasetInfo (images given as encoded bytes, which TFDS stores without TensorFlow), so the read
  path of real prepared data runs too: the files route, image decoding, text as bytes.
"""

import functools
import io
import pickle
import sys
import types
from unittest import mock

import numpy as np
import pytest
from PIL import Image

import tensorflow_datasets as tfds
from tensorflow_datasets.core import file_adapters, naming
from tensorflow_datasets.core import splits as splits_lib
from tensorflow_datasets.object_detection import coco
from tensorflow_datasets.testing import mocking

from ovseg_jax.data import pipeline, registry
from ovseg_jax.data.sources import BadExampleError, DatasetLayoutError
from ovseg_jax.data.tfds import INSTANCE_TO_ADE150, TfdsCaptionSource, TfdsSegmentationSource


def _coco_without_tf():
    return mock.patch.object(coco, "tf", types.SimpleNamespace(int64=np.int64))


def _consistent_mock(num_examples):
    generator = functools.partial(mocking.RandomFakeGenerator, constant_dynamic_shape=True, max_value=101)
    stack = mock.patch.object(mocking, "RandomFakeGenerator", generator)
    return stack, tfds.testing.mock_data(num_examples=num_examples)


def _a150_rule(annotation):
    """Reference 5's A-150 rule (raw - 1, 0 -> 255) on the raw ADE-150 id (1-based) of each pixel's
    instance category, written per pixel."""
    out = np.empty(annotation.shape[:2], np.int64)
    for (y, x), category in np.ndenumerate(annotation[..., 0]):
        raw = 0 if category == 0 else int(INSTANCE_TO_ADE150[category - 1]) + 1
        out[y, x] = 255 if raw == 0 else raw - 1
    return out


@pytest.fixture(scope="module")
def mocked():
    """Sources opened inside one consistent mock (they keep reading its examples after it closes)."""
    patch, mock_ctx = _consistent_mock(num_examples=3)
    with patch, mock_ctx, _coco_without_tf():
        seg = TfdsSegmentationSource("scene_parse150", "val", data_dir="/nonexistent")
        raw = [tfds.data_source("scene_parse150", split="test")[i] for i in range(3)]
        spec_source = registry.get("tfds:scene_parse150").make_source("/nonexistent", "train")
        captions = TfdsCaptionSource("val", data_dir="/nonexistent")
    return types.SimpleNamespace(seg=seg, raw=raw, spec_source=spec_source, captions=captions)


def test_segmentation_examples_follow_the_a150_rule_on_the_mock(mocked):
    assert len(mocked.seg) == 3 and mocked.seg.ignore_value == 255
    assert mocked.seg.class_names == registry.class_names("ade20k_150")
    for i, raw in enumerate(mocked.raw):  # the mock's examples are a function of the index
        example = mocked.seg[i]
        assert set(example) == {"image", "label"}
        assert example["image"].dtype == np.uint8 and example["image"].shape == (10, 10, 3)
        assert example["label"].dtype == np.int32 and example["label"].shape == (10, 10)
        assert np.array_equal(example["image"], raw["image"])
        assert np.array_equal(example["label"], _a150_rule(raw["annotation"]))
    labels = np.concatenate([mocked.seg[i]["label"].ravel() for i in range(3)])
    assert (labels == 255).any() and (labels != 255).any()  # both branches of the rule were met


def test_registry_selects_the_tfds_source_and_keeps_the_folder_layout(mocked, tmp_path):
    spec = registry.get("tfds:scene_parse150")
    assert isinstance(mocked.spec_source, TfdsSegmentationSource) and mocked.spec_source.split == "train"
    assert spec.splits == ("train", "val") and spec.ignore_value == 255 and spec.ensemble_weight == 0.7
    with pytest.raises(DatasetLayoutError, match="ADEChallengeData2016/images/validation"):
        registry.get("ade20k_150").make_source(tmp_path, "val")  # still the detectron2 folders


def test_instance_categories_map_to_the_ade150_thing_classes():
    names = registry.class_names("ade20k_150")
    assert len(INSTANCE_TO_ADE150) == 100 and np.all(np.diff(INSTANCE_TO_ADE150) > 0)
    # instanceInfo100's names (Places Challenge 2017) against detectron2's ADE-150 names
    spot = {1: "bed", 2: "window", 4: "person", 9: "car", 20: "tub", 35: "screen door, screen", 58: "tv",
            85: "screen", 92: "trash can", 95: "monitor", 100: "flag"}
    assert {k: names[INSTANCE_TO_ADE150[k - 1]] for k in spot} == spot
    for stuff in ("wall", "floor", "sky", "tree", "plant", "crt screen"):  # not among the 100
        assert names.index(stuff) not in INSTANCE_TO_ADE150


def test_loaders_run_one_batch_from_the_tfds_source(mocked):
    evaluated = next(iter(pipeline.eval_loader(mocked.seg, short=32, max_size=64, bucket=32, process_index=0,
                                               process_count=1)))
    assert evaluated["image"].shape == (32, 32, 3) and evaluated["image"].dtype == np.uint8
    assert np.array_equal(evaluated["label"], mocked.seg[0]["label"]) and int(evaluated["index"]) == 0
    batch = next(iter(pipeline.segmentation_loader(mocked.seg, batch_size=2, crop_size=16, max_masks=4,
                                                   scales=(16, 20), photometric=False, process_index=0,
                                                   process_count=1)))
    assert batch["image"].shape == (2, 16, 16, 3) and batch["label"].shape == (2, 16, 16)
    assert batch["masks"].shape == (2, 4, 16, 16) and batch["classes"].dtype == np.int32
    assert set(np.unique(batch["label"])) <= set(np.unique(np.concatenate(
        [mocked.seg[i]["label"].ravel() for i in range(3)])))


def test_caption_examples_on_the_mock(mocked):
    assert len(mocked.captions) == 3
    example = mocked.captions[1]
    assert set(example) == {"image", "captions", "id", "filename"}
    assert example["image"].dtype == np.uint8 and example["image"].shape == (10, 10, 3)
    assert example["captions"] and all(type(c) is str for c in example["captions"])
    assert type(example["id"]) is str and example["id"].isdigit() and type(example["filename"]) is str


def test_unequal_image_and_annotation_sizes_are_bad_examples():
    with tfds.testing.mock_data(num_examples=2):  # TFDS's plain mock: independent random sizes
        source = TfdsSegmentationSource("scene_parse150", "val")
        with pytest.raises(BadExampleError, match=r"scene_parse150 1.0.0 split 'test' example 0: annotation size "
                                                  r"\d+x\d+ \(WxH\) differs from the image's"):
            source[0]


# --------------------------------------------------------------------------------------------
# Prepared ArrayRecord files, read without mocks


def _png(array, fmt="PNG"):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def _prepare(builder, split, examples):
    """Write `examples` as a prepared ArrayRecord split with TFDS's serializer, writer and DatasetInfo."""
    fmt = file_adapters.FileFormat.ARRAY_RECORD
    template = naming.ShardedFileTemplate(data_dir=builder.data_path, dataset_name=builder.name, split=split,
                                          filetype_suffix=fmt.file_suffix)
    path = template.sharded_filepath(shard_index=0, num_shards=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    serialize = builder.info.features.serialize_example
    file_adapters.ArrayRecordFileAdapter.write_examples(path, ((i, serialize(e)) for i, e in enumerate(examples)))
    builder.info.set_splits(splits_lib.SplitDict([splits_lib.SplitInfo(
        name=split, shard_lengths=[len(examples)], num_bytes=path.stat().length, filename_template=template)]))
    builder.info.write_to_directory(builder.data_path)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    rng = np.random.default_rng(0)
    annotation = np.zeros((6, 7, 3), np.uint8)
    annotation[..., 0] = [[0, 1, 2, 4, 9, 100, 58]] * 6  # nothing, bed, window, person, car, flag, tv
    annotation[..., 1] = 3  # an instance id: not part of the label
    image = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    builder = tfds.builder("scene_parse150", data_dir=root, file_format="array_record")
    _prepare(builder, "test", [{"image": _png(image), "annotation": _png(annotation)}])
    with _coco_without_tf():
        builder = tfds.builder("coco_captions", data_dir=root, file_format="array_record")
    record = {"image": _png(image), "image/filename": "COCO_val2014_000000000042.jpg", "image/id": 42,
              "objects": {"id": [], "area": [], "bbox": [], "label": [], "is_crowd": []},
              "captions": {"text": ["A cat on a mat.", "Un café près de l'Übergang"], "id": [7, 8]}}
    _prepare(builder, "val", [record])
    return types.SimpleNamespace(root=root, image=image, annotation=annotation)


def test_prepared_scene_parse150_is_read_from_its_files(prepared):
    source = registry.get("tfds:scene_parse150").make_source(prepared.root, "val")
    assert len(source) == 1 and source.split == "test"
    example = source[0]
    assert np.array_equal(example["image"], prepared.image)  # PNG: lossless
    names = [source.class_names[i] if i != 255 else None for i in example["label"][0]]
    assert names == [None, "bed", "window", "person", "car", "flag", "tv"]
    assert np.array_equal(example["label"], _a150_rule(prepared.annotation))
    assert source[-1]["label"].shape == (6, 7)
    copy = pickle.loads(pickle.dumps(source))  # as grain's worker processes receive it
    assert np.array_equal(copy[0]["label"], example["label"])
    with pytest.raises(IndexError):
        source[1]
    assert "tensorflow" not in sys.modules


def test_prepared_coco_captions_decode_text(prepared):
    source = TfdsCaptionSource("val", data_dir=prepared.root)
    example = source[0]
    assert example["captions"] == ["A cat on a mat.", "Un café près de l'Übergang"]
    assert example["id"] == "42" and example["filename"] == "COCO_val2014_000000000042.jpg"
    assert np.array_equal(example["image"], prepared.image)
    assert "tensorflow" not in sys.modules


def test_missing_or_unusable_datasets_say_how_to_prepare(prepared, tmp_path):
    with pytest.raises(DatasetLayoutError, match=rf"scene_parse150 1.0.0 is not prepared as array_record in "
                                                 rf"{tmp_path} \(nothing under .*\n  tfds build scene_parse150 "
                                                 rf"--data_dir={tmp_path} --file_format=array_record"):
        TfdsSegmentationSource("scene_parse150", "val", data_dir=tmp_path)
    with pytest.raises(DatasetLayoutError, match="tfds build coco_captions"):
        TfdsCaptionSource("val", data_dir=tmp_path)  # (its builder code would need TensorFlow)
    tfrecord = tmp_path / "scene_parse150" / "1.0.0"
    tfrecord.mkdir(parents=True)
    (tfrecord / "dataset_info.json").write_text('{"fileFormat": "tfrecord"}')
    with pytest.raises(DatasetLayoutError, match=r"found only .*scene_parse150/1.0.0 \(tfrecord\)"):
        TfdsSegmentationSource("scene_parse150", "val", data_dir=tmp_path)
    with pytest.raises(ValueError, match=r"Unknown split 'nope'"):
        TfdsSegmentationSource("scene_parse150", "nope", data_dir=prepared.root)
    with pytest.raises(ValueError, match=r"'voc' unknown; expected one of \['scene_parse150'\]"):
        TfdsSegmentationSource("voc", "val")


def test_without_tensorflow_datasets_the_error_names_the_extra():
    with mock.patch.dict(sys.modules, {"tensorflow_datasets": None}):
        with pytest.raises(ImportError, match=r"pip install 'ovseg_jax\[tfds\]'"):
            TfdsSegmentationSource("scene_parse150", "val")
