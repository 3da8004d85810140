"""SAM (ovseg_jax.models.sam, ovseg_jax.sam) against segment_anything and transformers' SamModel:
image encoder, prompt encoder, mask decoder and mask upscaling in float32 (1e-4), checkpoint
loading and export in both layouts, architecture inference, bfloat16, scan/remat, bad files."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import ovseg_jax.sam as osam
from ovseg_jax.convert import sam_keys
from ovseg_jax.convert.params import model_shapes
from ovseg_jax.convert.torch_io import CheckpointError
from ovseg_jax.models.layers import set_stack_options
from ovseg_jax.models.sam import SamConfig, abstract_sam
from ovseg_jax.models.sam.image_encoder import block_period
from ovseg_jax.models.sam.transforms import ResizeLongestSide
from tests.sam_reference import import_segment_anything, randomize_, tiny_sam

import_segment_anything()
from segment_anything import SamPredictor, sam_model_registry  # noqa: E402
from segment_anything.utils.transforms import ResizeLongestSide as RefResizeLongestSide  # noqa: E402

TOL = 1e-4
# Two photos' sizes: one is upscaled to the 128 input (96 x 75 -> 128 x 100), one kept (60 x 128).
IMAGE_SIZES = ((96, 75), (60, 128))


def t(x):
    return torch.from_numpy(np.asarray(x))


@functools.partial(jax.jit, static_argnums=(0, 6))
def decode(graphdef, state, embeddings, coords, labels, boxes_and_masks, multimask_output):
    return nnx.merge(graphdef, state).predict_masks(embeddings, coords, labels, *boxes_and_masks,
                                                    multimask_output=multimask_output)


@functools.partial(jax.jit, static_argnums=0)
def encode(graphdef, state, images):
    return nnx.merge(graphdef, state).image_embeddings(images)


@functools.partial(jax.jit, static_argnums=0)
def encode_prompts(graphdef, state, points, boxes, masks):
    return nnx.merge(graphdef, state).prompt_encoder(points, boxes, masks)


def run_decoder(model, embeddings, coords, labels, boxes=None, masks=None, *, multimask_output):
    return decode(*nnx.split(model), embeddings, coords, labels, (boxes, masks), multimask_output)


# --------------------------------------------------------------------------------------------
# Fixtures: one random reference, saved with torch.save and loaded through ovseg_jax.sam.load


@pytest.fixture(scope="module")
def reference():
    return tiny_sam()


@pytest.fixture(scope="module")
def checkpoint(reference, tmp_path_factory):
    path = tmp_path_factory.mktemp("sam") / "sam_tiny.pth"
    torch.save(reference.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def sam(checkpoint):
    return osam.load(checkpoint)


@pytest.fixture(scope="module")
def images():
    rs = np.random.RandomState(0)
    return [rs.randint(0, 256, size + (3,)).astype(np.uint8) for size in IMAGE_SIZES]


@pytest.fixture(scope="module")
def ref_features(reference, images):
    """SamPredictor.set_image per image -> [(features [1, C, h, w], input_size, original_size)]."""
    predictor = SamPredictor(reference)
    out = []
    for image in images:
        predictor.set_image(image)
        out.append((predictor.features, predictor.input_size, predictor.original_size))
    return out


@pytest.fixture(scope="module")
def embeddings(sam, images):
    return [sam.embed(image) for image in images]


@pytest.fixture(scope="module")
def prompts():
    """Prompt sets for 2 images x 3 sets in the 128 x 128 input frame: 2 points each (some padding
    labels), a box each, a low-resolution mask each."""
    rs = np.random.RandomState(1)
    coords = rs.uniform(0, 128, (2, 3, 2, 2)).astype(np.float32)
    labels = np.array([[[1, 0], [1, -1], [0, 1]], [[1, 1], [-1, 0], [1, 0]]], np.int32)
    x0y0 = rs.uniform(0, 80, (2, 3, 2))
    boxes = np.concatenate([x0y0, x0y0 + rs.uniform(5, 48, (2, 3, 2))], axis=-1).astype(np.float32)
    masks = (3 * rs.randn(2, 3, 32, 32)).astype(np.float32)
    return coords, labels, boxes, masks


def ref_decode(reference, features, coords, labels, boxes, masks, multimask_output):
    with torch.no_grad():
        sparse, dense = reference.prompt_encoder(
            points=None if coords is None else (t(coords), t(labels)), boxes=None if boxes is None else t(boxes),
            masks=None if masks is None else t(masks)[:, None])
        return reference.mask_decoder(features, reference.prompt_encoder.get_dense_pe(), sparse, dense,
                                      multimask_output)


# --------------------------------------------------------------------------------------------
# Parity with segment_anything (float32)


def test_preprocess_equals_reference(reference, sam):
    image = np.random.RandomState(2).uniform(0, 255, (2, 128, 100, 3)).astype(np.float32)
    with torch.no_grad():
        want = torch.stack([reference.preprocess(t(x).permute(2, 0, 1)) for x in image]).permute(0, 2, 3, 1)
    np.testing.assert_allclose(sam.model.preprocess(image), want.numpy(), atol=1e-5)


def test_resize_longest_side_equals_reference(images):
    ours, ref = ResizeLongestSide(128), RefResizeLongestSide(128)
    for size in ((96, 75), (60, 128), (480, 640), (333, 517), (1, 1000)):
        assert ours.target_size(size) == ref.get_preprocess_shape(*size, 128)
        coords = np.random.RandomState(3).uniform(0, 500, (4, 3, 2))
        np.testing.assert_array_equal(ours.apply_coords(coords, size), ref.apply_coords(coords, size))
        np.testing.assert_array_equal(ours.apply_boxes(coords.reshape(6, 4), size),
                                      ref.apply_boxes(coords.reshape(6, 4), size))
    for image in images:
        np.testing.assert_array_equal(ours.apply_image(image), ref.apply_image(image))


def test_image_embeddings_equal_reference(embeddings, ref_features):
    for ours, (features, input_size, original_size) in zip(embeddings, ref_features):
        assert (ours.input_size, ours.original_size) == (tuple(input_size), tuple(original_size))
        np.testing.assert_allclose(ours.embedding, features[0].permute(1, 2, 0).numpy(), atol=TOL)


def test_windowed_and_global_blocks_both_present(sam):
    windows = sam.model.image_encoder.window_sizes
    assert windows == (3, 0, 3, 0) and sam.config.grid_size % 3  # the 8 x 8 grid is padded to 9 x 9
    assert block_period(windows) == 2


def test_prompt_encoder_equals_reference(reference, sam, prompts):
    coords, labels, boxes, masks = (p[0] for p in prompts)
    cases = {"points (padded)": ((coords, labels), None, None), "points and boxes": ((coords, labels), boxes, None),
             "boxes": (None, boxes, None), "masks": ((coords, labels), None, masks)}
    for name, (points, box, mask) in cases.items():
        sparse, dense = encode_prompts(*nnx.split(sam.model), points, box, mask)
        with torch.no_grad():
            want_sparse, want_dense = reference.prompt_encoder(
                points=None if points is None else (t(coords), t(labels)),
                boxes=None if box is None else t(box), masks=None if mask is None else t(mask)[:, None])
        want_dense = want_dense.permute(0, 2, 3, 1).detach().numpy()  # no mask: an expanded parameter
        np.testing.assert_allclose(sparse, want_sparse.numpy(), atol=TOL, err_msg=name)
        np.testing.assert_allclose(np.broadcast_to(dense, want_dense.shape), want_dense, atol=TOL, err_msg=name)
    with torch.no_grad():
        want_pe = reference.prompt_encoder.get_dense_pe()[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(sam.model.prompt_encoder.get_dense_pe(), want_pe, atol=1e-5)


def test_mask_decoder_equals_reference(reference, sam, embeddings, ref_features, prompts):
    """Two images with three prompt sets each (points, some padding labels; one padding point is
    appended), three masks per set."""
    coords, labels, _, _ = prompts
    stacked = jnp.stack([e.embedding for e in embeddings])
    low_res, iou = run_decoder(sam.model, stacked, coords, labels, multimask_output=True)
    assert low_res.shape == (2, 3, 3, 32, 32) and iou.shape == (2, 3, 3) and low_res.dtype == jnp.float32
    for b, (features, _, _) in enumerate(ref_features):
        want_masks, want_iou = ref_decode(reference, features, coords[b], labels[b], None, None, True)
        np.testing.assert_allclose(low_res[b], want_masks.numpy(), atol=TOL)
        np.testing.assert_allclose(iou[b], want_iou.numpy(), atol=TOL)


@pytest.mark.parametrize("input_size, original_size", [((128, 100), (96, 75)), ((60, 128), (60, 128)),
                                                       ((128, 100), (300, 234))])
def test_postprocess_masks_equals_reference(reference, sam, input_size, original_size):
    low_res = np.random.RandomState(4).randn(2, 3, 32, 32).astype(np.float32)
    with torch.no_grad():
        want = reference.postprocess_masks(t(low_res), input_size, original_size).numpy()
    np.testing.assert_allclose(sam.model.postprocess_masks(low_res, input_size, original_size), want, atol=TOL)


def test_predict_equals_sam_predictor(reference, sam, images, embeddings):
    """The public path (SamPredictor.predict_torch): prompts in the original image's pixels (points,
    boxes and a previous low-resolution mask), one mask per set, upscaled to the original size."""
    image, embedding = images[0], embeddings[0]
    rs = np.random.RandomState(5)
    coords = rs.uniform(0, 75, (4, 2, 2))
    labels = np.array([[1, 0], [1, 1], [0, 1], [1, -1]])
    boxes = np.concatenate([coords[:, 0], coords[:, 0] + 20], axis=-1)
    mask_input = (3 * rs.randn(4, 32, 32)).astype(np.float32)
    masks, iou, low_res = sam.predict(embedding, coords, labels, boxes, mask_input, multimask_output=False,
                                      return_logits=True)
    predictor = SamPredictor(reference)
    predictor.set_image(image)
    with torch.no_grad():
        want_masks, want_iou, want_low_res = predictor.predict_torch(
            t(predictor.transform.apply_coords(coords, image.shape[:2])).float(), t(labels),
            t(predictor.transform.apply_boxes(boxes, image.shape[:2])).float(), t(mask_input)[:, None],
            multimask_output=False, return_logits=True)
    assert masks.shape == (4, 1) + image.shape[:2] and iou.shape == (4, 1) and low_res.shape == (4, 1, 32, 32)
    np.testing.assert_allclose(low_res, want_low_res.numpy(), atol=TOL)
    np.testing.assert_allclose(iou, want_iou.numpy(), atol=TOL)
    np.testing.assert_allclose(masks, want_masks.numpy(), atol=TOL)


# --------------------------------------------------------------------------------------------
# Export round trips (the reference loads what we write)


def test_export_segment_anything_round_trip(reference, sam, checkpoint, tmp_path):
    path = osam.export(sam, tmp_path / "exported.pth")
    written = torch.load(path, weights_only=True)
    original = torch.load(checkpoint, weights_only=True)
    assert set(written) == set(original)
    for key, value in original.items():
        torch.testing.assert_close(written[key], value, rtol=0, atol=0, msg=key)
    rebuilt = tiny_sam(seed=7)  # different random weights, then the exported ones
    rebuilt.load_state_dict(written)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.image_encoder(x), reference.image_encoder(x), rtol=0, atol=0)


def test_export_transformers_round_trip(sam, embeddings, ref_features, prompts, tmp_path):
    from transformers import SamModel as HFSamModel

    directory = osam.export(sam, tmp_path / "hf", format="transformers")
    model = HFSamModel.from_pretrained(directory).eval()
    coords, labels, _, _ = prompts
    features = torch.cat([f for f, _, _ in ref_features])
    with torch.no_grad():
        out = model(image_embeddings=features, input_points=t(coords), input_labels=t(labels), multimask_output=True)
    # transformers' two-way blocks use the eps of its config (written from ours: 1e-5, as segment_anything)
    low_res, iou = run_decoder(sam.model, jnp.stack([e.embedding for e in embeddings]), coords, labels,
                               multimask_output=True)
    np.testing.assert_allclose(low_res, out.pred_masks.numpy(), atol=TOL)
    np.testing.assert_allclose(iou, out.iou_scores.numpy(), atol=TOL)
    assert osam.load(directory).config == sam.config


# --------------------------------------------------------------------------------------------
# transformers SamModel parity (its own random model, saved with save_pretrained)


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    from transformers import SamConfig as HFSamConfig
    from transformers import SamModel as HFSamModel

    config = HFSamConfig(
        vision_config=dict(hidden_size=24, output_channels=16, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=16, mlp_dim=40, window_size=3, global_attn_indexes=[1],
                           num_pos_feats=8),
        prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=16, mask_input_channels=8),
        mask_decoder_config=dict(hidden_size=16, mlp_dim=24, num_hidden_layers=2, num_attention_heads=2,
                                 iou_head_hidden_dim=20, iou_head_depth=4))
    torch.manual_seed(0)
    model = HFSamModel(config).eval()
    randomize_(model, seed=11, scale=0.3)
    directory = tmp_path_factory.mktemp("hf_sam")
    model.save_pretrained(directory)
    return model, osam.load(directory)


def test_transformers_config_is_read(hf_pair):
    _, sam = hf_pair
    assert sam.config == SamConfig(
        image_size=64, patch_size=16, encoder_width=24, encoder_depth=2, encoder_heads=2, encoder_mlp_dim=40,
        window_size=3, global_attn_indexes=(1,), prompt_embed_dim=16, mask_in_chans=8, decoder_depth=2,
        decoder_heads=2, decoder_mlp_dim=24, iou_head_depth=4, iou_head_hidden_dim=20, decoder_norm_eps=1e-6)


@pytest.mark.slow
def test_transformers_outputs_equal(hf_pair):
    """A 4 x 4 grid in 3 x 3 windows (padded to 6 x 6) and one global block; points, boxes, a mask."""
    model, sam = hf_pair
    rs = np.random.RandomState(6)
    pixels = rs.randn(1, 64, 64, 3).astype(np.float32)
    coords = rs.uniform(0, 64, (1, 2, 3, 2)).astype(np.float32)
    labels = np.array([[[1, 0, -1], [1, 1, 0]]], np.int32)
    boxes = np.array([[[4, 6, 40, 30], [10, 0, 63, 50]]], np.float32)
    mask = (2 * rs.randn(1, 1, 16, 16)).astype(np.float32)
    with torch.no_grad():
        out = model(pixel_values=t(pixels).permute(0, 3, 1, 2), input_points=t(coords), input_labels=t(labels),
                    input_boxes=t(boxes), input_masks=t(mask), multimask_output=True)
        want_embedding = model.get_image_embeddings(t(pixels).permute(0, 3, 1, 2))
    embedding = encode(*nnx.split(sam.model), pixels)
    np.testing.assert_allclose(embedding, want_embedding.permute(0, 2, 3, 1).numpy(), atol=TOL)
    low_res, iou = run_decoder(sam.model, embedding, coords, labels, boxes,
                               np.broadcast_to(mask, (1, 2, 16, 16)), multimask_output=True)
    np.testing.assert_allclose(low_res, out.pred_masks.numpy(), atol=TOL)
    np.testing.assert_allclose(iou, out.iou_scores.numpy(), atol=TOL)


# --------------------------------------------------------------------------------------------
# Architecture of the released models


def _torch_shapes_of(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """Our parameter shapes under PyTorch names and layouts (Linear [out, in], Conv [out, in, kh, kw],
    ConvTranspose [in, out, kh, kw]), without materialising the parameters."""
    out = {}
    for path, shape in model_shapes(model).items():
        *stem, last = (str(p) for p in path)
        name = ".".join(stem + ["weight" if last in ("kernel", "scale", "embedding") else last])
        if last == "kernel" and len(shape) == 2:
            shape = shape[::-1]
        elif last == "kernel" and len(shape) == 4:
            transposed = ".".join(stem) in sam_keys.TRANSPOSED_CONVS
            shape = (shape[2], shape[3], *shape[:2]) if transposed else (shape[3], shape[2], *shape[:2])
        out[name] = tuple(shape)
    return out


def reference_shapes(size: str) -> dict:
    """The released `size`'s segment_anything state dict as meta tensors (shapes only: nothing is
    allocated or initialised)."""
    with torch.device("meta"):
        return sam_model_registry[size]().state_dict()


@pytest.mark.parametrize("size", ["vit_b", "vit_l", "vit_h"])
def test_released_architectures_are_inferred(size):
    config = getattr(SamConfig, size)()
    assert sam_keys.config_from_segment_anything(reference_shapes(size), size) == config
    assert block_period(tuple(0 if i in config.global_attn_indexes else 14 for i in range(config.encoder_depth))) \
        == config.encoder_depth // 4  # scanned in 4 groups


def test_vit_h_parameters_have_the_reference_shapes():
    ours = abstract_sam(SamConfig.vit_h())  # nnx.eval_shape
    assert _torch_shapes_of(ours) == {k: tuple(v.shape) for k, v in reference_shapes("vit_h").items()}


# --------------------------------------------------------------------------------------------
# Compute options


def relative_errors(got, want) -> tuple[float, float]:
    """(largest |got - want| / largest |want|, mean |got - want| / mean |want|)."""
    diff, want = np.abs(np.asarray(got, np.float64) - want), np.abs(np.asarray(want, np.float64))
    return diff.max() / want.max(), diff.mean() / want.mean()


@pytest.mark.slow
def test_bfloat16_close_to_float32(checkpoint, sam, images, embeddings, prompts):
    """bfloat16 compute (float32 parameters, float32 accumulation): the embedding within 4% of its
    largest float32 magnitude (2% on average; measured 1.4% / 0.9%), the mask logits within 6% (4%
    on average; measured 2.9% / 2.1%), IoU predictions within 3% (measured 1.2%)."""
    half = osam.load(checkpoint, dtype=jnp.bfloat16)
    embedding = half.embed(images[0]).embedding
    assert embedding.dtype == jnp.float32
    worst, mean = relative_errors(embedding, embeddings[0].embedding)
    assert worst < 0.04 and mean < 0.02, (worst, mean)
    coords, labels, _, _ = prompts
    stacked = jnp.stack([e.embedding for e in embeddings])
    want_masks, want_iou = run_decoder(sam.model, stacked, coords, labels, multimask_output=True)
    low_res, iou = run_decoder(half.model, stacked, coords, labels, multimask_output=True)
    assert low_res.dtype == iou.dtype == jnp.float32
    worst, mean = relative_errors(low_res, want_masks)
    assert worst < 0.06 and mean < 0.04, (worst, mean)
    assert relative_errors(iou, want_iou)[0] < 0.03


@pytest.mark.slow
def test_scan_and_remat_equal_loop(checkpoint, sam, embeddings, images, prompts):
    scanned = osam.load(checkpoint)
    set_stack_options(scanned.model, scan_layers=True, remat="dots")
    np.testing.assert_allclose(scanned.embed(images[0]).embedding, embeddings[0].embedding, atol=1e-5)
    coords, labels, _, _ = prompts
    stacked = jnp.stack([e.embedding for e in embeddings])
    loop_out = run_decoder(sam.model, stacked, coords, labels, multimask_output=True)
    scan_out = run_decoder(scanned.model, stacked, coords, labels, multimask_output=True)
    for got, want in zip(scan_out, loop_out):
        np.testing.assert_allclose(got, want, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Bad inputs


def test_clip_checkpoint_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "ViT-B-16.pt"
    torch.save({"visual.conv1.weight": torch.zeros(8, 3, 4, 4), "token_embedding.weight": torch.zeros(10, 8)}, path)
    with pytest.raises(CheckpointError, match=r"ViT-B-16\.pt: not a SAM checkpoint"):
        osam.load(path)


def test_incomplete_checkpoint_lists_missing_keys(reference, tmp_path):
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("mask_decoder.iou_token")}
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"(?s)partial\.pth.*missing parameters \(1\): mask_decoder\.iou_token"):
        osam.load(path)


def test_unknown_architecture_is_refused(reference, tmp_path):
    state = dict(reference.state_dict())
    state["image_encoder.blocks.2.attn.rel_pos_h"] = torch.zeros(9, 16)  # a 5 x 5 window next to 3 x 3 ones
    path = tmp_path / "odd.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"odd\.pth: windowed blocks .* windows \[3, 5\]"):
        osam.load(path)
