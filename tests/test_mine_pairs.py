"""Mining mask-category pairs from captions (ovseg_jax.mine_pairs, ovseg_jax.mining.nouns)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from PIL import Image
from scipy.special import softmax

from ovseg_jax.configs import ConfigError
from ovseg_jax.data import crops, pipeline
from ovseg_jax.mining import miner, nouns
from ovseg_jax.utils.progress import progress as progress_bar

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------- nouns


def _texts(found):
    return [n.text for n in found]


def test_vocabulary_folds_plurals_to_the_vocabulary_spelling():
    extract = nouns.VocabularyNouns({"zebra": "zebra", "wine glass": "wine glass", "man": "person", "tie": "tie",
                                     "clouds": "clouds", "bus": "bus", "sky": "sky"})
    assert _texts(extract("Two zebras near wine glasses")) == ["zebra", "wine glass"]
    assert _texts(extract("Three men wearing ties")) == ["man", "tie"]  # irregular plural; -ies that is not -y
    assert _texts(extract("A cloud over the buses")) == ["clouds", "bus"]  # a singular finds a plural term
    assert [n.cls for n in extract("the MEN, under a sky")] == ["person", "sky"]


def test_vocabulary_prefers_the_longest_phrase_and_names_each_noun_once():
    extract = nouns.VocabularyNouns({"dog": "dog", "hot dog": "hot dog", "striped red": "striped red",
                                     "red": "red", "fire hydrant": "fire hydrant"})
    assert _texts(extract("a dog eats a hot dog next to a dog")) == ["dog", "hot dog"]
    assert _texts(extract("a striped red and a red")) == ["striped red", "red"]
    assert _texts(extract("a Fire-Hydrant")) == ["fire hydrant"]  # hyphens and case


def test_unknown_words_give_no_nouns():
    extract = nouns.VocabularyNouns(nouns.vocabulary("synthetic"))
    assert extract("a scene with nothing known in it") == []
    assert extract("") == []
    assert _texts(extract("a striped blue on a sky and a snow")) == ["striped blue", "sky", "snow"]


def test_coco_vocabulary_maps_caption_words_to_coco_stuff_classes():
    extract = nouns.VocabularyNouns(nouns.coco_vocabulary())
    found = {n.text: n.cls for n in extract("Two men ride bikes past a brick wall and fire hydrants in the sky")}
    assert found == {"man": "person", "bike": "bicycle", "brick wall": "wall-brick", "fire hydrant": "fire hydrant",
                     "sky": "sky-other"}


def test_vocabulary_file(tmp_path):
    path = tmp_path / "v.txt"
    path.write_text("# comment\nperson: man, woman\n\ntraffic light\n")
    assert nouns.read_vocabulary(path) == {"person": "person", "man": "person", "woman": "person",
                                           "traffic light": "traffic light"}
    path.write_text(": man\n")
    with pytest.raises(ValueError, match=r"v.txt:1: class '' has no words"):
        nouns.read_vocabulary(path)
    with pytest.raises(FileNotFoundError, match="missing.txt: noun vocabulary file not found"):
        nouns.read_vocabulary(tmp_path / "missing.txt")


def test_nltk_nouns_join_compounds_and_lemmatise_the_last_word():
    tags = {"two": "CD", "fire": "NN", "hydrants": "NNS", "near": "IN", "dogs": "NNS", "red": "JJ"}
    extract = nouns.NltkNouns(tagger=lambda ws: [(w, tags.get(w, "DT")) for w in ws])
    assert _texts(extract("Two fire hydrants near red dogs")) == ["fire hydrant", "dog"]


def test_nltk_missing_says_how_to_install():
    if importlib.util.find_spec("nltk") is not None:
        pytest.skip("nltk is installed here; the message for a missing nltk cannot be shown")
    with pytest.raises(ImportError, match="pip install nltk"):
        nouns.make_extractor("nltk")


def test_unknown_extractor_is_refused():
    with pytest.raises(ValueError, match="nouns.extractor='spacy'"):
        nouns.make_extractor("spacy")


# ------------------------------------------------------------------------------ choosing pairs


def test_select_pairs_keeps_each_nouns_best_valid_proposal_above_the_score():
    logits = np.array([[30.0, 22.0], [28.0, 29.0], [5.0, 40.0], [50.0, 0.0]])  # [Q=4, N=2]
    valid = np.array([True, True, True, False])  # proposal 3 (the strongest) has no pixel
    picks, best = miner.select_pairs(logits, valid, min_score=0.9)
    p = softmax(logits[:3], axis=1)  # an independent softmax over the nouns
    assert picks == [miner.Pick(0, 0, pytest.approx(p[0, 0])), miner.Pick(1, 2, pytest.approx(p[2, 1]))]
    np.testing.assert_allclose(best, [p[0, 0], p[2, 1]])
    picks, _ = miner.select_pairs(logits, valid, min_score=0.9999)
    assert [q.noun for q in picks] == [1]  # noun 0's best, p[0, 0] = 0.99966, falls below
    cos_picks, _ = miner.select_pairs(logits, valid, score="cosine", min_score=0.35)
    assert cos_picks == [miner.Pick(1, 2, pytest.approx(0.40))]


def test_one_noun_ties_go_to_the_higher_cosine_and_no_valid_proposal_gives_nothing():
    logits = np.array([[20.0], [35.0], [25.0]])
    picks, best = miner.select_pairs(logits, np.ones(3, bool))
    assert picks == [miner.Pick(0, 1, 1.0)]
    picks, best = miner.select_pairs(logits, np.zeros(3, bool))
    assert picks == [] and np.isnan(best).all()


def test_label_agreement_on_a_hand_built_case(tmp_path):
    label = np.array([[0, 0, 1, 1],
                      [0, 0, 1, 1],
                      [2, 2, 255, 255],
                      [2, 2, 255, 255]], np.uint8)
    names = ["sky", "grass", "sand"]
    masks = {"a": (slice(0, 2), slice(0, 3)),  # 4 sky + 2 grass -> sky
             "b": (slice(0, 4), slice(2, 4)),  # 4 grass + 4 ignored -> grass
             "c": (slice(2, 4), slice(2, 4)),  # ignored pixels only -> disagrees
             "d": (slice(2, 4), slice(0, 2))}  # sand
    rows = []
    for key, window in masks.items():
        m = np.zeros((4, 4), bool)
        m[window] = True
        rows.append({"image": "img.png", "mask": crops.rle_encode(m), "noun": {"a": "sky", "b": "grass", "c": "sand",
                                                                               "d": "grass"}[key], "source": "caption"})
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = miner.label_agreement(path, lambda image: label, names)
    assert (result["pairs"], result["agree"], result["fraction"]) == (4, 2, 0.5)
    assert result["per_noun"] == {"grass": {"pairs": 2, "agree": 1}, "sand": {"pairs": 1, "agree": 0},
                                  "sky": {"pairs": 1, "agree": 1}}


def test_config_errors_name_the_field():
    def config(**fields):
        return ml_collections.ConfigDict({"data": {"kind": "jsonl", "path": "c.jsonl"},
                                          "model": {"segmenter": "s.pth", "clip": "c.pt"}, **fields})

    with pytest.raises(ConfigError) as e:
        miner.check_config(config(gt={"min_pixels": "many"}, colour=1))
    assert "config.gt.min_pixels='many': expected int" in str(e.value)
    assert "config.colour: unknown field" in str(e.value)
    with pytest.raises(ConfigError, match=r"config.score='dot': expected one of \('softmax', 'cosine'\)"):
        miner.check_config(config(score="dot"))
    with pytest.raises(ConfigError, match=r"config.sources='both' needs config.gt.dataset"):
        miner.check_config(config(sources="both"))
    assert miner.check_config(config()).min_score == 0.5  # defaults filled in


# ----------------------------------------------------------- mining the quick demo's world


def _synthetic_config(demo_dir: str):
    spec = importlib.util.spec_from_file_location("mine_synthetic", ROOT / "configs" / "mine_synthetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(demo_dir)


@pytest.fixture(scope="module")
def demo_setup(quick_demo):
    """(demo dir, its models loaded once, a config factory: 12 images, batches of 4, every noun kept)."""
    out, _ = quick_demo
    config = _synthetic_config(str(out))
    models = miner.load_models(config.model)

    def make(**overrides):
        c = _synthetic_config(str(out))
        c.data.max_images = 12
        c.model.batch_size = 4
        c.min_score = 0.0
        c.mask_format = "png"
        for key, value in overrides.items():
            target = c
            *parents, leaf = key.split(".")
            for p in parents:
                target = target[p]
            target[leaf] = value
        return c

    return out, models, make


@pytest.fixture(scope="module")
def mined(demo_setup, tmp_path_factory):
    """One uninterrupted run -> (workdir, report)."""
    _, models, make = demo_setup
    workdir = tmp_path_factory.mktemp("mined")
    return workdir, miner.run(make(), workdir, models=models)


def test_mined_pairs_are_read_by_the_clip_pairs_loader(mined, demo_setup):
    out, _, _ = demo_setup
    workdir, report = mined
    rows = [json.loads(line) for line in (workdir / "pairs.jsonl").read_text().splitlines()]
    assert report["pairs"] == len(rows) > 0 and report["items"] == {"caption": 12}
    assert {r["source"] for r in rows} == {"caption"}
    assert all((workdir / r["mask"]).is_file() and (workdir / r["image"]).is_file() for r in rows)
    captions = {Path(image).resolve(): c for image, c in pipeline.read_captions(out / "world" / "captions.jsonl")}
    for r in rows:  # every noun comes from its image's caption
        assert r["noun"] in captions[(workdir / r["image"]).resolve()]
    loader = pipeline.clip_pairs_loader(workdir / "pairs.jsonl", out / "world" / "tokenizer", batch_size=2,
                                        image_size=32, num_epochs=1, shuffle=False)
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 32, 32, 3) and batch["region_mask"].shape == (2, 32, 32)
    assert batch["token_ids"].shape[0] == 2 and batch["region_mask"].max() == 1.0


def test_report_statistics_and_histogram(mined):
    workdir, report = mined
    stats = json.loads((workdir / "nouns.json").read_text())
    assert sum(s["pairs"] for s in stats.values()) == report["pairs"]
    assert report["unique_nouns"] == sum(s["pairs"] > 0 for s in stats.values())
    assert all(s["mentions"] >= s["pairs"] + s["below_threshold"] for s in stats.values())
    assert "fraction" in report["agreement"] and 0.0 <= report["agreement"]["fraction"] <= 1.0
    with Image.open(workdir / "scores.png") as picture:
        assert picture.size == (640, 360)
    svg = (workdir / "scores.svg").read_text()  # the same chart as SVG
    assert ">kept</text>" in svg and ">rejected</text>" in svg and ">threshold 0</text>" in svg  # min_score 0


def test_resume_after_a_kill_gives_the_same_pairs(mined, demo_setup, tmp_path, monkeypatch, capsys):
    _, models, make = demo_setup
    written = []

    def killed_after_6(total, desc):  # the progress bar is told after each image's pairs are written
        bar = progress_bar(total, desc)

        def update(n=1):
            written.append(n)
            if len(written) == 6:  # mid-batch: two of the second batch's four images are written
                raise KeyboardInterrupt
        bar.update = update
        return bar

    monkeypatch.setattr(miner, "progress_bar", killed_after_6)
    with pytest.raises(KeyboardInterrupt):
        miner.run(make(), tmp_path, models=models)
    progress = json.loads((tmp_path / "shards" / "progress-caption-00000-of-00001.json").read_text())
    assert progress["next"] == 4 and not progress["done"]  # the first batch was committed
    monkeypatch.setattr(miner, "progress_bar", progress_bar)
    capsys.readouterr()
    report = miner.run(make(), tmp_path, models=models)
    assert (tmp_path / "pairs.jsonl").read_text() == (mined[0] / "pairs.jsonl").read_text()
    assert report["items"] == mined[1]["items"] and report["pairs"] == mined[1]["pairs"]
    err = capsys.readouterr().err  # stderr is not a terminal here: whole lines, none redrawn in place
    lines = [line for line in err.splitlines() if line.startswith("mining shard")]
    assert "\r" not in err and len(lines) == 9  # the start, then each of the 8 items left (fewer than 10 steps)
    assert lines[0].startswith("mining shard 0/1:   0% 0/8 ") and lines[-1].startswith("mining shard 0/1: 100% 8/8 ")


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_two_shards_merge_into_the_single_run(mined, demo_setup, tmp_path):
    _, models, make = demo_setup
    assert miner.run(make(**{"shard.index": 1, "shard.count": 2}), tmp_path, models=models) is None
    report = miner.run(make(**{"shard.index": 0, "shard.count": 2}), tmp_path, models=models)
    sharded, single = (_rows(d / "pairs.jsonl") for d in (tmp_path, mined[0]))
    assert [r | {"score": 0} for r in sharded] == [r | {"score": 0} for r in single]  # other batches: scores
    np.testing.assert_allclose([r["score"] for r in sharded], [r["score"] for r in single], atol=1e-4)
    assert report["items"] == {"caption": 12} and report["shards"] == 2


def test_a_changed_config_is_refused_on_resume(demo_setup, mined):
    _, models, make = demo_setup
    with pytest.raises(ConfigError, match="mined with another config"):
        miner.run(make(min_score=0.7), mined[0], models=models)


def test_skipped_items_are_counted(demo_setup, tmp_path):
    out, models, make = demo_setup
    world = out / "world"
    (tmp_path / "bad.png").write_text("not an image")
    shutil.copy(world / "images" / "train" / "000000.png", tmp_path / "good.png")
    shutil.copy(world / "images" / "train" / "000001.png", tmp_path / "other.png")
    lines = [{"image": "good.png", "caption": "a sky and a grass"},
             {"image": "other.png", "caption": "a scene"},  # no known noun
             {"image": "bad.png", "caption": "a sand"}]  # unreadable
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    config = make(**{"data.path": str(tmp_path / "captions.jsonl"), "agreement": ""})
    report = miner.run(config, tmp_path / "mined", models=models)
    assert report["skipped"] == {"skipped_no_nouns": 1, "skipped_no_valid_proposals": 0, "skipped_unreadable": 1}
    assert report["captions_without_nouns"] == 1 and report["images_with_pairs"] == 1
    # No proposal covers more than the whole image: every image with nouns lacks valid proposals.
    report = miner.run(make(**{"data.path": str(tmp_path / "captions.jsonl"), "agreement": "", "min_area": 1.5}),
                            tmp_path / "none", models=models)
    assert report["skipped"]["skipped_no_valid_proposals"] == 1 and report["pairs"] == 0


def test_ground_truth_pairs_match_the_worlds_own(demo_setup, tmp_path):
    out, models, make = demo_setup
    world = out / "world"
    config = make(**{"sources": "gt", "gt.dataset": "synthetic", "gt.root": str(world), "gt.min_pixels": 4,
                     "mask_format": "rle", "agreement": ""})
    report = miner.run(config, tmp_path, models=models)
    ours = {(Path(r.image).resolve(), r.text, json.dumps(r.mask)) for r in crops.read_pairs(tmp_path / "pairs.jsonl")}
    theirs = {(Path(r.image).resolve(), r.text, json.dumps(r.mask)) for r in crops.read_pairs(world / "pairs.jsonl")}
    assert ours == theirs and report["gt_pairs"] == len(theirs)


# ------------------------------------------------------------------------------------ readers


def test_coco_captions_reader(tmp_path):
    (tmp_path / "annotations").mkdir()
    ann = {"images": [{"id": 7, "file_name": "b.jpg"}, {"id": 3, "file_name": "a.jpg"}],
           "annotations": [{"image_id": 3, "caption": " A dog. "}, {"image_id": 7, "caption": "A cat"},
                           {"image_id": 3, "caption": "Two dogs"}]}
    (tmp_path / "annotations" / "captions_val2017.json").write_text(json.dumps(ann))
    reader = miner.CocoCaptions(tmp_path, "val2017")
    assert len(reader) == 2
    assert reader.captions(0) == ("a.jpg", str(tmp_path / "val2017" / "a.jpg"), ["A dog.", "Two dogs"])
    assert reader.captions(1) == ("b.jpg", str(tmp_path / "val2017" / "b.jpg"), ["A cat"])
    (tmp_path / "annotations" / "captions_val2017.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="captions_val2017.json: not a COCO captions file"):
        miner.CocoCaptions(tmp_path, "val2017")
    with pytest.raises(Exception, match="captions_train2017.json: COCO captions file not found"):
        miner.CocoCaptions(tmp_path, "train2017")


class _FakeTfdsCaptions:
    """`TfdsCaptionSource`'s interface (ovseg_jax.data.tfds) over the demo world's first images."""

    def __init__(self, split, data_dir=None):
        self.world = Path(data_dir)
        self.items = pipeline.read_captions(self.world / "captions.jsonl")[:3]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        image, caption = self.items[i]
        return {"image": np.asarray(Image.open(image).convert("RGB")), "captions": [caption, "a sand"],
                "id": str(100 + i), "filename": f"COCO_val2014_{100 + i:012d}.jpg"}


def test_tfds_captions_write_the_images_they_pair(demo_setup, tmp_path, monkeypatch):
    from ovseg_jax.data import tfds as tfds_sources

    out, models, make = demo_setup
    monkeypatch.setattr(tfds_sources, "TfdsCaptionSource", _FakeTfdsCaptions)
    config = make(**{"data.kind": "tfds", "data.split": "val", "data.data_dir": str(out / "world"), "agreement": ""})
    report = miner.run(config, tmp_path, models=models)
    rows = _rows(tmp_path / "pairs.jsonl")
    assert report["items"] == {"caption": 3} and len(rows) == report["pairs"] > 0
    assert {r["image"] for r in rows} <= {f"images/COCO_val2014_{100 + i:012d}.jpg" for i in range(3)}
    for r in rows:
        assert np.asarray(Image.open(tmp_path / r["image"])).shape == (64, 64, 3)
