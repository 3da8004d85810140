"""End-to-end prediction: wiring against the original's semantic inference, padding invariance."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

import ovseg_jax.clip as oclip
from tests import clip_fixtures as demo
from ovseg_jax.inference.ensemble import Predictor, UNLABELED, combine
from ovseg_jax.inference.masked_crops import masked_crops
from ovseg_jax.models.maskformer import Segmenter, SegmenterConfig, normalize_images
from ovseg_jax.models.swin import SwinConfig
from tests.test_ensemble import original_semantic_inference

CLASSES = demo.CLASS_NAMES


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    clip = oclip.load(demo.build_checkpoint(tmp_path_factory.mktemp("clip"), seed=0), mask_prompt_depth=2)
    config = SegmenterConfig(backbone_config=SwinConfig.tiny_test(), num_queries=6, hidden_dim=32, conv_dim=32,
                             mask_dim=32, dec_layers=2, nheads=2, dim_feedforward=32, class_hidden_dim=32,
                             clip_dim=clip.config.embed_dim)
    segmenter = Segmenter(config, rngs=nnx.Rngs(3))
    return Predictor(segmenter, clip, mask_threshold=0.5, ensemble_weight=0.7)


@pytest.fixture(scope="module")
def image():
    return np.random.RandomState(0).randint(0, 256, (40, 56, 3)).astype(np.uint8)


def segmenter_outputs(segmenter, images, text_bank) -> dict:
    """The segmenter's raw outputs for `images [N, H, W, 3]` (normalised), as one compiled program
    (called eagerly, each of the model's operations compiles on its own: twice the time)."""
    graphdef, state = nnx.split(segmenter)
    return jax.jit(lambda state, x, t: nnx.merge(graphdef, state)(x, t))(state, images, text_bank)


@pytest.mark.slow
def test_scores_equal_the_original_pipeline(predictor, image):
    text = predictor.clip.class_embeddings(CLASSES)
    out = segmenter_outputs(predictor.segmenter, normalize_images(image[None]), text)
    mask_logits = torch.from_numpy(np.array(out["pred_masks"][0]))  # of the input zero-padded to 64 x 64
    probs = F.interpolate(mask_logits[None], scale_factor=4, mode="bilinear", align_corners=False)[0]
    probs = probs[:, :40, :56].sigmoid()
    crops = masked_crops(jnp.asarray(image, jnp.float32), jnp.asarray(probs.numpy()), threshold=0.5,
                         size=predictor.clip.config.image_size)
    valid = np.asarray(crops.valid)
    assert valid.any()
    feats = np.asarray(predictor.clip.encode_image(crops.images, crops.region_masks))
    clip_logits = 100 * feats @ np.asarray(text).T
    clip_logits = np.concatenate([clip_logits, np.zeros_like(clip_logits[:, :1])], axis=1)
    ref = original_semantic_inference(torch.from_numpy(np.asarray(out["pred_logits"][0])), mask_logits,
                                      torch.from_numpy(clip_logits), torch.from_numpy(valid), (40, 56), 0.7)
    got = predictor.scores(image, CLASSES)
    np.testing.assert_allclose(got, ref.permute(1, 2, 0).numpy(), atol=1e-4, rtol=1e-4)
    labels = predictor.predict(image, CLASSES, original_hw=(31, 75))
    expected = F.interpolate(ref[None], size=(31, 75), mode="bilinear", align_corners=False)[0].argmax(0)
    np.testing.assert_array_equal(labels, expected.numpy())


@pytest.mark.slow
def test_padding_beyond_the_resized_image_changes_nothing(predictor, image):
    padded = np.full((64, 64, 3), 255, np.uint8)  # a 64 x 64 bucket filled with garbage
    padded[:40, :56] = image
    plain = predictor.scores(image, CLASSES)
    bucketed = predictor.scores(padded, CLASSES, resized_hw=(40, 56))
    np.testing.assert_allclose(bucketed[:40, :56], plain, atol=1e-5)
    assert float(jnp.abs(bucketed[40:]).max()) == 0.0
    np.testing.assert_array_equal(predictor.predict(padded, CLASSES, resized_hw=(40, 56), original_hw=(20, 28)),
                                  predictor.predict(image, CLASSES, original_hw=(20, 28)))


@pytest.mark.slow
def test_a_batch_equals_its_images_one_by_one(predictor, image):
    """Two images of different resized sizes in one padded batch: one device call, same labels."""
    other = np.random.RandomState(5).randint(0, 256, (33, 64, 3)).astype(np.uint8)
    batch = np.zeros((2, 64, 64, 3), np.uint8)
    batch[0, :40, :56], batch[1, :33, :64] = image, other
    got = predictor.predict_batch(batch, CLASSES, resized_hw=[(40, 56), (33, 64)], original_hw=[(40, 56), (50, 97)])
    np.testing.assert_array_equal(got[0].labels, predictor.predict(image, CLASSES))
    np.testing.assert_array_equal(got[1].labels, predictor.predict(other, CLASSES, original_hw=(50, 97)))
    assert got[1].confidence.shape == (50, 97) and (got[1].confidence > 0).all()


@pytest.mark.slow
def test_the_pieces_recombine_into_the_scores(predictor, image):
    """`proposals` + `classify_crops` + `combine` (what sweeps and mining use) give `scores`."""
    proposals = predictor.proposals(image, CLASSES)
    clip_logits, valid = predictor.classify_crops(image, proposals.mask_probs, CLASSES)
    got = combine(proposals, clip_logits, valid, ensemble_weight=0.7)
    np.testing.assert_allclose(got, predictor.scores(image, CLASSES), atol=1e-5)


@pytest.mark.slow
def test_demo_mode_gives_a_single_class_the_competitor_others(predictor, image):
    demo_mode = Predictor(predictor.segmenter, predictor.clip, mask_threshold=0.5, ensemble_weight=0.0, mode="demo")
    assert demo_mode.scores(image, CLASSES[:1]).shape == (40, 56, 2)
    labels = demo_mode.predict(image, CLASSES[:1])
    assert set(np.unique(labels)) <= {UNLABELED, 0}
    labels = demo_mode.predict(image, CLASSES)
    assert set(np.unique(labels)) <= {UNLABELED, *range(len(CLASSES))}
    with pytest.raises(ValueError, match="demo mode classifies with CLIP"):
        Predictor(predictor.segmenter, predictor.clip, ensemble_weight=None, mode="demo")
    with pytest.raises(ValueError, match="mode 'panoptic' unknown"):
        Predictor(predictor.segmenter, predictor.clip, mode="panoptic")
