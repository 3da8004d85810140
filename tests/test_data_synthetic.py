"""The synthetic open-vocabulary world: layout, determinism, seen/unseen split, captions, pairs."""

import json

import numpy as np
import pytest
from PIL import Image

from ovseg_jax.data import registry, synthetic

NUM_TRAIN, NUM_VAL, NUM_WEB, SIZE = 24, 16, 600, 48


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("world"), num_train=NUM_TRAIN, num_val=NUM_VAL,
                              num_web=NUM_WEB, image_size=SIZE, seed=3)


def _label(world, split, i):
    return np.asarray(Image.open(world / "annotations" / split / f"{i:06d}.png"))


def _visible(label):
    ids, counts = np.unique(label, return_counts=True)
    return {synthetic.CLASS_NAMES[i] for i, c in zip(ids, counts) if c >= 4}


def test_layout_and_class_split(world):
    for split, n in (("train", NUM_TRAIN), ("val", NUM_VAL)):
        images = sorted((world / "images" / split).glob("*.png"))
        assert len(images) == n
        image = np.asarray(Image.open(images[0]))
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
        label = _label(world, split, 0)
        assert label.shape == (SIZE, SIZE) and label.dtype == np.uint8
    meta = json.loads((world / "classes.json").read_text())
    assert meta["names"] == list(synthetic.CLASS_NAMES)
    assert set(meta["seen"]) | set(meta["unseen"]) == set(meta["names"])
    assert not set(meta["seen"]) & set(meta["unseen"])
    # every colour and every pattern stays seen in some combination
    for word in list(synthetic.COLORS) + list(synthetic.PATTERNS):
        assert any(word in name.split() for name in meta["seen"])
    assert (world / "tokenizer" / "vocab.json").is_file()


def test_deterministic_from_seed(world, tmp_path):
    again = synthetic.generate(tmp_path / "a", num_train=4, num_val=2, num_web=2, image_size=SIZE, seed=3)
    other = synthetic.generate(tmp_path / "b", num_train=4, num_val=2, num_web=2, image_size=SIZE, seed=4)
    for split, i in (("train", 3), ("val", 1)):
        name = f"{i:06d}.png"
        a = np.asarray(Image.open(again / "images" / split / name))
        assert np.array_equal(a, np.asarray(Image.open(world / "images" / split / name)))
        assert np.array_equal(_label(again, split, i), _label(world, split, i))
        assert not np.array_equal(a, np.asarray(Image.open(other / "images" / split / name)))


def test_captions_name_the_visible_classes(world):
    rows = [json.loads(line) for line in (world / "captions.jsonl").read_text().splitlines()]
    assert len(rows) == NUM_TRAIN
    for i, row in enumerate(rows):
        assert row["image"] == f"images/train/{i:06d}.png"
        visible = _visible(_label(world, "train", i))
        text = row["caption"]
        for name in synthetic.CLASS_NAMES:
            mentioned = f" {name} " in f" {text} "
            assert mentioned == (name in visible), (name, text, visible)


def test_web_corpus_names_every_class_in_short_captions(world):
    """CLIP pretraining sees every class name, unseen ones included (as web data does), as
    "a <name>", and no caption is cut by the synthetic CLIP's 24-token context."""
    from ovseg_jax.text import Tokenizer

    rows = [json.loads(line) for line in (world / "web" / "captions.jsonl").read_text().splitlines()]
    assert len(rows) == NUM_WEB
    texts = [f" {row['caption']} " for row in rows]
    for name in synthetic.CLASS_NAMES:
        assert any(f" a {name} " in t for t in texts), name
    tokenizer = Tokenizer.from_dir(world / "tokenizer", context_length=64)
    ids = tokenizer([row["caption"] for row in rows])
    assert int((ids != 0).sum(axis=1).max()) <= 24
    image = np.asarray(Image.open(world / "web" / rows[0]["image"]))
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8


def test_unseen_things_are_new_combinations_of_seen_words():
    for name in synthetic.UNSEEN:
        if name in synthetic.STUFF:
            continue
        pattern, colour = name.split()
        assert sum(n.endswith(" " + colour) for n in synthetic.SEEN) == len(synthetic.PATTERNS) - 1
        assert sum(n.startswith(pattern + " ") for n in synthetic.SEEN) >= 3


def test_pairs_are_seen_classes_with_exact_masks(world):
    rows = [json.loads(line) for line in (world / "pairs.jsonl").read_text().splitlines()]
    unseen = set(synthetic.UNSEEN)
    expected = sum(len(_visible(_label(world, "train", i)) - unseen) for i in range(NUM_TRAIN))
    assert len(rows) == expected
    for row in rows:
        assert row["noun"] not in unseen and row["source"] == "gt"
        label = _label(world, "train", int(row["image"][-10:-4]))
        # independent decode of the uncompressed, column-major COCO RLE
        flat, value = [], 0
        for run in row["mask"]["counts"]:
            flat += [value] * run
            value = 1 - value
        mask = np.array(flat, bool).reshape(row["mask"]["size"][::-1]).T
        assert np.array_equal(mask, label == synthetic.CLASS_NAMES.index(row["noun"]))


def test_train_source_hides_unseen_classes(world):
    spec = registry.get("synthetic")
    train, val = spec.make_source(world, "train"), spec.make_source(world, "val")
    assert train.class_names == synthetic.SEEN and val.class_names == synthetic.CLASS_NAMES
    assert spec.class_names == synthetic.CLASS_NAMES
    saw_unseen_in_val = False
    for i in range(NUM_TRAIN):
        raw, label = _label(world, "train", i), train[i]["label"]
        for cid, name in enumerate(synthetic.CLASS_NAMES):
            expected = synthetic.SEEN.index(name) if name in synthetic.SEEN else 255
            assert np.all(label[raw == cid] == expected)
    for i in range(NUM_VAL):
        saw_unseen_in_val |= bool(_visible(val[i]["label"]) & set(synthetic.UNSEEN))
    assert saw_unseen_in_val


def test_cli(tmp_path, capsys):
    synthetic.main(["--out", str(tmp_path / "w"), "--num-train", "2", "--num-val", "1", "--image-size", "32"])
    assert "wrote 2 train + 1 val" in capsys.readouterr().out
    assert len(list((tmp_path / "w" / "images" / "val").glob("*.png"))) == 1
