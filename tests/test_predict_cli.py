"""`python -m ovseg_jax.predict` on the quick demo's checkpoint: a folder of awkward files, outputs
equal to `Predictor.predict`, compile buckets, demo mode, and refused inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ovseg_jax.clip as oclip
import ovseg_jax.segmenter as oseg
from ovseg_jax import predict
from ovseg_jax.inference import ensemble, files, inputs, loading, results
from ovseg_jax.inference.ensemble import Predictor, Segmentation, UNLABELED
from ovseg_jax.inference.visualize import overlay, palette

CLASSES = ["grass", "sky", "sand", "snow", "plain red", "striped blue", "dotted yellow"]
SHORT, MAX_SIZE, BUCKET = 128, 512, 128  # the demo model's input size
COMMON = ["--templates", "a {}", "--short", str(SHORT), "--max-size", str(MAX_SIZE), "--compile-cache", "none"]


def padded(h, w):
    """The padded shape of an h x w image, from the reference formulas (short side SHORT, buckets)."""
    s = SHORT / min(h, w)
    rh, rw = int(h * s + 0.5), int(w * s + 0.5)
    return -(-rh // BUCKET) * BUCKET, -(-rw // BUCKET) * BUCKET


@pytest.fixture(scope="module")
def demo_files(quick_demo):
    out, _ = quick_demo
    return out / "ovseg_synthetic.pth", out / "world" / "tokenizer", sorted((out / "world" / "images" / "val").iterdir())


@pytest.fixture(scope="module")
def folder(tmp_path_factory, demo_files):
    """Mixed sizes and kinds -> (dir, {stem: the image as the model should see it, uint8 [H, W, 3]})."""
    d = tmp_path_factory.mktemp("inputs")
    rgb = [np.asarray(Image.open(p).convert("RGB")) for p in demo_files[2][:4]]
    expected = {}
    Image.fromarray(rgb[0]).save(d / "plain.png")
    expected["plain"] = rgb[0]
    wide = np.asarray(Image.fromarray(rgb[1]).resize((100, 40), Image.BILINEAR))
    Image.fromarray(wide).save(d / "wide.png")
    expected["wide"] = wide
    gray = rgb[2].mean(-1).astype(np.uint8)
    Image.fromarray(gray, "L").save(d / "gray.png")
    expected["gray"] = np.repeat(gray[..., None], 3, -1)
    Image.fromarray(np.dstack([rgb[3], np.full(rgb[3].shape[:2], 77, np.uint8)]), "RGBA").save(d / "rgba.png")
    expected["rgba"] = rgb[3]
    deep = (gray.astype(np.uint16) * 257 + 100)  # high byte = gray
    Image.fromarray(deep).save(d / "deep.png")  # mode I;16
    expected["deep"] = np.repeat((deep >> 8).astype(np.uint8)[..., None], 3, -1)
    stored = np.asarray(Image.fromarray(rgb[0]).resize((96, 64)))  # stored 64 x 96, shown rotated: 96 x 64
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise for display
    Image.fromarray(stored).save(d / "rotated.jpg", exif=exif, quality=95)
    with Image.open(d / "rotated.jpg") as jpg:  # the decoded JPEG, rotated by hand (transpose, mirror)
        expected["rotated"] = np.ascontiguousarray(np.asarray(jpg.convert("RGB")).transpose(1, 0, 2)[:, ::-1])
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    (d / "notes.txt").write_text("not an image")
    return d, expected


@pytest.fixture(scope="module")
def run(folder, demo_files, tmp_path_factory):
    """One CLI run over the folder (batch size 4, tokenizer found beside the checkpoint) ->
    (output dir, summary, new compilations of the model program)."""
    out = tmp_path_factory.mktemp("predicted")
    before = ensemble._scores_jit._cache_size()
    args = predict.build_parser().parse_args(["--checkpoint", str(demo_files[0]), "--classes", ",".join(CLASSES),
                                              "--input", str(folder[0]), "--output", str(out), "--batch-size", "4",
                                              *COMMON])
    summary = predict.run(args)
    return out, summary, ensemble._scores_jit._cache_size() - before


@pytest.fixture(scope="module")
def reference(demo_files):
    """A Predictor built directly (not through load_predictor) with the CLI's settings."""
    checkpoint, tokenizer, _ = demo_files
    return Predictor(oseg.load(checkpoint), oclip.load(checkpoint, tokenizer=tokenizer), mask_threshold=0.4,
                     ensemble_weight=0.7, templates=["a {}"])


def test_folder_of_mixed_files(run, folder):
    out, summary, _ = run
    good = sorted(folder[1])
    assert summary["images"] == len(good)
    assert [(p.split("/")[-1], "cannot decode" in r) for p, r in summary["skipped"]] == [("broken.png", True)]
    for stem in good:
        record = json.loads((out / f"{stem}.json").read_text())
        labels = np.asarray(Image.open(out / f"{stem}.labels.png"))
        h, w = folder[1][stem].shape[:2]
        assert labels.shape == (h, w) and labels.dtype == np.uint8 and labels.max() < len(CLASSES)
        assert record["size"] == [h, w] and record["class_names"] == CLASSES and record["unlabeled_share"] == 0
        shares = {c["name"]: c["share"] for c in record["classes"]}
        counts = np.bincount(labels.ravel(), minlength=len(CLASSES))
        assert shares == {CLASSES[i]: pytest.approx(counts[i] / labels.size, abs=1e-6) for i in np.flatnonzero(counts)}
        overlay_png = Image.open(out / f"{stem}.overlay.png")
        assert overlay_png.width >= w and overlay_png.height > h  # legend below
    assert not list(out.glob("broken*")) and not list(out.glob("notes*"))
    # one printed line per image (few images): its file name and the JSON's shares in percent
    listed = {line.split(":")[0]: line for line in summary["per_image"]}
    assert sorted(listed) == sorted(p.name for p in folder[0].iterdir() if p.stem in good)
    for name, line in listed.items():
        first = json.loads((out / f"{Path(name).stem}.json").read_text())["classes"][0]
        assert line.startswith(f"{name}: {first['name']} {100 * first['share']:.1f}%")
    assert all(f"  {line}" in files.format_summary(summary).splitlines() for line in summary["per_image"])


def test_labels_png_equals_predictor_predict(run, folder, reference):
    """The CLI's labels equal `Predictor.predict` on the same image, preprocessed here by hand
    (PIL bilinear to the reference size, zero padding to the bucket), batched (deep: one of 4
    images of its shape) or alone (rotated)."""
    out = run[0]
    for stem in ("rotated", "deep"):
        image = folder[1][stem]
        h, w = image.shape[:2]
        s = SHORT / min(h, w)
        rh, rw = int(h * s + 0.5), int(w * s + 0.5)
        x = np.zeros((*padded(h, w), 3), np.uint8)
        x[:rh, :rw] = np.asarray(Image.fromarray(image).resize((rw, rh), Image.BILINEAR))
        expected = reference.predict(x, CLASSES, resized_hw=(rh, rw), original_hw=(h, w))
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"{stem}.labels.png")), expected, err_msg=stem)


def test_compiles_bounded_by_buckets(run, folder):
    _, summary, model_compiles = run
    shapes = {padded(*image.shape[:2]) for image in folder[1].values()}
    assert len(shapes) == 3  # 128x128 (four images), 128x384 (wide), 256x128 (rotated)
    assert sorted(map(tuple, summary["padded_shapes"])) == sorted(shapes)
    assert 1 <= model_compiles <= len(shapes)


def test_demo_mode_single_class(demo_files, folder, tmp_path, capsys):
    """Demo mode, one name: it competes with "others"; pixels are the class (0) or unlabeled (255)."""
    checkpoint, tokenizer, _ = demo_files
    status = predict.main(["--checkpoint", str(checkpoint), "--tokenizer", str(tokenizer), "--classes", "sky",
                           "--mode", "demo", "--input", str(folder[0] / "plain.png"), "--output", str(tmp_path),
                           "--side-by-side", *COMMON])
    err = capsys.readouterr().err
    assert status == 0, err
    progress = [line for line in err.splitlines() if line.startswith("predicting:")]  # stderr is no terminal here
    assert progress[0].startswith("predicting:   0% 0/1 ") and progress[-1].startswith("predicting: 100% 1/1 ")
    labels = np.asarray(Image.open(tmp_path / "plain.labels.png"))
    assert set(np.unique(labels)) <= {0, 255}  # "others" and uncovered pixels are unlabeled
    record = json.loads((tmp_path / "plain.json").read_text())
    assert record["mode"] == "demo" and record["ensemble_weight"] == 0.0 and record["mask_threshold"] == 0.35
    assert [c["name"] for c in record["classes"]] == (["sky"] if (labels == 0).any() else [])
    assert record["unlabeled_share"] == pytest.approx(np.mean(labels == 255), abs=1e-6)
    assert Image.open(tmp_path / "plain.overlay.png").width >= 2 * 64  # input | overlay


@pytest.mark.parametrize("classes, message", [
    ("", "class_names is empty"), ("sky,,tree", "blank"), ("sky, tree,sky ", "duplicate class names"),
    (" , ", "blank")])
def test_bad_class_lists_exit_2(classes, message, tmp_path, capsys):
    status = predict.main(["--checkpoint", str(tmp_path), "--classes", classes, "--input", str(tmp_path),
                           "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2 and message in err and "Traceback" not in err
    assert err.startswith("python -m ovseg_jax.predict: error: --classes:") and err.count("\n") == 1


def test_bad_classes_file_and_missing_paths_exit_2(tmp_path, demo_files, capsys):
    names = tmp_path / "names.txt"
    names.write_text("sky\n\ntree\nsky\n")
    Image.new("RGB", (8, 8)).save(tmp_path / "image.png")
    cases = [(["--classes-file", str(names)], "duplicate class names: 'sky' (positions 0 and 2)"),
             (["--classes", "sky", "--checkpoint", str(tmp_path / "none.pth")], "checkpoint"),
             (["--classes", "sky", "--input", str(tmp_path / "nothing")], "no such file or directory")]
    for extra, message in cases:
        argv = ["--checkpoint", str(demo_files[0]), "--input", str(tmp_path), "--output", str(tmp_path / "o"),
                "--compile-cache", "none"]
        status = predict.main(argv + extra)  # later flags win
        err = capsys.readouterr().err
        assert status == 2 and message in err and err.count("\n") == 1, (extra, err)


def test_checkpoint_without_tokenizer_is_refused(tmp_path, demo_files):
    (tmp_path / "m.pth").symlink_to(demo_files[0])
    with pytest.raises(inputs.InputError, match="holds no tokenizer.*--tokenizer"):
        loading.load_predictor(tmp_path / "m.pth")


def test_summarize_and_render():
    labels = np.array([[0, 0, 2], [UNLABELED, 2, 2]])
    confidence = np.array([[0.5, 0.7, 0.2], [0.9, 0.4, 0.3]], np.float32)
    names = ["a", "b", "c"]
    summary = results.summarize(Segmentation(labels, confidence), names)
    assert summary["classes"] == [
        {"index": 2, "name": "c", "pixels": 3, "share": pytest.approx(0.5), "mean_confidence": pytest.approx(0.3)},
        {"index": 0, "name": "a", "pixels": 2, "share": pytest.approx(1 / 3, abs=1e-6),
         "mean_confidence": pytest.approx(0.6)}]
    assert summary["unlabeled_share"] == pytest.approx(1 / 6, abs=1e-6)
    image = np.random.RandomState(0).randint(0, 256, (2, 3, 3)).astype(np.uint8)
    blended = overlay(image, labels, palette(3), alpha=0.5, edge_thickness=0)
    colours = palette(3).astype(float)
    assert np.array_equal(blended[1, 0], image[1, 0])  # unlabeled: the image
    np.testing.assert_array_equal(blended[0, 1], np.round(0.5 * image[0, 1] + 0.5 * colours[0]).astype(np.uint8))
    picture = results.render(image, Segmentation(labels, confidence), names, side_by_side=True)
    assert np.array_equal(np.asarray(picture)[:2, :3], image)  # input on the left
    assert picture.height > 2


def test_label_image_dtype():
    small = results.label_image(np.array([[0, UNLABELED]]), 254)
    big = results.label_image(np.array([[300, UNLABELED]]), 400)
    assert np.asarray(small).tolist() == [[0, 255]] and np.asarray(small).dtype == np.uint8
    assert np.asarray(big).tolist() == [[300, 65535]] and np.asarray(big).dtype == np.uint16

