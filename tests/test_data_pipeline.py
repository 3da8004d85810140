"""grain loaders: determinism, per-process slices, resumable state, workers; masked-crop pairs."""

import json

import numpy as np
import pytest
from PIL import Image

from ovseg_jax.data import crops, pipeline, registry, synthetic
from ovseg_jax.inference.masked_crops import CLIP_MEAN, CLIP_STD


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("world"), num_train=20, num_val=6, image_size=40, seed=1)


def _seg(world, **kwargs):
    source = registry.get("synthetic").make_source(world, "train")
    args = dict(batch_size=4, crop_size=32, max_masks=6, scales=(32, 48), process_index=0, process_count=1)
    return pipeline.segmentation_loader(source, **{**args, **kwargs})


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _equal(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_segmentation_batches_are_deterministic(world):
    a, b, c = _take(_seg(world, seed=3), 3), _take(_seg(world, seed=3), 3), _take(_seg(world, seed=4), 3)
    assert all(_equal(x, y) for x, y in zip(a, b))
    assert not _equal(a[0], c[0])
    batch = a[0]
    assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int32 and batch["masks"].shape == (4, 6, 32, 32)
    assert batch["classes"].dtype == np.int32 and batch["valid"].dtype == bool
    for b in range(4):  # the masks (added after the workers) are the label's classes
        for g in range(6):
            expected = (batch["label"][b] == batch["classes"][b, g]) & batch["valid"][b, g]
            assert np.array_equal(batch["masks"][b, g], expected.astype(np.uint8))


def test_processes_take_interleaved_slices_of_the_global_stream(world):
    whole = _take(_seg(world, batch_size=4, process_index=0, process_count=1), 6)  # crosses an epoch
    parts = [_take(_seg(world, batch_size=4, process_index=p, process_count=2), 6) for p in range(2)]
    for step in range(6):
        for key in whole[step]:
            merged = np.empty_like(whole[step][key])
            merged[0::2], merged[1::2] = parts[0][step][key], parts[1][step][key]
            assert np.array_equal(merged, whole[step][key]), (step, key)
    with pytest.raises(ValueError, match="not divisible"):
        _seg(world, batch_size=3, process_index=0, process_count=2)


def test_state_round_trips_through_json(world):
    it = iter(_seg(world))
    for _ in range(2):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(2)]
    resumed = iter(_seg(world))
    resumed.set_state(state)
    assert all(_equal(x, next(resumed)) for x in expected)


def test_state_round_trips_through_orbax(world, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    it = iter(_seg(world))
    next(it)
    manager = ocp.CheckpointManager(tmp_path / "ckpt", options=ocp.CheckpointManagerOptions(create=True))
    manager.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    expected = next(it)
    resumed = iter(_seg(world))
    manager.restore(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    assert _equal(expected, next(resumed))
    manager.close()


@pytest.mark.slow
def test_workers_give_the_same_batches(world):
    plain = _take(_seg(world), 3)
    it = iter(_seg(world, num_workers=1))
    try:
        assert all(_equal(x, next(it)) for x in plain)
    finally:
        it.close()


def test_eval_loader_examples(world):
    source = registry.get("synthetic").make_source(world, "val")
    examples = [list(pipeline.eval_loader(source, short=48, bucket=32, process_index=p, process_count=2))
                for p in range(2)]
    assert [int(e["index"]) for e in examples[0]] == [0, 2, 4]
    assert [int(e["index"]) for e in examples[1]] == [1, 3, 5]
    e = examples[1][0]
    assert e["image"].shape == (64, 64, 3) and e["resized_size"].tolist() == [48, 48]
    assert e["orig_size"].tolist() == [40, 40] and np.array_equal(e["label"], source[1]["label"])


# --- masked-crop pairs ---

def _to_compressed(counts):
    """Independent port of pycocotools' rleToString."""
    out = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if c & 0x10 else (x != 0)
            out.append(chr((c | 0x20 if more else c) + 48))
    return "".join(out)


def test_rle_round_trips_and_reads_compressed_strings():
    rng = np.random.default_rng(0)
    for shape in ((7, 5), (30, 41)):
        mask = rng.random(shape) < 0.3
        mask[0, 0] = True
        rle = crops.rle_encode(mask)
        assert np.array_equal(crops.rle_decode(rle), mask)
        compressed = {"size": rle["size"], "counts": _to_compressed(rle["counts"])}
        assert np.array_equal(crops.rle_decode(compressed), mask)
    with pytest.raises(crops.BadExampleError, match="counts sum to 3, expected H\\*W = 4"):
        crops.rle_decode({"size": [2, 2], "counts": [1, 2]})


def test_pair_crop_carries_the_region_mask_exactly(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    mask = np.zeros((30, 40), bool)
    mask[5:20, 8:33] = rng.random((15, 25)) < 0.7
    mask[5, 8] = mask[19, 32] = True  # box rows 5..19, cols 8..32
    Image.fromarray(image).save(tmp_path / "img.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    record = crops.PairRecord(str(tmp_path / "img.png"), str(tmp_path / "mask.png"), "thing")
    out = crops.pair_example(record, np.random.default_rng(7), size=24)
    # independent reference: the same RandomResizedCrop window (same generator) via PIL
    top, left, ch, cw = crops.random_resized_crop_box(np.random.default_rng(7), 15, 25)
    assert 0.9 * 15 * 25 * 0.85 <= ch * cw <= 15 * 25 and 3 / 4 * 0.8 <= cw / ch <= 4 / 3 * 1.2
    box_image, box_mask = image[5:20, 8:33], mask[5:20, 8:33]
    filled = np.where(box_mask[..., None], box_image, np.array([123, 117, 104], np.uint8))
    window = np.s_[top:top + ch, left:left + cw]
    expected = np.asarray(Image.fromarray(filled[window]).resize((24, 24), Image.BICUBIC), np.float32)
    expected = (expected / 255 - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    expected_mask = np.asarray(Image.fromarray(box_mask[window].astype(np.uint8)).resize((24, 24), Image.NEAREST))
    np.testing.assert_allclose(out["image"], expected, atol=1e-6)
    assert np.array_equal(out["region_mask"], expected_mask.astype(np.float32)) and out["text"] == "thing"


def test_released_csv_crops_recover_the_mask_before_resampling(tmp_path):
    crop = np.zeros((16, 16, 3), np.uint8)
    crop[:] = (124, 116, 103)  # the fill colour of the released crops
    crop[4:12, 3:9] = (200, 10, 30)
    Image.fromarray(crop).save(tmp_path / "c.png")
    (tmp_path / "pairs.csv").write_text("filepath\ttitle\nc.png\ta photo of a dog\n")
    (record,) = crops.read_pairs(tmp_path / "pairs.csv")
    assert record.text == "a photo of a dog" and record.mask is None
    _, region = crops.region_of(record)
    assert np.array_equal(region, np.all(crop == (200, 10, 30), axis=-1))
    (tmp_path / "bad.csv").write_text("path,caption\nc.png,x\n")
    with pytest.raises(ValueError, match="expected tab-separated columns 'filepath' and 'title'"):
        crops.read_pairs(tmp_path / "bad.csv")


def test_clip_pairs_and_caption_loaders(world):
    tokenizer = world / "tokenizer"
    kwargs = dict(batch_size=4, image_size=24, process_index=0, process_count=1)
    batch = _take(pipeline.clip_pairs_loader(world / "pairs.jsonl", tokenizer, **kwargs), 1)[0]
    assert batch["image"].shape == (4, 24, 24, 3) and batch["image"].dtype == np.float32
    assert batch["region_mask"].shape == (4, 24, 24) and set(np.unique(batch["region_mask"])) <= {0.0, 1.0}
    assert batch["token_ids"].shape == (4, 77) and batch["token_ids"].dtype == np.int32
    no_mask = _take(pipeline.clip_pairs_loader(world / "pairs.jsonl", tokenizer, region_mask=False, **kwargs), 1)[0]
    assert set(no_mask) == {"image", "token_ids"}
    captions = _take(pipeline.caption_loader(world / "captions.jsonl", tokenizer, **kwargs), 1)[0]
    assert set(captions) == {"image", "token_ids"} and captions["image"].shape == (4, 24, 24, 3)
    from ovseg_jax.text import Tokenizer

    rows = [json.loads(line) for line in (world / "captions.jsonl").read_text().splitlines()]
    all_ids = Tokenizer.from_dir(tokenizer)([r["caption"] for r in rows])
    assert all(any(np.array_equal(t, r) for r in all_ids) for t in captions["token_ids"])
    with pytest.raises(crops.DatasetLayoutError, match="pairs file not found"):
        pipeline.clip_pairs_loader(world / "nope.jsonl", tokenizer, **kwargs)


def test_binary_captions_file_is_refused_with_its_name(tmp_path):
    (tmp_path / "captions.jsonl").write_bytes(b'{"image": "a.png", "caption": "x"}\n\xff\xfe\x00\x81 binary')
    with pytest.raises(ValueError, match=r"captions.jsonl: not a text file \('utf-8' codec can't decode byte 0xff"):
        pipeline.read_captions(tmp_path / "captions.jsonl")
