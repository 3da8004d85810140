"""OVSeg + SAM (`ovseg_jax.inference.sam_proposals`): the Space's SAM demo against an independent
torch implementation of its classification step, on the masks of segment_anything's own generator
(tiny random SAM) and a tiny mask-prompted CLIP; the semantic rule (with the remainder proposal);
the union with the segmenter's proposals; and the commands with `--proposals sam`."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import ovseg_jax.clip as oclip
from ovseg_jax.inference.ensemble import UNLABELED, Predictor, Proposals, combine
from ovseg_jax.inference.masked_crops import CLIP_MEAN, CLIP_STD
from ovseg_jax.inference.sam_proposals import (SPACE_TEMPLATES, SamProposals, granular_picks, mask_budget,
                                               not_released_reason, parse_sam_options, sam_scores)
from ovseg_jax.text import Tokenizer, write_word_vocab
from tests.sam_reference import import_segment_anything, tiny_sam
from tests.torch_clip_reference import OpenAIClip

import_segment_anything()
from segment_anything import SamAutomaticMaskGenerator  # noqa: E402

PHOTO = Path(__file__).parent / "assets" / "chelsea_150x100.png"  # scikit-image's chelsea.png (CC0), downscaled
NAMES = ["cat", "sofa", "wall", "grass", "window"]
# A random SAM gives ten or more masks on the photo with thresholds this low (defaults 0.88, 0.95, 0.7).
AMG = dict(points_per_side=12, points_per_batch=48, pred_iou_thresh=0.5, stability_score_thresh=0.3,
           box_nms_thresh=0.9)
CONTEXT = 12


def photo() -> np.ndarray:
    return np.asarray(Image.open(PHOTO).convert("RGB"))


@pytest.fixture(scope="module")
def sam_files(tmp_path_factory):
    """(segment_anything Sam, its checkpoint): the tiny random SAM of test_sam_amg, with masks
    sharpened so that they differ between point prompts."""
    reference = tiny_sam(image_size=128, global_attn_indexes=(1,), window_size=4, seed=1)
    with torch.no_grad():
        for mlp in reference.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(8.0)
        for conv in (reference.mask_decoder.output_upscaling[0], reference.mask_decoder.output_upscaling[3]):
            conv.weight.copy_(conv.weight[..., :1, :1].expand_as(conv.weight))
    path = tmp_path_factory.mktemp("sam") / "tiny_sam.pth"
    torch.save(reference.state_dict(), path)
    return reference, path


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """(torch reference CLIP with 2 mask prompt depths, ours loaded from its OpenAI-layout file)."""
    directory = tmp_path_factory.mktemp("clip")
    write_word_vocab([*SPACE_TEMPLATES, *NAMES, "others", "a {}"], directory)
    tok = Tokenizer.from_dir(directory, context_length=CONTEXT)
    torch.manual_seed(0)
    reference = OpenAIClip(embed_dim=16, resolution=32, patch=8, vision_width=64, vision_layers=2, context=CONTEXT,
                           vocab=tok.vocab_size, text_width=64, text_layers=1, mask_depth=2).eval()
    torch.save(reference.state_dict(), directory / "openai.pt")
    return reference, oclip.load(directory / "openai.pt", tokenizer=directory)


class Replay:
    """A mask generator that returns recorded records for one image (what `SamProposals` asks of a
    generator: `output_mode` and `generate(image)`), so the reference's masks go into our pipeline."""

    output_mode = "binary_mask"

    def __init__(self, image: np.ndarray, records: list[dict]):
        self.image, self.records = image, records

    def generate(self, image: np.ndarray) -> list[dict]:
        np.testing.assert_array_equal(image, self.image)
        return self.records


@pytest.fixture(scope="module")
def reference_masks(sam_files):
    """(a generator replaying segment_anything's records on the photo, their masks `[N, H, W]`)."""
    records = SamAutomaticMaskGenerator(sam_files[0], **AMG).generate(photo())
    assert len(records) >= 10
    return Replay(photo(), records), np.stack([r["segmentation"] for r in records])


def space_class_probs(image: np.ndarray, masks: np.ndarray, clip: OpenAIClip, tokenizer,
                      names: list[str]) -> torch.Tensor:
    """The classification half of the Space's `SAMVisualizationDemo.run_on_image`, in torch, with the
    CLIP fed its mask prompts (each crop's mask resized with legacy nearest, as OVSeg's adapter does):
    box crop with the CLIP-mean fill, bicubic resize, CLIP normalisation, `softmax(100 cos)` against
    "a photo of {name}" -> `[N, C]`."""
    size = clip.visual.conv1.stride[0] * int(round((clip.visual.positional_embedding.shape[0] - 1) ** 0.5))
    x = torch.from_numpy(image).float().permute(2, 0, 1)
    fill = torch.tensor([255.0 * m for m in CLIP_MEAN])[:, None, None]
    regions, region_masks = [], []
    for mask in torch.from_numpy(masks):
        ys, xs = torch.nonzero(mask, as_tuple=True)  # detectron2's BitMasks.get_bounding_boxes
        top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        crop = mask[top:bottom, left:right]
        region = x[:, top:bottom, left:right] * crop + (~crop) * fill  # crop_with_mask
        regions.append(F.interpolate(region[None], size=(size, size), mode="bicubic"))
        region_masks.append(F.interpolate(crop[None, None].float(), size=(size, size), mode="nearest"))
    mean, std = torch.tensor(CLIP_MEAN).reshape(1, 3, 1, 1), torch.tensor(CLIP_STD).reshape(1, 3, 1, 1)
    images = (torch.cat(regions) / 255.0 - mean) / std
    ids = torch.from_numpy(tokenizer([f"a photo of {n}" for n in names]).astype(np.int64))
    with torch.no_grad():
        text = clip.encode_text(ids)
        text = text / text.norm(dim=-1, keepdim=True)
        feats = clip.encode_image(images, torch.cat(region_masks))
        feats = feats / feats.norm(dim=-1, keepdim=True)
        return (100.0 * feats @ text.T).softmax(dim=-1)


def space_labels(image: np.ndarray, masks: np.ndarray, clip: OpenAIClip, tokenizer, names: list[str],
                 granularity: float) -> tuple[np.ndarray, np.ndarray]:
    """The Space's demo after `generate()` -> (labels `[H, W]`: 255 unlabeled, index 1 "others" for a
    single name; `[C, H, W]` scores): the class selection with its granularity, the sum of the kept
    rows over the masks, the first-class blank test, the argmax."""
    names = list(names) + (["others"] if len(names) == 1 else [])
    class_preds = space_class_probs(image, masks, clip, tokenizer, names)
    select_cls = torch.zeros_like(class_preds)
    max_scores, select_mask = torch.max(class_preds, dim=0)
    if len(names) == 2 and names[-1] == "others":
        select_mask = select_mask[:-1]
    if granularity < 1:
        thr_scores = max_scores * granularity
        select_mask = []
        if len(names) == 2 and names[-1] == "others":
            thr_scores = thr_scores[:-1]
        for i, thr in enumerate(thr_scores):
            select_mask.extend(torch.where(class_preds[:, i] > thr)[0].tolist())
    for idx in select_mask:
        select_cls[idx] = class_preds[idx]
    semseg = torch.einsum("qc,qhw->chw", select_cls.float(), torch.from_numpy(masks).float())
    labels = semseg.argmax(dim=0)
    labels[semseg[0] == 0] = 255
    return labels.numpy(), semseg.numpy()


def space_predictor(clips, generator, **kwargs) -> Predictor:
    return Predictor(None, clips[1], proposals="sam", sam=SamProposals(generator), mode="demo", ensemble_weight=0.0,
                     templates=SPACE_TEMPLATES, **kwargs)


@pytest.mark.parametrize("names, granularity", [(NAMES, 1.0), (NAMES, 0.8), (NAMES[:1], 0.5)])
def test_demo_mode_labels_equal_the_space_on_the_same_masks(clips, reference_masks, names, granularity):
    """`--mode demo --proposals sam` is the Space's demo: the same labels on the same masks, pixel for
    pixel (unlabeled: 255 there, UNLABELED here)."""
    generator, masks = reference_masks
    image = photo()
    want, semseg = space_labels(image, masks, clips[0], clips[1].tokenizer, names, granularity)
    covered = semseg.max(axis=0) > 0
    assert (covered == (semseg[0] > 0)).all()  # the Space's first-class test and ours (any class) agree here
    if len(names) == 1:
        want[want == 1] = 255  # "others": UNLABELED here, a class in the Space (see the module docstring)
    got = space_predictor(clips, generator, granularity=granularity).predict(image, names)
    np.testing.assert_array_equal(np.where(got == UNLABELED, 255, got), want)
    assert len(np.unique(want)) >= 2


def test_granularity_keeps_more_masks(clips, reference_masks):
    generator, _ = reference_masks
    image = photo()
    best_only = space_predictor(clips, generator).predict(image, NAMES)
    wider = space_predictor(clips, generator, granularity=0.3).predict(image, NAMES)
    assert (wider != UNLABELED).sum() > (best_only != UNLABELED).sum()


def test_semantic_mode_labels_every_pixel_with_the_remainder_proposal(clips, reference_masks):
    """Semantic "sam": `Σ_q p_clip[q, c] · M[q]` over SAM's masks plus the remainder (the pixels no
    mask covers), cropped and classified as one more mask."""
    generator, masks = reference_masks
    image = photo()
    with_rest = np.concatenate([masks, ~masks.any(axis=0)[None]])
    assert with_rest[-1].any()
    probs = space_class_probs(image, with_rest, clips[0], clips[1].tokenizer, NAMES).numpy()
    want = np.einsum("qc,qhw->hwc", probs, with_rest.astype(np.float32))
    predictor = Predictor(None, clips[1], proposals="sam", sam=SamProposals(generator), ensemble_weight=0.0,
                          templates=SPACE_TEMPLATES)
    np.testing.assert_allclose(predictor.scores(image, NAMES), want, atol=1e-4)
    labels = predictor.predict(image, NAMES)
    assert (labels != UNLABELED).all()
    np.testing.assert_array_equal(labels, want.argmax(-1))


# ---------------------------------------------------------------------------------------------
# The rules as array functions (numpy references)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def union_inputs():
    """Random segmenter proposals (4, soft masks, one invalid) and SAM masks (5, binary, one empty
    padding slot) on a 9 x 11 image, with 3 classes."""
    rs = np.random.RandomState(0)
    pred_logits = rs.randn(4, 4).astype(np.float32) * 2
    mask_probs = rs.rand(4, 9, 11).astype(np.float32)
    mask_probs[3] = 0.1  # below the threshold everywhere: invalid
    sam_masks = rs.rand(5, 9, 11) > 0.6
    sam_masks[4] = False  # a padding slot
    clip_logits = np.concatenate([rs.randn(9, 3) * 3, np.zeros((9, 1))], axis=1).astype(np.float32)
    return pred_logits, mask_probs, sam_masks, clip_logits


def union_reference(inputs, weight: float, mode: str, granularity: float = 1.0, threshold: float = 0.4):
    """The documented rules, in numpy: segmenter rows `p_mf^(1-λ) · p_clip^λ` (invalid: `p_mf^(1-λ)`,
    0 for λ = 0), SAM rows `C^-(1-λ) · p_clip^λ` (λ = 0: `p_clip`); semantic: soft segmenter masks and
    binary SAM masks; demo: per class its best valid row (or every valid row above `granularity`
    times the best), over hard masks."""
    pred_logits, mask_probs, sam_masks, clip_logits = inputs
    valid = np.concatenate([(mask_probs > threshold).any(axis=(1, 2)), sam_masks.any(axis=(1, 2))])
    p_clip = softmax(clip_logits[:, :3].astype(np.float64))
    p_mf = softmax(pred_logits.astype(np.float64))[:, :3]
    if weight == 0:
        seg, sam = np.where(valid[:4, None], p_clip[:4], 0), p_clip[4:]
    else:
        seg = p_mf ** (1 - weight) * np.where(valid[:4, None], p_clip[:4], 1) ** weight
        sam = 3.0 ** (weight - 1) * p_clip[4:] ** weight
    probs = np.concatenate([seg, np.where(valid[4:, None], sam, 0)])
    if mode == "semantic":
        masks = np.concatenate([mask_probs, sam_masks.astype(np.float64)])
        return np.einsum("qc,qhw->hwc", probs, masks)
    kept = np.zeros(len(probs), bool)
    for c in range(probs.shape[1]):
        column = np.where(valid, probs[:, c], -np.inf)
        if granularity < 1:
            kept |= column > granularity * column.max()
        else:
            kept[np.argmax(column)] = True
    hard = np.concatenate([mask_probs > threshold, sam_masks]).astype(np.float64)
    return np.einsum("qc,qhw->hwc", np.where(kept[:, None], probs, 0), hard)


def union_scores(inputs, weight: float, mode: str, granularity: float = 1.0) -> np.ndarray:
    pred_logits, mask_probs, sam_masks, clip_logits = inputs
    valid = np.concatenate([(mask_probs > 0.4).any(axis=(1, 2)), sam_masks.any(axis=(1, 2))])
    return np.asarray(sam_scores(jnp.asarray(sam_masks), jnp.asarray(clip_logits[4:]), jnp.asarray(valid[4:]),
                                 ensemble_weight=weight, mode=mode, num_classes=3, num_named=3,
                                 granularity=granularity, segmenter=Proposals(jnp.asarray(pred_logits),
                                                                              jnp.asarray(mask_probs)),
                                 segmenter_clip_logits=jnp.asarray(clip_logits[:4]),
                                 segmenter_valid=jnp.asarray(valid[:4]), mask_threshold=0.4))


@pytest.mark.parametrize("weight", [0.0, 0.7])
def test_semantic_union_adds_sam_masks_with_a_uniform_segmenter_term(union_inputs, weight):
    np.testing.assert_allclose(union_scores(union_inputs, weight, "semantic"),
                               union_reference(union_inputs, weight, "semantic"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("granularity", [1.0, 0.5])
def test_demo_union_picks_among_both_kinds_of_masks(union_inputs, granularity):
    got = union_scores(union_inputs, 0.0, "demo", granularity)
    np.testing.assert_allclose(got, union_reference(union_inputs, 0.0, "demo", granularity), rtol=1e-5, atol=1e-6)


def test_granular_picks_follow_the_space():
    """Per named class: the best valid mask (granularity 1) or every valid mask above g x best;
    classes from num_named on ("others") and invalid masks pick nothing."""
    probs = jnp.asarray([[0.6, 0.1, 0.3], [0.5, 0.2, 0.3], [0.1, 0.8, 0.1], [0.9, 0.05, 0.05]])
    valid = jnp.asarray([True, True, True, False])
    assert granular_picks(probs, valid, num_named=2, granularity=1.0).tolist() == [True, False, True, False]
    assert granular_picks(probs, valid, num_named=2, granularity=0.8).tolist() == [True, True, True, False]
    assert granular_picks(probs, valid, num_named=1, granularity=1.0).tolist() == [True, False, False, False]
    assert granular_picks(probs, valid, num_named=3, granularity=0.05).tolist() == [True, True, True, False]


class GivenProposals(Predictor):
    """A Predictor whose segmenter's proposals are given arrays (no segmenter to compile)."""

    def __init__(self, given: Proposals, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.given = given

    def proposals(self, images, class_names, resized_hw=None) -> Proposals:
        assert np.shape(images)[0] == 1 and len(class_names) == self.given.pred_logits.shape[-1] - 1
        return Proposals(*(x[None] for x in self.given))


@pytest.mark.slow
def test_both_is_the_segmenters_scores_plus_sams_masks(clips, reference_masks):
    """Semantic "both": the segmenter's ensemble scores (its proposals' crops classified and combined
    as reference 1.7, `combine`) plus SAM's masks with the uniform segmenter term `C^-(1-λ) ·
    p_clip^λ` (p_clip: the torch reference). The segmenter's proposals are random arrays here."""
    image, masks = photo(), reference_masks[1]
    rs = np.random.RandomState(1)
    mask_probs = np.zeros((6, *image.shape[:2]), np.float32)
    for q in range(5):  # rectangles of probability 0.9 on 0.2; the last proposal has no pixel above 0.5
        y, x = rs.randint(0, 60), rs.randint(0, 100)
        mask_probs[q] = 0.2
        mask_probs[q, y:y + 40, x:x + 50] = 0.9
    given = Proposals(jnp.asarray(rs.randn(6, len(NAMES) + 1).astype(np.float32) * 2), jnp.asarray(mask_probs))
    both = GivenProposals(given, object(), clips[1], proposals="both", sam=SamProposals(reference_masks[0]),
                          mask_threshold=0.5, ensemble_weight=0.7, templates=SPACE_TEMPLATES)
    clip_logits, valid = both.classify_crops(image, given.mask_probs, NAMES)
    assert np.asarray(valid).tolist() == [True] * 5 + [False]
    segmenter_part = combine(given, clip_logits, valid, ensemble_weight=0.7)
    p_clip = space_class_probs(image, masks, clips[0], clips[1].tokenizer, NAMES).numpy()
    sam_part = np.einsum("qc,qhw->hwc", len(NAMES) ** -0.3 * p_clip ** 0.7, masks.astype(np.float32))
    np.testing.assert_allclose(both.scores(image, NAMES), np.asarray(segmenter_part) + sam_part, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_masks_are_padded_to_a_bucketed_budget(sam_files):
    assert [mask_budget(n, 32) for n in (0, 1, 8, 9, 17, 32, 33, 70)] == [8, 8, 8, 16, 32, 32, 64, 96]
    assert mask_budget(5, 4) == 8 and mask_budget(3, 4) == 4
    proposals = SamProposals.load(sam_files[1], mask_bucket=8, **AMG)
    images = np.zeros((2, 112, 160, 3), np.uint8)
    images[0, :100, :150] = photo()
    images[1, :100, :150] = photo()[::-1]
    padded = proposals.padded_masks(images, np.asarray([(100, 150), (100, 150)]), extra=1)
    found = proposals.masks(photo())
    assert padded.shape[1] % 8 == 0 and padded.shape[1] >= len(found) + 1
    np.testing.assert_array_equal(padded[0, :len(found), :100, :150], found)
    assert not padded[0, len(found):].any() and not padded[:, :, 100:].any() and not padded[:, :, :, 150:].any()


def test_our_generator_gives_the_reference_masks(sam_files, reference_masks):
    """What `SamProposals.load` feeds the pipeline is segment_anything's result (test_sam_amg tests
    the generator in depth): same count, IoU >= 0.99 with the same rank."""
    ours = SamProposals.load(sam_files[1], **AMG).masks(photo())
    want = reference_masks[1]
    assert ours.shape == want.shape
    iou = (ours & want).sum(axis=(1, 2)) / np.maximum((ours | want).sum(axis=(1, 2)), 1)
    assert iou.min() >= 0.99


def test_released_architectures_are_told_from_test_models(sam_files):
    from ovseg_jax.models.sam import SamConfig

    assert all(not_released_reason(getattr(SamConfig, n)()) is None for n in ("vit_b", "vit_l", "vit_h"))
    assert not_released_reason(SamConfig.vit_l(decoder_norm_eps=1e-6)) is None  # transformers' configs
    tiny = SamProposals.load(sam_files[1], **AMG)
    assert "smoke test" in not_released_reason(tiny.config)


def test_option_parsing_and_predictor_checks(clips, reference_masks):
    assert parse_sam_options(["points_per_side=16", "pred-iou-thresh=0.5"]) == {"points_per_side": 16,
                                                                                 "pred_iou_thresh": 0.5}
    with pytest.raises(ValueError, match="NAME one of points_per_side"):
        parse_sam_options(["points=16"])
    with pytest.raises(ValueError, match="not a number"):
        parse_sam_options(["points_per_side=many"])
    sam = SamProposals(reference_masks[0])
    clip = clips[1]
    cases = [(dict(proposals="sam"), "needs sam="), (dict(proposals="sam", sam=sam, granularity=0.5), "mode='demo'"),
             (dict(proposals="both", sam=sam), "needs the segmenter"), (dict(granularity=0.8), "need a segmenter"),
             (dict(proposals="sam", sam=sam, ensemble_weight=None), "give an ensemble_weight"),
             (dict(proposals="sam", sam=sam, clip_top_k=3), "clip_top_k"), (dict(proposals="mask2former"), "unknown"),
             (dict(proposals="sam", sam=sam, mode="demo", granularity=0), "granularity must lie in")]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            Predictor(None, clip, **kwargs)


# ---------------------------------------------------------------------------------------------
# The commands, on the quick demo's model and world (random SAM weights: a smoke test)

SAM_OPTIONS = [f"--sam-option={k}={v}" for k, v in AMG.items()]


@pytest.fixture(scope="module")
def demo_files(quick_demo):
    out, _ = quick_demo
    return out / "ovseg_synthetic.pth", sorted((out / "world" / "images" / "val").iterdir())


def test_predict_demo_mode_with_sam_writes_the_usual_outputs(demo_files, sam_files, tmp_path, capsys):
    from ovseg_jax import predict
    from ovseg_jax.inference.loading import load_predictor

    checkpoint, images = demo_files
    names = ["grass", "sky", "plain red"]
    out = tmp_path / "out"
    status = predict.main(["--checkpoint", str(checkpoint), "--classes", ",".join(names), "--input",
                           *map(str, images[:1]), "--output", str(out), "--proposals", "sam", "--sam-checkpoint",
                           str(sam_files[1]), *SAM_OPTIONS, "--mode", "demo", "--granularity", "0.8", "--short",
                           "128", "--max-size", "128", "--compile-cache", "none"])
    assert status == 0
    assert "smoke test" in capsys.readouterr().err
    predictor = load_predictor(checkpoint, proposals="sam", sam_checkpoint=sam_files[1], sam_options=AMG,
                               mode="demo", granularity=0.8, resize=(128, 128))
    assert predictor.templates == SPACE_TEMPLATES and predictor.ensemble_weight == 0.0
    for path in images[:1]:
        record = json.loads((out / f"{path.stem}.json").read_text())
        assert record["mode"] == "demo" and record["templates"] == list(SPACE_TEMPLATES)
        labels = np.asarray(Image.open(out / f"{path.stem}.labels.png"))
        assert (out / f"{path.stem}.overlay.png").is_file()
        want = predictor.predict(np.asarray(Image.open(path).convert("RGB")), names)
        np.testing.assert_array_equal(labels, np.where(want == UNLABELED, 255, want))
        assert record["unlabeled_share"] == pytest.approx((labels == 255).mean(), abs=1e-6)


def test_evaluate_with_sam_proposals_says_it_is_a_smoke_test(quick_demo, sam_files, tmp_path, capsys):
    from ovseg_jax import evaluate

    out, _ = quick_demo
    report = evaluate.run(["--checkpoint", str(out / "ovseg_synthetic.pth"), "--dataset", "synthetic", "--root",
                           str(out / "world"), "--max-images", "2", "--out", str(tmp_path), "--no-progress",
                           "--proposals", "sam", "--sam-checkpoint", str(sam_files[1]), *SAM_OPTIONS])
    captured = capsys.readouterr()
    assert "smoke test" in captured.err and "SMOKE TEST" in captured.out
    assert report["images"] == 2 and "smoke test" in report["smoke_test"]
    assert report["setting"]["proposals"] == "sam" and report["setting"]["ensemble_weight"] == 0.0
    assert json.loads((tmp_path / "metrics.json").read_text())["smoke_test"] == report["smoke_test"]


def test_commands_refuse_sam_proposals_without_a_checkpoint(demo_files, tmp_path, capsys):
    from ovseg_jax import evaluate, predict

    checkpoint, images = demo_files
    assert predict.main(["--checkpoint", str(checkpoint), "--classes", "sky", "--input", str(images[0]), "--output",
                         str(tmp_path), "--proposals", "sam"]) == 2
    assert "--sam-checkpoint" in capsys.readouterr().err
    with pytest.raises(ValueError, match="needs --sam-checkpoint"):
        evaluate.run(["--checkpoint", str(checkpoint), "--dataset", "synthetic", "--root", str(tmp_path),
                      "--proposals", "both"])
    with pytest.raises(ValueError, match="one setting without TTA"):
        evaluate.run(["--checkpoint", str(checkpoint), "--dataset", "synthetic", "--root", str(tmp_path),
                      "--proposals", "sam", "--sam-checkpoint", str(checkpoint), "--tta", "flip"])
