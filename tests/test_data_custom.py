"""Your own data by path (`ovseg_jax.data.custom`): the layouts read back exactly what was written,
detection errors, the cached index, `python -m ovseg_jax.data check` on seeded defects, and every
command taking a dataset folder: evaluation of the exported world equal to `--dataset synthetic`
(the same confusion matrices), fine-tuning from the demo's checkpoint, ground-truth pairs, class lists."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovseg_jax.data import __main__ as data_cli
from ovseg_jax.data import custom, export_layouts, index, registry, synthetic
from ovseg_jax.data.sources import BadExampleError, DatasetLayoutError

ROOT = Path(__file__).resolve().parents[1]
RENAMED = {"grass": "lawn", "sky": "heavens", "plain red": "crimson", "striped blue": "zebra blue",
           "dotted green": "spotty green", "checkered yellow": "chess yellow", "plain blue": "azure",
           "striped red": "candy red"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small generated world (6 val scenes of 32 px), independent of any model."""
    out = tmp_path_factory.mktemp("world")
    return synthetic.generate(out, num_train=4, num_val=6, num_web=0, image_size=32)


def _examples(source) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(source[i]["image"], source[i]["label"]) for i in range(len(source))]


# ---------------------------------------------------------------------------------------------
# Layouts


@pytest.mark.parametrize("layout", export_layouts.LAYOUTS)
def test_exported_world_reads_back_as_the_world(world, tmp_path, layout):
    export_layouts.export_world(world, tmp_path, layout, splits=("val",))
    spec = registry.get(str(tmp_path))
    reference = registry.get("synthetic").make_source(world, "val")
    source = spec.make_source(None, "val")
    assert spec.splits == ("val",) and spec.class_names == reference.class_names == synthetic.CLASS_NAMES
    assert spec.ignore_value == 255 and spec.ensemble_weight == 0.7
    for (image, label), (want_image, want_label) in zip(_examples(source), _examples(reference), strict=True):
        np.testing.assert_array_equal(image, want_image)
        np.testing.assert_array_equal(label, want_label)
    from ovseg_jax.evaluation.seen import unseen_classes

    assert unseen_classes(str(tmp_path), spec.class_names, None) == list(synthetic.UNSEEN)


def test_coco_panoptic_segments_become_their_categories(tmp_path):
    """A hand-written panoptic file: two segments of one category, a crowd segment, void (id 0),
    non-contiguous category ids listed out of id order; panopticapi's rgb2id restated."""
    (tmp_path / "val2017").mkdir()
    (tmp_path / "annotations" / "panoptic_val2017").mkdir(parents=True)
    Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(tmp_path / "val2017" / "a.jpg")
    ids = np.array([[0, 5, 5], [70000, 300, 5]])
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 256 // 256], -1).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "annotations" / "panoptic_val2017" / "a.png")
    (tmp_path / "annotations" / "panoptic_val2017.json").write_text(json.dumps({
        "images": [{"id": 9, "file_name": "a.jpg"}],
        "annotations": [{"image_id": 9, "file_name": "a.png", "segments_info": [
            {"id": 5, "category_id": 40}, {"id": 300, "category_id": 40},
            {"id": 70000, "category_id": 7, "iscrowd": 1}]}],
        "categories": [{"id": 40, "name": "wall"}, {"id": 7, "name": "person"}]}))
    spec = registry.get(str(tmp_path))
    assert spec.class_names == ("wall", "person") and spec.splits == ("val2017",)
    np.testing.assert_array_equal(spec.make_source(None, "val2017")[0]["label"], [[255, 0, 0], [1, 0, 0]])


def test_cityscapes_label_ids_map_to_the_19_train_ids(tmp_path):
    labels_table = pytest.importorskip("cityscapesscripts.helpers.labels")  # the official table
    city = ("leftImg8bit/val/aachen", "gtFine/val/aachen")
    for folder in city:
        (tmp_path / folder).mkdir(parents=True)
    raw = np.arange(34, dtype=np.uint8).reshape(2, 17)
    Image.fromarray(np.zeros((2, 17, 3), np.uint8)).save(tmp_path / city[0] / "aachen_000000_000019_leftImg8bit.png")
    Image.fromarray(raw).save(tmp_path / city[1] / "aachen_000000_000019_gtFine_labelIds.png")
    spec = registry.get(str(tmp_path))
    train = sorted((lab.trainId, lab.name) for lab in labels_table.labels if lab.trainId not in (255, -1))
    assert spec.class_names == tuple(name for _, name in train)
    want = {lab.id: (255 if lab.trainId in (255, -1) else lab.trainId) for lab in labels_table.labels if lab.id >= 0}
    np.testing.assert_array_equal(spec.make_source(None, "val")[0]["label"], np.vectorize(want.get)(raw))


def test_palette_png_indices_and_colour_labels(tmp_path):
    """Without palette.json a palette PNG's indices are the classes; with it, colours are looked up
    (here in a file whose own palette order differs from the classes')."""
    (tmp_path / "images/val").mkdir(parents=True)
    (tmp_path / "labels/val").mkdir(parents=True)
    (tmp_path / "classes.txt").write_text("road\ncar\n")
    Image.fromarray(np.zeros((1, 3, 3), np.uint8)).save(tmp_path / "images/val/x.png")
    indexed = Image.fromarray(np.array([[0, 1, 255]], np.uint8), "L").convert("P")
    indexed.putpalette([200, 0, 0, 0, 0, 200] + [9, 9, 9] * 254)
    indexed.save(tmp_path / "labels/val/x.png")
    np.testing.assert_array_equal(registry.get(str(tmp_path)).make_source(None, "val")[0]["label"], [[0, 1, 255]])
    (tmp_path / "palette.json").write_text(json.dumps({"car": [200, 0, 0], "road": [0, 0, 200]}))
    (tmp_path / "dataset.json").write_text(json.dumps({"ignore_colors": [[9, 9, 9]]}))
    spec = registry.get(str(tmp_path))
    assert spec.class_names == ("road", "car")  # classes.txt's order
    np.testing.assert_array_equal(spec.make_source(None, "val")[0]["label"], [[1, 0, 255]])


def test_dataset_json_offset_ignore_value_and_synonyms(tmp_path):
    """ADE-style 1-based 16-bit maps: value v is class v - 1, 0 is ignored, as is the ignore value."""
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    (tmp_path / "classes.txt").write_text("# my classes\nbuilding: edifice, house\n\nsky\ntree  # leafy\n")
    (tmp_path / "dataset.json").write_text(json.dumps({"label_offset": 1, "ignore_value": 65535,
                                                        "ensemble_weight": 0.6, "seen": ["sky"]}))
    Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(tmp_path / "images" / "p.jpg")
    Image.fromarray(np.array([[0, 1, 2], [3, 65535, 1]], np.uint16)).save(tmp_path / "labels" / "p.png")
    spec = registry.get(str(tmp_path))
    assert spec.class_names == ("building, edifice, house", "sky", "tree") and spec.ensemble_weight == 0.6
    assert spec.splits == ("all",) and spec.ignore_value == 65535
    np.testing.assert_array_equal(spec.make_source(None, "all")[0]["label"], [[65535, 0, 1], [2, 65535, 0]])
    assert custom.open_dataset(tmp_path).unseen() == ["building, edifice, house", "tree"]
    Image.fromarray(np.array([[4, 1, 2], [3, 1, 1]], np.uint16)).save(tmp_path / "labels" / "p.png")
    with pytest.raises(BadExampleError, match=r"p\.png: value 4 outside the 3 classes"):
        spec.make_source(None, "all")[0]


def test_detection_errors_name_what_was_found_and_what_was_expected(tmp_path, world):
    (tmp_path / "pictures").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DatasetLayoutError) as e:
        registry.get(str(tmp_path))
    assert "found notes.txt, pictures/" in str(e.value)
    for expected in ("PATH/images/<split>/", "panoptic_<split>.json", "gtFine"):
        assert expected in str(e.value)
    with pytest.raises(DatasetLayoutError, match="--dataset synthetic --root"):
        registry.get(str(world))
    with pytest.raises(DatasetLayoutError, match="no such dataset folder"):
        registry.get(str(tmp_path / "missing/data"))
    with pytest.raises(KeyError, match="or a dataset folder by path"):
        registry.get("ade21k")
    (tmp_path / "images/val").mkdir(parents=True)
    (tmp_path / "labels/val").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match=r"classes\.txt: not found"):
        registry.get(str(tmp_path))
    (tmp_path / "classes.txt").write_text("a\nb\n")
    (tmp_path / "dataset.json").write_text(json.dumps({"ignore": 3}))
    with pytest.raises(DatasetLayoutError, match=r"dataset\.json: unknown field\(s\) \['ignore'\]"):
        registry.get(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# The index


def test_index_is_built_once_and_rebuilt_when_files_change(world, tmp_path, monkeypatch):
    export_layouts.export_world(world, tmp_path, "folder", splits=("val",))
    dataset = custom.open_dataset(tmp_path)
    walks = []
    real_walk = os.walk
    monkeypatch.setattr(custom.os, "walk", lambda *a, **k: walks.append(a[0]) or real_walk(*a, **k))
    assert len(dataset.make_source(None, "val")) == 6 and len(walks) == 2  # images/ and labels/ listed
    assert (tmp_path / index.INDEX_FILE).is_file()
    assert len(custom.open_dataset(tmp_path).make_source(None, "val")) == 6 and len(walks) == 2  # from the cache
    shutil.copy(tmp_path / "images/val/000000.png", tmp_path / "images/val/extra.png")
    shutil.copy(tmp_path / "labels/val/000000.png", tmp_path / "labels/val/extra.png")
    source = dataset.make_source(None, "val")
    assert len(source) == 7 and source.image_paths[-1].endswith("extra.png") and len(walks) == 4


def test_index_of_an_unwritable_folder_goes_to_the_user_cache(world, tmp_path, monkeypatch):
    data, home = tmp_path / "data", tmp_path / "home"
    export_layouts.export_world(world, data, "folder", splits=("val",))
    (data / index.INDEX_FILE).mkdir()  # cannot be written as a file (permissions do not stop root)
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    custom.open_dataset(data).make_source(None, "val")
    assert index.home_cache(data).is_file() and index.home_cache(data).is_relative_to(home)
    assert index.lookup(data, "folder/val")["pairs"][0] == ["images/val/000000.png", "labels/val/000000.png"]


# ---------------------------------------------------------------------------------------------
# python -m ovseg_jax.data check


def _seeded(tmp_path: Path, num_classes: int = 20) -> Path:
    """A 20-class folder with one of each defect (and 3 good pairs)."""
    for d in ("images/val", "labels/val"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "classes.txt").write_text("".join(f"class{i}\n" for i in range(num_classes)))
    rng = np.random.default_rng(0)
    for stem in ("good1", "good2", "good3", "wrongsize", "value37", "unreadable"):
        Image.fromarray(rng.integers(0, 255, (8, 10, 3), dtype=np.uint8)).save(tmp_path / f"images/val/{stem}.jpg")
        Image.fromarray(rng.integers(0, 4, (8, 10), dtype=np.uint8)).save(tmp_path / f"labels/val/{stem}.png")
    Image.fromarray(np.zeros((9, 10), np.uint8)).save(tmp_path / "labels/val/wrongsize.png")
    bad = np.zeros((8, 10), np.uint8)
    bad[:2] = 37
    Image.fromarray(bad).save(tmp_path / "labels/val/value37.png")
    (tmp_path / "labels/val/unreadable.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(tmp_path / "images/val/nolabel.jpg")
    Image.fromarray(np.zeros((8, 10), np.uint8)).save(tmp_path / "labels/val/noimage.png")
    return tmp_path


def test_check_names_every_seeded_defect_with_its_file(tmp_path, capsys):
    data = _seeded(tmp_path / "data")
    status = data_cli.main(["check", str(data), "--grid", str(tmp_path / "grid.png")])
    out = capsys.readouterr().out
    assert status == 1
    errors = [line for line in out.splitlines() if "ERROR" in line]
    want = {"nolabel.jpg": "image without a label", "noimage.png": "label without an image",
            "wrongsize.png": "label size 10x9 (WxH) differs", "unreadable.png": "cannot decode label map",
            "value37.png": "label value 37 outside the 20 classes (0..19, ignore 255): 20 pixels in 1 image"}
    for file, message in want.items():
        assert any(file in line and message in line for line in errors), (file, out)
    assert len(errors) == len(want) and "5 error(s)" in out
    assert "warning: 16 of 20 classes in no image of 'val': class4, class5" in out
    assert "split val: 6 image/label pairs" in out and "class0" in out
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.width > 3 * 160  # the three good pairs at least, side by side


def test_check_reports_an_empty_class_file_and_passes_a_clean_dataset(world, tmp_path, capsys):
    data = _seeded(tmp_path / "data")
    (data / "classes.txt").write_text("\n  \n")
    assert data_cli.main(["check", str(data), "--grid", str(tmp_path / "grid.png")]) == 1
    assert f"{data / 'classes.txt'}: no class names (the file is empty)" in capsys.readouterr().out
    clean = export_layouts.export_world(world, tmp_path / "clean", "coco", splits=("val",))
    assert data_cli.main(["check", str(clean), "--grid", str(tmp_path / "clean.png")]) == 0
    out = capsys.readouterr().out
    assert "COCO layout" in out and "0 error(s)" in out and (tmp_path / "clean.png").is_file()


# ---------------------------------------------------------------------------------------------
# Class lists, ground-truth pairs, captions


def test_classes_from_a_dataset_folder(world, tmp_path):
    from ovseg_jax import predict
    from ovseg_jax.inference.inputs import InputError, parse_class_names

    export_layouts.export_world(world, tmp_path, "folder", splits=("val",), rename=RENAMED)
    names = [RENAMED.get(n, n) for n in synthetic.CLASS_NAMES]
    assert parse_class_names(classes_from=str(tmp_path)) == names
    assert parse_class_names(classes_from="pascal_voc_20")[:2] == ["aeroplane", "bicycle"]
    with pytest.raises(InputError, match="--classes-from nowhere/data: .*no such dataset folder"):
        parse_class_names(classes_from="nowhere/data")
    args = predict.build_parser().parse_args(["--checkpoint", "c", "--classes-from", str(tmp_path), "--input", "x",
                                              "--output", "o"])
    assert args.classes_from == str(tmp_path)


def test_ground_truth_pairs_from_a_dataset_folder(world, tmp_path):
    from ovseg_jax.data.crops import read_pairs, rle_decode
    from ovseg_jax.mining import miner

    data = export_layouts.export_world(world, tmp_path / "data", "palette", splits=("val",), rename=RENAMED)
    config = miner.check_config(__import__("ml_collections").ConfigDict({
        "data": {"kind": "jsonl", "path": str(world)}, "model": {"segmenter": "unused", "clip": "unused"},
        "sources": "gt", "gt": {"dataset": str(data), "split": "val"}, "mask_format": "rle"}))
    report = miner.run(config, tmp_path / "mined")
    source = registry.get(str(data)).make_source(None, "val")
    want = [(i, c) for i in range(len(source)) for c in np.unique(source[i]["label"]) if c != 255]
    records = read_pairs(tmp_path / "mined" / "pairs.jsonl")
    assert report["gt_pairs"] == len(records) == len(want)
    for record, (i, c) in zip(records, want):
        assert record.text == source.class_names[c] and Path(record.image).resolve() == Path(source.image_paths[i])
        np.testing.assert_array_equal(rle_decode(record.mask, shape=(32, 32)), source[i]["label"] == c)
    assert miner.JsonlCaptions(world).items == miner.JsonlCaptions(world / "captions.jsonl").items != []


# ---------------------------------------------------------------------------------------------
# With the quick demo's model: evaluation and fine-tuning


@pytest.fixture(scope="module")
def demo(quick_demo, tmp_path_factory):
    """(demo dir, segmenter, clip, the world's val source, {layout: exported val folder})."""
    import ovseg_jax.clip
    import ovseg_jax.segmenter

    out, _ = quick_demo
    folders = {layout: export_layouts.export_world(out / "world", tmp_path_factory.mktemp(layout), layout,
                                                   splits=("val",), max_images=4)
               for layout in export_layouts.LAYOUTS}
    segmenter = ovseg_jax.segmenter.load(out / "ovseg_synthetic.pth")
    clip = ovseg_jax.clip.load(out / "ovseg_synthetic.pth", tokenizer=out / "world" / "tokenizer")
    return out, segmenter, clip, registry.get("synthetic").make_source(out / "world", "val"), folders


EVAL = dict(ignore_value=255, short=128, max_size=512, bucket=32, batch_size=2, max_images=4, progress=False)


def test_exported_layouts_evaluate_to_the_same_confusion_matrix(demo):
    from ovseg_jax.evaluation import evaluator
    from ovseg_jax.inference.ensemble import Predictor

    _, segmenter, clip, source, folders = demo
    setting = evaluator.Setting(0.7, 0.4)
    predictor = Predictor(segmenter, clip, mask_threshold=0.4, ensemble_weight=0.7, templates=["a {}"])
    want = evaluator.evaluate(predictor, source, [setting], **EVAL).confusion[setting]
    assert want.sum() == 4 * 64 * 64
    for layout, folder in folders.items():
        got = evaluator.evaluate(predictor, registry.get(str(folder)).make_source(None, "val"), [setting], **EVAL)
        np.testing.assert_array_equal(got.confusion[setting], want, err_msg=layout)


def test_evaluate_command_on_a_folder_with_seen_classes(demo, tmp_path):
    from ovseg_jax import evaluate as ev

    out, segmenter, clip, _, folders = demo
    flags = ["--checkpoint", str(out / "ovseg_synthetic.pth"), "--short", "128", "--max-size", "512",
             "--bucket", "32", "--templates", "a {}", "--no-progress", "--max-images", "4", "--batch-size", "2"]
    synthetic_report = ev.run(flags + ["--dataset", "synthetic", "--root", str(out / "world"), "--out",
                                       str(tmp_path / "s")], models=(segmenter, clip))
    report = ev.run(flags + ["--dataset", str(folders["coco"]), "--out", str(tmp_path / "c")], models=(segmenter, clip))
    for key in ("mIoU", "mIoU_seen", "mIoU_unseen", "pACC", "IoU"):
        assert report[key] == synthetic_report[key], key
    assert report["unseen"] == list(synthetic.UNSEEN) and "dataset.json seen list" in report["seen_rule"]
    assert (tmp_path / "c" / "per_class_iou.png").is_file()
    (tmp_path / "seen.txt").write_text("grass\nsky\n")
    again = ev.run(flags + ["--dataset", str(folders["folder"]), "--out", str(tmp_path / "f"), "--seen-classes",
                            str(tmp_path / "seen.txt"), "--max-images", "1"], models=(segmenter, clip))
    assert again["unseen"] == list(synthetic.CLASS_NAMES[2:]) and again["split"] == "val"


def _custom_seg_config(arg: str):
    spec = importlib.util.spec_from_file_location("custom_seg", ROOT / "configs" / "custom_seg.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _flat_params(module) -> dict[str, np.ndarray]:
    from flax import nnx

    from ovseg_jax.training.checkpoint import FlatTree

    state = nnx.state(module, nnx.Param)
    return {k: np.asarray(v) for k, v in FlatTree(state).flatten(state).items()}


def test_fine_tuning_starts_from_the_checkpoint_with_the_datasets_classes(demo, tmp_path):
    """configs/custom_seg.py on an exported train split with 8 classes renamed, 2 steps from the
    demo's checkpoint: the segmenter starts from its weights, the text bank holds the dataset's
    names embedded by the frozen CLIP, and the CLIP the run pairs with is the checkpoint's."""
    import ovseg_jax.clip
    from ovseg_jax.training import trainer
    from ovseg_jax.training.checkpoint import load_params
    from ovseg_jax.training.tasks import segmenter as task

    out, segmenter, clip, _, _ = demo
    data = export_layouts.export_world(out / "world", tmp_path / "data", "folder", splits=("train",), rename=RENAMED,
                                       max_images=4)
    checkpoint = out / "ovseg_synthetic.pth"
    config = _custom_seg_config(f"{data},init={checkpoint},size=64,steps=2,batch=2,templates=a {{}}")
    names = [RENAMED.get(n, n) for n in synthetic.CLASS_NAMES]
    assert list(config.model.class_names) == names and config.init_from == config.model.clip_init == str(checkpoint)
    assert config.model.tokenizer == str(out / "world" / "tokenizer") and config.model.templates == "a {}"
    assert "eval" not in config  # (no val split exported)
    with config.unlocked():
        config.data.update(max_masks=4, photometric=False)
    np.testing.assert_allclose(task.text_bank(config), clip.class_embeddings(names, templates="a {}"), atol=1e-6)
    workdir = tmp_path / "run"
    assert trainer.run(config, workdir) == "done"
    start = _flat_params(segmenter)
    tuned = {k.removeprefix("segmenter/"): v for k, v in load_params(workdir).items()}
    assert tuned.keys() == start.keys()
    moved = max(float(np.abs(tuned[k] - start[k]).max()) for k in start)
    assert 0 < moved < 1e-3  # two AdamW steps of 6e-5 from the checkpoint (a fresh start differs by far more)
    frozen, original = _flat_params(ovseg_jax.clip.load(workdir).model), _flat_params(clip.model)
    assert frozen.keys() == original.keys()
    for key in original:
        np.testing.assert_array_equal(frozen[key], original[key], err_msg=key)
