"""What lets a `Predictor` compile once per image shape (an interactive app's new class list or
slider value must not recompile): class lists padded to a bucket (`class_bucket=16`; the padded
classes change no real class's probability or score and never win a pixel), and the mask threshold
and λ traced. References: the unpadded predictor (`class_bucket=1`, the path the parity tests check
against the original), numpy's softmax, and the pieces (`proposals`, `classify_crops`, `combine`)
with the settings as Python numbers."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

import ovseg_jax.clip as oclip
from ovseg_jax.inference import ensemble
from ovseg_jax.inference.ensemble import Predictor, UNLABELED, combine, mask_padded_classes, pad_classes
from ovseg_jax.models.clip import CLIP, ClipConfig
from ovseg_jax.models.maskformer import Segmenter, SegmenterConfig
from ovseg_jax.models.swin import SwinConfig
from ovseg_jax.text import Tokenizer, write_word_vocab

NAMES = ["red circle", "green square", "blue triangle", "yellow sky", "grass", "sand", "snow", "dotted wall",
         "checkered floor", "water", "tree"]
TEMPLATES = ["a {}"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(segmenter, clip): random tiny models built in JAX; these tests compare two paths of one model."""
    directory = tmp_path_factory.mktemp("tokenizer")
    write_word_vocab(sorted({w for n in NAMES + ["a others"] for w in n.split()}), directory)
    tok = Tokenizer.from_dir(directory, context_length=8)
    clip_config = ClipConfig(embed_dim=16, image_size=32, patch_size=8, vision_width=32, vision_layers=1,
                             vision_heads=2, vision_mlp_dim=64, context_length=8, vocab_size=tok.vocab_size,
                             text_width=32, text_layers=1, text_heads=2, text_mlp_dim=64,
                             eot_token_id=tok.eot_token_id, mask_prompt_depth=1)
    clip = oclip.Clip(CLIP(clip_config, rngs=nnx.Rngs(0)), tok)
    config = SegmenterConfig(backbone_config=SwinConfig.tiny_test(), num_queries=6, hidden_dim=32, conv_dim=32,
                             mask_dim=32, dec_layers=2, nheads=2, dim_feedforward=32, class_hidden_dim=32,
                             clip_dim=clip_config.embed_dim)
    return Segmenter(config, rngs=nnx.Rngs(3)), clip


@pytest.fixture(scope="module")
def image():
    return np.random.RandomState(0).randint(0, 256, (40, 56, 3)).astype(np.uint8)


def numpy_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_padding_rounds_the_bank_up_to_the_bucket_with_zero_rows():
    bank = np.random.RandomState(1).randn(5, 8).astype(np.float32)
    padded = np.asarray(pad_classes(bank, 16))
    assert padded.shape == (16, 8)
    np.testing.assert_array_equal(padded[:5], bank)
    assert not padded[5:].any()
    assert pad_classes(np.zeros((32, 8)), 16).shape == (32, 8)


def test_masked_padded_logits_leave_the_real_softmax_unchanged():
    """5 real classes + non-object, padded to 16 + 1: the softmax over the real columns and the
    non-object column equals numpy's softmax of the unpadded logits; padded classes get 0."""
    logits = 30 * np.random.RandomState(2).randn(6, 6).astype(np.float32)  # [Q, C+1], C = 5
    padded = np.concatenate([logits[:, :5], np.full((6, 11), 7.0, np.float32), logits[:, 5:]], axis=1)
    probs = np.asarray(jax.nn.softmax(mask_padded_classes(padded, 5), axis=-1))
    expected = numpy_softmax(logits.astype(np.float64))
    np.testing.assert_allclose(probs[:, :5], expected[:, :5], atol=1e-7, rtol=1e-6)
    np.testing.assert_allclose(probs[:, -1], expected[:, -1], atol=1e-7, rtol=1e-6)
    assert (probs[:, 5:16] == 0).all()


@pytest.mark.slow
@pytest.mark.parametrize("mode, weight, count", [("semantic", 0.7, 5), ("demo", 0.0, 1)],
                         ids=["semantic", "demo-one-name-and-others"])
def test_padded_bank_gives_the_unpadded_scores_and_labels(models, image, mode, weight, count):
    segmenter, clip = models
    names = NAMES[:count]
    settings = dict(mode=mode, ensemble_weight=weight, mask_threshold=0.5, templates=TEMPLATES)
    padded = Predictor(segmenter, clip, class_bucket=16, **settings)
    plain = Predictor(segmenter, clip, class_bucket=1, **settings)
    got, want = padded.predict_batch([image], names)[0], plain.predict_batch([image], names)[0]
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_allclose(got.confidence, want.confidence, atol=1e-6)
    scores = np.asarray(padded.scores(image, names))
    assert scores.shape[-1] == (2 if count == 1 else count)  # demo mode's single name competes with "others"
    np.testing.assert_allclose(scores, np.asarray(plain.scores(image, names)), atol=1e-6)
    labels = got.labels
    assert labels.min() >= (UNLABELED if mode == "demo" else 0) and labels.max() < count


@pytest.mark.slow
def test_class_lists_of_three_lengths_compile_once(models):
    """2, 5 and 11 names (all under the bucket of 16), on an image shape no other test uses."""
    segmenter, clip = models
    predictor = Predictor(segmenter, clip, mask_threshold=0.5, ensemble_weight=0.7, templates=TEMPLATES)
    image = np.random.RandomState(3).randint(0, 256, (24, 72, 3)).astype(np.uint8)
    before = ensemble._scores_jit._cache_size()
    for count in (2, 5, 11):
        labels = predictor.predict(image, NAMES[:count])
        assert labels.shape == (24, 72) and labels.max() < count
    assert ensemble._scores_jit._cache_size() - before == 1


@pytest.mark.slow
def test_other_thresholds_and_weights_reuse_the_program(models, image):
    """Settings a slider gives (λ 0.3 and 0 = CLIP only; thresholds 0.3, 0.6) after a first
    prediction at (0.7, 0.5) on an image shape no other test uses: no new program, and each equals
    the pieces combined with the settings as Python numbers."""
    segmenter, clip = models
    names = NAMES[:4]
    shape_image = np.random.RandomState(4).randint(0, 256, (32, 48, 3)).astype(np.uint8)
    Predictor(segmenter, clip, mask_threshold=0.5, ensemble_weight=0.7, templates=TEMPLATES).scores(shape_image, names)
    before = ensemble._scores_jit._cache_size()
    for weight, threshold in ((0.3, 0.3), (0.0, 0.6)):
        predictor = Predictor(segmenter, clip, mask_threshold=threshold, ensemble_weight=weight, templates=TEMPLATES)
        proposals = predictor.proposals(shape_image, names)
        clip_logits, valid = predictor.classify_crops(shape_image, proposals.mask_probs, names)
        want = combine(proposals, clip_logits, valid, ensemble_weight=weight)
        np.testing.assert_allclose(predictor.scores(shape_image, names), want, atol=1e-5)
    assert ensemble._scores_jit._cache_size() == before


def test_new_names_reuse_one_text_tower_program_and_equal_the_batched_encoding(models):
    """Requests adding 1, 3 and 7 new names (each up to `clip._FEW_NAMES`) with three templates compile
    the text tower for one shape; the embeddings equal the template ensemble computed from one
    batched `encode_text` of every text."""
    _, clip = models
    templates = ["a {}", "a a {}", "{}"]
    fresh = oclip.Clip(clip.model, clip.tokenizer)  # an empty name cache
    before = oclip._normalized_text_features._cache_size()
    got = {}
    for names in (NAMES[:1], NAMES[1:4], NAMES[4:11]):
        got.update(zip(names, np.asarray(fresh.class_embeddings(names, templates))))
    assert oclip._normalized_text_features._cache_size() - before == 1
    texts = np.asarray(clip.encode_text([t.format(n) for n in NAMES for t in templates]))
    want = texts.reshape(len(NAMES), len(templates), -1).mean(axis=1)
    want /= np.linalg.norm(want, axis=-1, keepdims=True)
    np.testing.assert_allclose(np.stack([got[n] for n in NAMES]), want, atol=1e-6)
