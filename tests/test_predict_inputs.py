"""What the predictor accepts, converts or refuses: image dtypes, channels, sizes, class names."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx
from PIL import Image

import ovseg_jax.clip as oclip
from ovseg_jax.inference.ensemble import Predictor
from ovseg_jax.models.clip import CLIP, ClipConfig
from ovseg_jax.models.maskformer import Segmenter, SegmenterConfig
from ovseg_jax.models.swin import SwinConfig
from ovseg_jax.text import Tokenizer, VILD_TEMPLATES, write_word_vocab

CLASSES = ["red circle", "green square", "blue triangle", "yellow sky", "grass"]


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    """Random tiny models built in JAX (no checkpoint): these tests are about inputs, not weights."""
    directory = tmp_path_factory.mktemp("tokenizer")
    write_word_vocab(sorted({w for t in VILD_TEMPLATES for w in t.replace("{}", " ").replace(".", " ").split()}
                            | {w for n in CLASSES for w in n.split()}), directory)
    tok = Tokenizer.from_dir(directory, context_length=16)
    clip_config = ClipConfig(embed_dim=16, image_size=32, patch_size=8, vision_width=32, vision_layers=1,
                             vision_heads=2, vision_mlp_dim=64, context_length=16, vocab_size=tok.vocab_size,
                             text_width=32, text_layers=1, text_heads=2, text_mlp_dim=64,
                             eot_token_id=tok.eot_token_id, mask_prompt_depth=1)
    clip = oclip.Clip(CLIP(clip_config, rngs=nnx.Rngs(0)), tok)
    config = SegmenterConfig(backbone_config=SwinConfig.tiny_test(), num_queries=6, hidden_dim=32, conv_dim=32,
                             mask_dim=32, dec_layers=2, nheads=2, dim_feedforward=32, class_hidden_dim=32,
                             clip_dim=clip_config.embed_dim)
    return Predictor(Segmenter(config, rngs=nnx.Rngs(3)), clip, mask_threshold=0.5, ensemble_weight=0.7)


@pytest.fixture(scope="module")
def image():
    return np.random.RandomState(0).randint(0, 256, (40, 56, 3)).astype(np.uint8)


@pytest.fixture(scope="module")
def scores(predictor, image):
    return np.asarray(predictor.scores(image, CLASSES))


def test_nan_pixels_are_refused(predictor, image):
    bad = image / 255.0
    bad[3, 4, 1] = np.nan
    with pytest.raises(ValueError, match="1 pixels with NaN or inf"):
        predictor.predict(bad, CLASSES)


@pytest.mark.slow
def test_float_image_in_unit_range_is_scaled_by_255(predictor, image, scores):
    as_float = image.astype(np.float32) / 255  # round(255 * x) gives the uint8 image back
    np.testing.assert_array_equal(predictor.scores(as_float, CLASSES), scores)


def test_float_image_outside_unit_range_is_refused(predictor, image):
    with pytest.raises(ValueError, match=r"values in \[0, 1\].*got 0\.\.255.*pass the image as uint8"):
        predictor.predict(image.astype(np.float32), CLASSES)


def test_grayscale_and_rgba_are_converted_like_pil(predictor, image, scores):
    gray = image[..., 0]
    as_rgb = np.asarray(Image.fromarray(gray, "L").convert("RGB"))  # PIL's conversion as the reference
    np.testing.assert_array_equal(predictor.scores(gray, CLASSES), predictor.scores(as_rgb, CLASSES))
    rgba = np.concatenate([image, np.full((40, 56, 1), 7, np.uint8)], axis=-1)
    assert np.array_equal(np.asarray(Image.fromarray(rgba, "RGBA").convert("RGB")), image)
    np.testing.assert_array_equal(predictor.scores(rgba, CLASSES), scores)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((40, 56, 2), np.uint8), r"RGB \[H, W, 3\], RGBA \[H, W, 4\] or grayscale \[H, W\]; got shape \(40, 56, 2\)"),
    (np.zeros((0, 0, 3), np.uint8), r"image is empty \(0 x 0 pixels\)"),
    (np.zeros((5, 0), np.uint8), r"image is empty \(5 x 0 pixels\)"),
    (np.full((4, 4, 3), 300, np.int16), r"values in 0\.\.255; got 300\.\.300"),
    (np.zeros((4, 4, 3), bool), "dtype bool not supported"),
], ids=["two-channels", "0x0", "5x0", "int16-range", "bool"])
def test_unusable_images_are_refused(predictor, bad, message):
    with pytest.raises(ValueError, match=message):
        predictor.predict(bad, CLASSES)


@pytest.mark.parametrize("names, message", [
    ([], "class_names is empty"),
    (["cat", " ", "dog", ""], r"positions \[1, 3\] are blank"),
    (["cat", "dog", "cat "], r"duplicate class names: 'cat ' \(positions 0 and 2\)"),
    ("cat", "must be a list of names"),
], ids=["empty", "blank", "duplicate", "string"])
def test_bad_class_lists_are_refused(predictor, image, names, message):
    with pytest.raises(ValueError, match=message):
        predictor.predict(image, names)


def test_huge_image_is_refused_before_anything_is_allocated(predictor):
    huge = np.broadcast_to(np.uint8(0), (20000, 30000, 3))  # 1.8 GB if it were real; a view here
    with pytest.raises(ValueError, match=r"20000 x 30000 pixels is larger than max_pixels.*resize=\(640, 2560\)"):
        predictor.predict(huge, CLASSES)


def test_resize_option_resizes_as_the_reference(predictor, image):
    """resize=(short, max_size): the raw image goes through reference 1.1 (PIL bilinear to short side 40
    here) and the labels come back at the raw size, as predicting on the PIL-resized image does."""
    raw = np.random.RandomState(1).randint(0, 256, (80, 112, 3)).astype(np.uint8)
    resizing = Predictor(predictor.segmenter, predictor.clip, mask_threshold=0.5, ensemble_weight=0.7,
                         resize=(40, 2560))
    seen = []
    model_input = resizing.predict_batch
    resizing.predict_batch = lambda imgs, *a, **k: seen.append(np.asarray(imgs[0])) or model_input(imgs, *a, **k)
    got = resizing.predict(raw, CLASSES)
    small = np.asarray(Image.fromarray(raw).resize((56, 40), Image.BILINEAR))
    assert len(seen) == 1
    np.testing.assert_array_equal(seen[0], small)  # the model saw PIL's resize, nothing else
    assert got.shape == (80, 112)
    np.testing.assert_array_equal(got, predictor.predict(small, CLASSES, original_hw=(80, 112)))


def test_sizes_must_be_positive(predictor, image):
    with pytest.raises(ValueError, match=r"original_hw must be two positive sizes"):
        predictor.predict(image, CLASSES, original_hw=(0, 10))
    with pytest.raises(ValueError, match=r"resized_hw must be two positive sizes"):
        predictor.predict(image, CLASSES, resized_hw=(0, 10))
