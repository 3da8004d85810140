"""Files that are wrong are refused with a message naming the file, never read out of bounds.

Crafted TorchScript / torch.save archives are built by hand here (a zip with data.pkl written by a
pickler that emits torch's own globals), so sizes, strides and storages can be anything.
"""

from __future__ import annotations

import collections
import io
import json
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import ovseg_jax.clip as oclip
import ovseg_jax.segmenter as osegmenter
from ovseg_jax.convert.segmenter_keys import OVSEG_ANCHOR
from ovseg_jax.convert.torch_io import CheckpointError, read_state_dict, write_safetensors
from ovseg_jax.data import sources

# --------------------------------------------------------------------------------------------
# Crafted archives


class _Storage:
    """Stands for archive member data/<key>; pickled as torch's persistent id."""

    def __init__(self, key: str, numel: int, type_=torch.FloatStorage):
        self.key, self.numel, self.type = key, numel, type_


class _Tensor:
    """Pickled exactly as torch pickles a tensor: _rebuild_tensor_v2(storage, offset, size, stride, ...)."""

    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", obj.type, obj.key, "cpu", obj.numel)
        return None


def write_archive(path, tensors: dict, storages: dict[str, bytes], *, torchscript: bool = True):
    """A zip laid out as torch.jit.save (constants.pkl present) or torch.save writes it."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(tensors)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        for key, raw in storages.items():
            z.writestr(f"archive/data/{key}", raw)
        z.writestr("archive/version", "3\n")
        z.writestr("archive/byteorder", "little")
        if torchscript:
            z.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
    return path


FOUR = np.arange(4, dtype=np.float32).tobytes()  # a 4-element float storage


def _one_tensor(path, offset, size, stride, *, torchscript=True, numel=4, raw=FOUR, name="visual.conv1.weight"):
    return write_archive(path, {name: _Tensor(_Storage("0", numel), offset, size, stride)}, {"0": raw},
                         torchscript=torchscript)


def test_crafted_archive_in_bounds_reads_back(tmp_path):
    """The crafting helper itself is right: a strided view inside the storage is read as torch reads it."""
    path = _one_tensor(tmp_path / "ok.pt", 1, (2, 2), (1, 1))
    got = read_state_dict(path)["visual.conv1.weight"]
    ref = torch.arange(4, dtype=torch.float32).as_strided((2, 2), (1, 1), 1)  # torch's view of that storage
    np.testing.assert_array_equal(got, ref.numpy())


@pytest.mark.parametrize("offset, size, stride, message", [
    (0, (64,), (1,), "reach element 63"),                  # 64 elements over a 4-element storage
    (3, (2,), (1,), "reach element 4"),                    # the offset pushes the last element out
    (0, (2, 3), (3, 1), "reach element 5"),                # multi-dimensional extent
    (0, (3,), (-1,), "negative"),                          # negative stride reads before the storage
    (0, (-2, 2), (1, 1), "negative"),
    (-1, (2,), (1,), "negative"),
    (0, (1 << 20,), (0,), "overlapping"),                  # in bounds, but a 4 MB copy of one element
    (0, (2, 2), (1,), "malformed"),
    (0, (2.0,), (1,), "malformed"),
])
def test_torchscript_tensor_outside_its_storage_is_refused(tmp_path, offset, size, stride, message):
    path = _one_tensor(tmp_path / "crafted.pt", offset, size, stride)
    with pytest.raises(CheckpointError, match=f"crafted.pt: tensor 'visual.conv1.weight'.*{message}"):
        read_state_dict(path)


def test_huge_tensor_is_refused_without_crashing(tmp_path):
    """1<<30 elements over 4: this used to read gigabytes past the buffer (SIGSEGV). Run in a
    subprocess so that a crash is a test failure, not the end of the test run."""
    path = _one_tensor(tmp_path / "huge.pt", 0, (1 << 30,), (1,))
    code = ("import sys; from ovseg_jax.convert.torch_io import CheckpointError, read_state_dict\n"
            "try:\n    read_state_dict(sys.argv[1])\nexcept CheckpointError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert "huge.pt: tensor 'visual.conv1.weight'" in done.stdout and "beyond the storage" in done.stdout


@pytest.mark.parametrize("numel, raw, message", [
    (8, FOUR, "holds 16 bytes; the archive declares 8 FloatStorage elements"),
    (4, FOUR[:13], "holds 13 bytes"),
], ids=["numel", "bytes"])
def test_storage_shorter_than_declared_is_refused(tmp_path, numel, raw, message):
    path = _one_tensor(tmp_path / "short.pt", 0, (2,), (1,), numel=numel, raw=raw)
    with pytest.raises(CheckpointError, match=f"short.pt: .*{message}"):
        read_state_dict(path)


def test_torch_save_archive_out_of_bounds_is_refused(tmp_path):
    """The same crafted tensor in a torch.save-style archive goes through torch.load, which checks it."""
    path = _one_tensor(tmp_path / "plain.pt", 0, (64,), (1,), torchscript=False)
    with pytest.raises(CheckpointError, match="plain.pt"):
        read_state_dict(path)


def test_public_loaders_refuse_crafted_archives(tmp_path):
    path = _one_tensor(tmp_path / "ViT-crafted.pt", 0, (64,), (1,))
    with pytest.raises(CheckpointError, match="ViT-crafted.pt: tensor 'visual.conv1.weight'"):
        oclip.load(path)
    path = _one_tensor(tmp_path / "seg-crafted.pth", 2, (4,), (1,), name=OVSEG_ANCHOR)
    with pytest.raises(CheckpointError, match=f"seg-crafted.pth: tensor '{OVSEG_ANCHOR}'"):
        osegmenter.load(path)


# --------------------------------------------------------------------------------------------
# Files that are not checkpoints


@pytest.mark.parametrize("content, hint", [
    (b"hello, this is a text file\n", "starts with b'hello"),
    (bytes(np.random.RandomState(0).randint(1, 128, 300, dtype=np.uint8)), "starts with"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 3\n", "Git LFS pointer"),
    (b"<!DOCTYPE html><html>quota exceeded</html>", "HTML"),
    (b"", "empty"),
], ids=["text", "random", "lfs", "html", "empty"])
def test_text_or_random_bytes_are_not_a_checkpoint(tmp_path, content, hint):
    path = tmp_path / "x.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"x.pth is not a PyTorch checkpoint \\(not a zip archive or pickle\\)"
                                              f": expected a file written by torch.save.*{hint}"):
        read_state_dict(path)


def test_safetensors_under_a_torch_name_is_recognised(tmp_path):
    write_safetensors({"w": np.zeros(2, np.float32)}, tmp_path / "w.safetensors")
    (tmp_path / "w.bin").write_bytes((tmp_path / "w.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="w.bin is not a PyTorch checkpoint.*safetensors file: name it"):
        read_state_dict(tmp_path / "w.bin")


def test_other_pickles_and_zips_are_not_a_checkpoint(tmp_path):
    (tmp_path / "p.pth").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with pytest.raises(CheckpointError, match="p.pth is a pickle but not a PyTorch checkpoint"):
        read_state_dict(tmp_path / "p.pth")
    with zipfile.ZipFile(tmp_path / "z.pth", "w") as z:
        z.writestr("readme.txt", "hi")
    with pytest.raises(CheckpointError, match=r"z.pth is a zip archive but not a PyTorch checkpoint \(no data.pkl"):
        read_state_dict(tmp_path / "z.pth")
    (tmp_path / "t.pkl").write_text("just text")
    with pytest.raises(CheckpointError, match="t.pkl is not a detectron2 .pkl"):
        read_state_dict(tmp_path / "t.pkl")


def test_legacy_torch_format_still_loads(tmp_path):
    torch.save({"w": torch.arange(3.0)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    np.testing.assert_array_equal(read_state_dict(tmp_path / "legacy.pth")["w"], [0, 1, 2])


def test_corrupt_pickle_inside_a_torch_archive_is_not_called_code(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pt")
    with zipfile.ZipFile(tmp_path / "ok.pt") as src, zipfile.ZipFile(tmp_path / "bad.pt", "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, b"\x80\x02garbage" if item.filename.endswith("data.pkl") else data)
    with pytest.raises(CheckpointError, match="bad.pt: not a readable PyTorch checkpoint") as err:
        read_state_dict(tmp_path / "bad.pt")
    assert "run code" not in str(err.value)


def test_public_loaders_say_what_the_file_is_not(tmp_path):
    (tmp_path / "notes.pth").write_text("my notes\n")
    with pytest.raises(CheckpointError, match="notes.pth is not a PyTorch checkpoint"):
        oclip.load(tmp_path / "notes.pth")
    with pytest.raises(CheckpointError, match="notes.pth is not a PyTorch checkpoint"):
        osegmenter.load(tmp_path / "notes.pth")


# --------------------------------------------------------------------------------------------
# Architecture sidecars (<file>.ovseg_jax.json)


@pytest.fixture(scope="module")
def sidecar_files(tmp_path_factory):
    """A CLIP-looking and a segmenter-looking weights file: the sidecar is read before any model is built."""
    d = tmp_path_factory.mktemp("sidecar")
    write_safetensors({"visual.conv1.weight": np.zeros((8, 3, 4, 4), np.float32)}, d / "clip.safetensors")
    write_safetensors({OVSEG_ANCHOR: np.zeros((4, 8), np.float32)}, d / "seg.safetensors")
    return d


def _sidecar(weights, content):
    side = weights.with_name(weights.name + ".ovseg_jax.json")
    side.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    return side


@pytest.mark.parametrize("content, message", [
    ({"clip": {"embed_dim": 8, "vision_widht": 8}}, r"\(section 'clip'\): unknown key\(s\) 'vision_widht'"),
    ({"clip": {"embed_dim": "eight"}}, r"\(section 'clip'\): key 'embed_dim' is 'eight'"),
    ({"clip": {"mask_prompt_shared": 1}}, r"key 'mask_prompt_shared' is 1"),
    ({"clipp": {}}, r"unknown section\(s\) 'clipp'"),
    (b"{not json", "invalid JSON"),
    (b"\xff\xfe\x00binary", "invalid JSON"),
], ids=["unknown-key", "bad-type", "int-for-bool", "unknown-section", "bad-json", "binary"])
def test_bad_clip_sidecar_names_file_and_key(sidecar_files, content, message):
    weights = sidecar_files / "clip.safetensors"
    _sidecar(weights, content)
    with pytest.raises(CheckpointError, match=f"clip.safetensors.ovseg_jax.json.*{message}"):
        oclip.load(weights)


@pytest.mark.parametrize("content, message", [
    ({"segmenter": {"backbone": "swin", "nhead": 4}}, r"\(section 'segmenter'\): unknown key\(s\) 'nhead'"),
    ({"segmenter": {"backbone": "swin", "backbone_config": {"depth": [2]}}}, r"backbone_config: unknown key\(s\) 'depth'"),
    ({"segmenter": {"backbone": "swin", "dropout": "0.1"}}, "key 'dropout' is '0.1'"),
    ({"segmenter": {"backbone": "vit"}}, "not a segmenter config.*backbone must be one of"),
], ids=["unknown-key", "unknown-backbone-key", "bad-type", "bad-backbone"])
def test_bad_segmenter_sidecar_names_file_and_key(sidecar_files, content, message):
    weights = sidecar_files / "seg.safetensors"
    _sidecar(weights, content)
    with pytest.raises(CheckpointError, match=f"seg.safetensors.ovseg_jax.json.*{message}"):
        osegmenter.load(weights)


# --------------------------------------------------------------------------------------------
# Image and label files


def _png16(path, values: np.ndarray):
    """A 16-bit PNG written byte by byte (PIL cannot write 16-bit RGB): gray `[H, W]` or RGB `[H, W, 3]`."""
    import struct
    import zlib

    h, w = values.shape[:2]
    channels = 1 if values.ndim == 2 else values.shape[2]
    raw = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    color_type = {1: 0, 3: 2}[channels]
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


SIXTEEN = np.array([[0x0000, 0x00FF, 0x0100], [0x1234, 0x8000, 0xFFFF]], np.uint16)
HIGH_BYTE = np.array([[0x00, 0x00, 0x01], [0x12, 0x80, 0xFF]], np.uint8)  # what an 8-bit reader should see


def test_16bit_grayscale_png_image_is_not_white(tmp_path):
    got = sources.read_image(_png16(tmp_path / "g16.png", SIXTEEN))
    assert got.dtype == np.uint8 and got.shape == (2, 3, 3)
    np.testing.assert_array_equal(got, np.repeat(HIGH_BYTE[..., None], 3, axis=-1))


def test_16bit_rgb_png_reads_like_16bit_gray(tmp_path):
    got = sources.read_image(_png16(tmp_path / "rgb16.png", np.stack([SIXTEEN] * 3, axis=-1)))
    np.testing.assert_array_equal(got, np.repeat(HIGH_BYTE[..., None], 3, axis=-1))


def test_float_image_is_refused(tmp_path):
    Image.fromarray(np.ones((4, 4), np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(sources.BadExampleError, match="f.tif: floating-point image"):
        sources.read_image(tmp_path / "f.tif")


def test_16bit_png_label_map_keeps_its_values(tmp_path):
    from ovseg_jax.data import registry

    root = tmp_path
    image_dir, label_dir = root / "ADEChallengeData2016/images/validation", \
        root / "ADEChallengeData2016/annotations_detectron2/validation"
    image_dir.mkdir(parents=True)
    label_dir.mkdir(parents=True)
    for stem, label in (("a", [[0, 149], [255, 7]]), ("b", [[0, 300], [255, 7]])):
        Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(image_dir / f"{stem}.jpg")
        _png16(label_dir / f"{stem}.png", np.array(label, np.uint16))
    source = registry.get("ade20k_150").make_source(root, "val")
    np.testing.assert_array_equal(source[0]["label"], [[0, 149], [255, 7]])
    with pytest.raises(sources.BadExampleError, match=r"b.png: label values \[300\] outside 0..149"):
        source[1]


@pytest.mark.parametrize("name, image_dir, label_dir", [
    ("ade20k_150", "ADEChallengeData2016/images/validation", "ADEChallengeData2016/annotations_detectron2/validation"),
    ("coco_stuff_171", "coco/val2017", "coco/stuffthingmaps_detectron2/val2017"),   # listed by its labels
])
def test_upper_case_extensions_are_listed_and_found(tmp_path, name, image_dir, label_dir):
    from ovseg_jax.data import registry

    (tmp_path / image_dir).mkdir(parents=True)
    (tmp_path / label_dir).mkdir(parents=True)
    image = np.full((3, 4, 3), 40, np.uint8)
    for stem, image_ext, label_ext in (("a", ".JPG", ".PNG"), ("b", ".jpg", ".Png"), ("c", ".Jpg", ".png")):
        Image.fromarray(image).save(tmp_path / image_dir / f"{stem}{image_ext}", format="JPEG")
        Image.fromarray(np.full((3, 4), 2, np.uint8)).save(tmp_path / label_dir / f"{stem}{label_ext}", format="PNG")
    source = registry.get(name).make_source(tmp_path, "val")
    assert len(source) == 3
    for i in range(3):
        assert source[i]["label"].tolist() == [[2] * 4] * 3


def test_bad_synthetic_class_file_names_the_file(tmp_path):
    from ovseg_jax.data import registry

    (tmp_path / "classes.json").write_text('{"names": ["a"]}')
    with pytest.raises(sources.DatasetLayoutError, match="classes.json: not a synthetic-world class file.*'seen'"):
        registry.get("synthetic").make_source(tmp_path, "train")


def test_rle_of_another_size_is_refused_before_decoding(tmp_path):
    from ovseg_jax.data import crops

    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / "i.png")
    record = crops.PairRecord(str(tmp_path / "i.png"), {"size": [4000, 5000], "counts": [0, 4000 * 5000]}, "x")
    with pytest.raises(sources.BadExampleError, match=r"RLE size \[4000, 5000\] differs from the image size \[4, 5\]"):
        crops.region_of(record)


def test_binary_pairs_file_is_not_text(tmp_path):
    from ovseg_jax.data import crops

    (tmp_path / "pairs.jsonl").write_bytes(b"\xff\xfe\x00\x81 binary")
    with pytest.raises(ValueError, match="pairs.jsonl: not a text file"):
        crops.read_pairs(tmp_path / "pairs.jsonl")


# --------------------------------------------------------------------------------------------
# Evaluation over a split with bad examples


class _ConstantPredictor:
    """Predicts class 0 everywhere: enough to count what the evaluation sees."""

    def predict(self, image, class_names, *, resized_hw, original_hw):
        return np.zeros(original_hw, np.int32)


@pytest.fixture(scope="module")
def eval_split_with_bad_files(tmp_path_factory):
    from ovseg_jax.data import registry

    root = tmp_path_factory.mktemp("evalsplit")
    image_dir, label_dir = root / "ADEChallengeData2016/images/validation", \
        root / "ADEChallengeData2016/annotations_detectron2/validation"
    image_dir.mkdir(parents=True)
    label_dir.mkdir(parents=True)
    for stem in ("0_good", "1_corrupt", "2_good", "3_nolabel"):
        Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(image_dir / f"{stem}.jpg")
        Image.fromarray(np.zeros((6, 8), np.uint8)).save(label_dir / f"{stem}.png")
    (image_dir / "1_corrupt.jpg").write_bytes(b"not a jpeg")
    (label_dir / "3_nolabel.png").unlink()
    return registry.get("ade20k_150").make_source(root, "val")


def test_evaluation_skips_and_counts_bad_examples(eval_split_with_bad_files, caplog):
    from ovseg_jax.data import pipeline
    from ovseg_jax.evaluation.evaluator import evaluate_dataset

    source = eval_split_with_bad_files
    examples = pipeline.eval_loader(source, short=8, max_size=16, bucket=32, process_index=0, process_count=1)
    with caplog.at_level("WARNING"):
        metrics = evaluate_dataset(_ConstantPredictor(), examples, source.class_names, ignore_value=255, log_every=0)
    assert metrics["images"] == 2 and metrics["skipped"] == 2
    assert metrics["pACC"] == 100.0  # the two good all-zero labels, predicted 0
    assert "1_corrupt.jpg" in caplog.text and "3_nolabel.png" in caplog.text
    assert "skipped 2 bad example(s)" in caplog.text


def test_evaluation_can_still_stop_at_a_bad_example(eval_split_with_bad_files):
    from ovseg_jax.data import pipeline
    from ovseg_jax.evaluation.evaluator import evaluate_dataset

    source = eval_split_with_bad_files
    examples = pipeline.eval_loader(source, short=8, max_size=16, bucket=32, process_index=0, process_count=1,
                                    skip_bad_examples=False)
    with pytest.raises(sources.BadExampleError, match="1_corrupt.jpg"):
        evaluate_dataset(_ConstantPredictor(), examples, source.class_names, ignore_value=255, log_every=0)


def test_resizing_to_or_from_nothing_is_refused():
    from ovseg_jax.utils.image_ops import resize_bilinear
    from ovseg_jax.inference.ensemble import predict_labels

    with pytest.raises(ValueError, match="cannot resize 4x5 to 0x3"):
        resize_bilinear(np.zeros((1, 4, 5, 2), np.float32), (0, 3))
    with pytest.raises(ValueError, match="cannot resize 0x5 to 2x3"):
        resize_bilinear(np.zeros((1, 0, 5, 2), np.float32), (2, 3))
    with pytest.raises(ValueError, match="cannot resize 4x5 to 0x0"):
        predict_labels(np.zeros((4, 5, 3), np.float32), (0, 0))
