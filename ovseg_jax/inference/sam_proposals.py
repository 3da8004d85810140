"""SAM's automatic masks as OVSeg's proposals ("OVSeg + SAM", the original Space's SAM demo).

    sam = SamProposals.load("sam_vit_l_0b3195.pth")   # AutomaticMaskGenerator options as keywords
    predictor = Predictor(segmenter, clip, proposals="sam", sam=sam, mode="demo", ensemble_weight=0.0,
                          templates=SPACE_TEMPLATES, granularity=0.8, resize=SPACE_RESIZE)
    labels = predictor.predict(image, ["cat", "sofa", "wall"])    # UNLABELED where no kept mask is

`Predictor(proposals=...)` chooses where the masks CLIP classifies come from: "maskformer" (the
paper), "sam" (SAM's automatic mask generator, `inference.amg`), or "both" (the union). CLIP is
OVSeg's mask-adapted CLIP with its mask prompts (the point of the exercise: its crops are masked
crops, reference 1.8-1.9), on the same masked crops as for the segmenter's proposals.

The Space's `SAMVisualizationDemo` (what `--mode demo --proposals sam` reproduces): the image is
resized to long side 1280; SAM ViT-L's automatic mask generator gives N binary masks; each mask's
box crop, background filled with the CLIP mean, is resized bicubic to 224 and CLIP-normalised;
the class probabilities are `softmax(100 x cos(crop, "a photo of {name}"))` over the names (a
single name gets the competitor "others"); each named class keeps its best mask, or with
`granularity` g < 1 every mask whose probability for it is above g times the best; each kept mask
adds its whole probability row over its pixels (a sum: overlapping masks are not painted in any
order), and the argmax labels a pixel; pixels no kept mask covers are unlabeled.

Where this differs from the Space, on purpose:
- CLIP sees its mask prompts (the Space runs open_clip's plain forward on OVSeg's fine-tuned CLIP,
  which cannot take them); `Predictor(mask_prompts=False)` gives the plain forward.
- A pixel is unlabeled when no class scores above 0 (the Space tests the first class's score
  only, so a pixel whose first class underflows to probability 0 went unlabeled); pixels "others"
  wins are UNLABELED, as in the segmenter's demo mode (the Space appends "others" to the caller's
  list and so draws it as a class).
- Labels come from the scores resized bilinearly to the original size (reference 1.7 step 7), not
  from the argmax at 1280 resized nearest; the resize to long side 1280 is reference 1.1's
  (PIL bilinear, sizes rounded) instead of OpenCV's (no antialiasing, sizes truncated).
- No masks at all gives an unlabeled image (the Space crashes stacking an empty list).

Semantic mode (every pixel gets a class; `python -m ovseg_jax.evaluate --proposals sam`): the
score of class c at a pixel is `Σ_q p[q, c] · M[q]` over binary masks `M`, as reference 1.7 with
hard masks. SAM has no class scores of its own, so its segmenter term is uniform: `p = C^-(1-λ) ·
p_clip^λ` for λ > 0, and `p = p_clip` for λ = 0 (the original's "CLIP only" convention and the
default with SAM proposals). With "sam" the pixels no SAM mask covers form one more proposal, the
remainder, cropped and classified like the others, so that they get a class too. With "both" the
segmenter's proposals keep their ensemble `p_mf^(1-λ) · p_clip^λ` and soft masks (reference 1.7),
and SAM's masks are added with the uniform segmenter term above, a factor `C^-(1-λ)` below the
segmenter's confident proposals. Demo mode with "both" picks each class's masks among the union.

Static shapes: the generator's masks (a different number per image) are padded to a budget (a
power of two from 8, then multiples of `MASK_BUCKET`) with empty masks that are invalid (no
pixel); CLIP classifies the whole budget in one jitted program, compiled once per (padded image
shape, budget, class bucket), and the granularity and mask threshold are traced (a new value does
not recompile). The generator itself runs per image as `inference.amg` does (its programs compile
once per image size).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ovseg_jax.inference.amg import AutomaticMaskGenerator
from ovseg_jax.inference.ensemble import (PROPOSALS, Proposals, _classify_crops, ensemble_class_probs, inside_window,
                                          mask_padded_classes, pad_classes, semantic_scores)
from ovseg_jax.inference.inputs import InputError
from ovseg_jax.models.layers import inference_split

if TYPE_CHECKING:
    from ovseg_jax.inference.ensemble import Predictor
    from ovseg_jax.models.sam import SamConfig

MASK_BUCKET = 32  # SAM masks are padded to a multiple of this many (one CLIP program per budget) ...
MIN_BUDGET = 8  # ... or, for fewer masks, to a power of two from this on (`mask_budget`)
SPACE_RESIZE = (1280, 1280)  # the Space's input: long side 1280 (as Predictor's `resize`: short, max_size)
SPACE_TEMPLATES = ("a photo of {}",)  # the Space's single prompt
RELEASED = ("vit_b", "vit_l", "vit_h")  # SamConfig constructors of the released architectures


class SamProposals:
    """SAM's automatic mask generator as a proposal source for `Predictor(proposals="sam" | "both")`.

    generator: an `AutomaticMaskGenerator` with `output_mode="binary_mask"` (or anything whose
        `generate(image)` returns such records, e.g. segment_anything's `SamAutomaticMaskGenerator`).
    mask_bucket: masks are padded to a multiple of this many per batch, or to a power of two below it
        (`mask_budget`; one CLIP compilation per budget).
    """

    def __init__(self, generator: AutomaticMaskGenerator, *, mask_bucket: int = MASK_BUCKET):
        if generator.output_mode != "binary_mask":
            raise ValueError(f"SamProposals needs binary masks: build the generator with output_mode='binary_mask' "
                             f"(got {generator.output_mode!r})")
        if mask_bucket <= 0:
            raise ValueError(f"mask_bucket must be a positive number of masks; got {mask_bucket}")
        self.generator, self.mask_bucket = generator, int(mask_bucket)

    @classmethod
    def load(cls, checkpoint, *, dtype=jnp.float32, mask_bucket: int = MASK_BUCKET, **generator_options):
        """A SAM checkpoint (`ovseg_jax.sam.load`: `sam_vit_*.pth` or a transformers `SamModel`
        directory) -> its proposals; `generator_options` are `AutomaticMaskGenerator`'s (the
        Space keeps the defaults: 32 x 32 points, predicted IoU 0.88, stability 0.95)."""
        import ovseg_jax.sam  # noqa: PLC0415  (loads torch's reader only when asked)

        sam = ovseg_jax.sam.load(checkpoint, dtype=dtype)
        return cls(AutomaticMaskGenerator(sam, **generator_options), mask_bucket=mask_bucket)

    @property
    def config(self) -> SamConfig:
        return self.generator.model.config

    def masks(self, image: np.ndarray) -> np.ndarray:
        """uint8 `[H, W, 3]` -> bool `[N, H, W]`, the generator's masks in its order."""
        records = self.generator.generate(image)
        if not records:
            return np.zeros((0, *image.shape[:2]), bool)
        return np.stack([r["segmentation"] for r in records])

    def padded_masks(self, images: np.ndarray, sizes: np.ndarray, extra: int = 0) -> np.ndarray:
        """`[B, Hp, Wp, 3]` padded images with their `[B, 2]` resized sizes -> bool `[B, Q, Hp, Wp]`:
        each image's masks (of its resized window), then empty masks up to the budget Q
        (`mask_budget` of the largest count plus `extra` slots left empty in every image)."""
        found = [self.masks(image[:h, :w]) for image, (h, w) in zip(images, sizes)]
        budget = mask_budget(max(len(m) for m in found) + extra, self.mask_bucket)
        padded = np.zeros((len(images), budget, *images.shape[1:3]), bool)
        for i, masks in enumerate(found):
            padded[i, :len(masks), :masks.shape[1], :masks.shape[2]] = masks
        return padded

    def batch_scores(self, predictor: Predictor, images: np.ndarray, sizes: np.ndarray, names: list[str],
                     num_named: int) -> jax.Array:
        """What `Predictor` runs for proposals "sam" / "both": `[B, Hp, Wp, 3]` uint8 padded images,
        `[B, 2]` resized sizes, the class names (with demo mode's "others") -> `[B, Hp, Wp, Cp]`
        scores over the padded class list (zero outside each resized window)."""
        remainder = predictor.proposal_source == "sam" and predictor.mode == "semantic"
        masks = self.padded_masks(images, sizes, extra=int(remainder))
        bank = pad_classes(predictor.text_bank(names), predictor.class_bucket)
        segmented = None
        if predictor.proposal_source == "both":  # the segmenter's program, as the sweeps run it (`Predictor.proposals`)
            segmented = predictor.proposals(images, names, resized_hw=sizes)
            segmented = Proposals(pad_class_columns(segmented.pred_logits, len(bank)), segmented.mask_probs)
        clip_graph, clip_state = inference_split(predictor.clip.model)
        return _scores_jit(clip_graph, clip_state, jnp.asarray(images, jnp.float32), masks, segmented, bank,
                           jnp.asarray(sizes), jnp.int32(len(names)), jnp.int32(num_named),
                           jnp.float32(predictor.mask_threshold), jnp.float32(predictor.granularity),
                           mode=predictor.mode, ensemble_weight=predictor.ensemble_weight,
                           mask_prompts=predictor.mask_prompts, crop=predictor.crop, remainder=remainder)


def mask_budget(count: int, bucket: int = MASK_BUCKET) -> int:
    """The number of mask slots for `count` masks: the next power of two from `MIN_BUDGET` up to
    `bucket`, then the next multiple of `bucket`. Every slot costs a CLIP forward, so a few masks
    do not pay for a whole bucket; the compilations stay few (8, 16, 32, 64, 96, ... slots)."""
    if count <= bucket:
        return min(bucket, max(MIN_BUDGET, 1 << max(count - 1, 0).bit_length()))
    return -(-count // bucket) * bucket


def not_released_reason(config: SamConfig) -> str | None:
    """None when `config` is a released SAM architecture (ViT-B/L/H at 1024 px, as
    `sam_vit_{b,l,h}_*.pth`), else a sentence saying what it is: such a model's masks come from
    test weights, and what is measured with them is a smoke test."""
    from ovseg_jax.models.sam import SamConfig  # noqa: PLC0415

    fields = ("image_size", "patch_size", "encoder_width", "encoder_depth", "encoder_heads", "global_attn_indexes",
              "prompt_embed_dim", "decoder_mlp_dim")
    if any(all(getattr(config, f) == getattr(getattr(SamConfig, name)(), f) for f in fields) for name in RELEASED):
        return None
    return (f"the SAM model is not a released architecture (image size {config.image_size}, encoder width "
            f"{config.encoder_width}, depth {config.encoder_depth}): its masks come from test weights, so this "
            "run is a smoke test of the pipeline, not a measurement")


# ---------------------------------------------------------------------------------------------
# Pure array functions


def sam_class_probs(clip_logits: jax.Array, valid: jax.Array, *, ensemble_weight: float,
                    num_classes: jax.Array | int) -> jax.Array:
    """`[Q, C+1]` CLIP logits of SAM's masks (last column: non-object, dropped; padded classes at
    -inf), `[Q]` valid -> `[Q, C]` class probabilities with a uniform segmenter term:
    `C^-(1-λ) · p_clip^λ`, or `p_clip` for λ = 0 (CLIP only); 0 for invalid (empty) masks."""
    p_clip = jax.nn.softmax(clip_logits[:, :-1], axis=-1)
    if ensemble_weight != 0:
        p_clip = jnp.asarray(num_classes, jnp.float32) ** (ensemble_weight - 1.0) * p_clip ** ensemble_weight
    return jnp.where(valid[:, None], p_clip, 0.0)


def granular_picks(class_probs: jax.Array, valid: jax.Array, *, num_named: jax.Array | int,
                   granularity: jax.Array | float) -> jax.Array:
    """The Space's mask selection -> `[Q]` bool, the masks whose probability row is kept.

    For each of the first `num_named` classes of `class_probs` `[Q, C]`: its best valid mask
    (granularity 1), or every valid mask with a probability above `granularity` times the best
    (granularity < 1; the best itself when that is positive). Classes from `num_named` on ("others",
    padded classes) pick nothing."""
    q, c = class_probs.shape
    scored = jnp.where(valid[:, None], class_probs, -jnp.inf)
    best = jnp.max(scored, axis=0)  # [C]
    argmax = jnp.arange(q)[:, None] == jnp.argmax(scored, axis=0)[None, :]  # [Q, C]
    picks = jnp.where(granularity < 1, scored > granularity * best[None, :], argmax)
    picks &= (jnp.arange(c) < num_named)[None, :] & valid[:, None]
    return picks.any(axis=1)


def sam_scores(sam_masks: jax.Array, sam_clip_logits: jax.Array, sam_valid: jax.Array, *, ensemble_weight: float,
               mode: str, num_classes: jax.Array | int, num_named: jax.Array | int,
               granularity: jax.Array | float = 1.0, segmenter: Proposals | None = None,
               segmenter_clip_logits: jax.Array | None = None, segmenter_valid: jax.Array | None = None,
               mask_threshold: jax.Array | float = 0.4) -> jax.Array:
    """One image's `[H, W, C]` score map from SAM's masks (see the module docstring for the rules).

    sam_masks: bool `[S, H, W]`; sam_clip_logits: `[S, C+1]` (padded classes already at -inf);
    sam_valid: `[S]`. With `segmenter` (proposals "both"): its `Proposals` (`[Q, C+1]` logits,
    `[Q, H, W]` soft masks), the CLIP logits `[Q, C+1]` and valid flags `[Q]` of its masked crops.
    mode "semantic": `Σ_q p[q, c] · M[q]`; "demo": the rows `granular_picks` keeps, over hard masks.
    """
    sam_probs = sam_class_probs(sam_clip_logits, sam_valid, ensemble_weight=ensemble_weight, num_classes=num_classes)
    sam_masks = sam_masks.astype(jnp.float32)
    if segmenter is not None:
        seg_probs = ensemble_class_probs(segmenter.pred_logits, segmenter_clip_logits, segmenter_valid,
                                         ensemble_weight)
    if mode == "semantic":
        scores = semantic_scores(sam_probs, sam_masks)
        return scores if segmenter is None else semantic_scores(seg_probs, segmenter.mask_probs) + scores
    if mode != "demo":
        raise ValueError(f"mode must be 'semantic' or 'demo'; got {mode!r}")
    if segmenter is None:
        kept = granular_picks(sam_probs, sam_valid, num_named=num_named, granularity=granularity)
        return semantic_scores(jnp.where(kept[:, None], sam_probs, 0.0), sam_masks)
    kept = granular_picks(jnp.concatenate([seg_probs, sam_probs]), jnp.concatenate([segmenter_valid, sam_valid]),
                          num_named=num_named, granularity=granularity)
    q = seg_probs.shape[0]
    hard = (segmenter.mask_probs > mask_threshold).astype(jnp.float32)
    return (semantic_scores(jnp.where(kept[:q, None], seg_probs, 0.0), hard)
            + semantic_scores(jnp.where(kept[q:, None], sam_probs, 0.0), sam_masks))


def pad_class_columns(logits: jax.Array, num_classes: int) -> jax.Array:
    """`[..., C+1]` class logits (last column: non-object) -> `[..., num_classes+1]`, zero columns
    inserted before the non-object column (for `mask_padded_classes` to set to -inf)."""
    missing = num_classes + 1 - logits.shape[-1]
    if missing == 0:
        return logits
    zeros = jnp.zeros((*logits.shape[:-1], missing), logits.dtype)
    return jnp.concatenate([logits[..., :-1], zeros, logits[..., -1:]], axis=-1)


def with_remainder(masks: jax.Array, inside: jax.Array) -> jax.Array:
    """bool `[S, H, W]` masks whose last slot is empty -> the same with the pixels of the `[H, W]`
    window `inside` that no mask covers in that slot."""
    return masks.at[-1].set(inside & ~masks.any(axis=0))


# ---------------------------------------------------------------------------------------------
# The networks, jitted


@functools.partial(jax.jit, static_argnames=("clip_graph", "mode", "ensemble_weight", "mask_prompts", "crop",
                                             "remainder"))
def _scores_jit(clip_graph, clip_state, images, sam_masks, segmented, text_bank, resized_hw, num_classes, num_named,
                mask_threshold, granularity, *, mode, ensemble_weight, mask_prompts, crop, remainder):
    """`[B, Hp, Wp, 3]` 0-255 images, bool `[B, S, Hp, Wp]` SAM masks, the segmenter's batched
    `Proposals` (`[B, Q, Cp+1]`, `[B, Q, Hp, Wp]`; None for proposals "sam"), a `[Cp, D]` text bank
    whose first `num_classes` rows are real -> `[B, Hp, Wp, Cp]` scores. CLIP classifies the
    segmenter's hard masks and SAM's in one batch of masked crops."""
    clip = nnx.merge(clip_graph, clip_state)
    padded_hw = images.shape[1:3]

    def one(args):
        image, masks, size, segmenter = args
        if remainder:
            masks = with_remainder(masks, inside_window(padded_hw, size))
        binary = masks if segmenter is None else jnp.concatenate([segmenter.mask_probs > mask_threshold, masks])
        logits, valid = _classify_crops(clip, image, binary.astype(jnp.float32), text_bank, mask_threshold=0.5,
                                        mask_prompts=mask_prompts, crop=crop)
        logits = mask_padded_classes(logits, num_classes)
        common = {"ensemble_weight": ensemble_weight, "mode": mode, "num_classes": num_classes,
                  "num_named": num_named, "granularity": granularity, "mask_threshold": mask_threshold}
        if segmenter is None:
            return sam_scores(masks, logits, valid, **common)
        q = segmenter.mask_probs.shape[0]
        segmenter = Proposals(mask_padded_classes(segmenter.pred_logits, num_classes), segmenter.mask_probs)
        return sam_scores(masks, logits[q:], valid[q:], segmenter=segmenter, segmenter_clip_logits=logits[:q],
                          segmenter_valid=valid[:q], **common)

    return jax.lax.map(one, (images, sam_masks, resized_hw, segmented))


def add_sam_arguments(parser, proposals_help: str = "masks CLIP classifies: the segmenter's (the paper), "
                      "SAM's automatic masks, or both (docs/sam.md)") -> None:
    """The SAM flags predict, evaluate and serve share: --proposals, --sam-checkpoint, --sam-option
    (read by `parse_sam_options`), --sam-dtype."""
    parser.add_argument("--proposals", choices=PROPOSALS, default="maskformer", help=proposals_help)
    parser.add_argument("--sam-checkpoint", help="SAM weights for --proposals sam|both: sam_vit_{b,l,h}_*.pth or a "
                        "transformers SamModel directory")
    parser.add_argument("--sam-option", action="append", default=[], metavar="NAME=VALUE",
                        help="an AutomaticMaskGenerator setting, e.g. points_per_side=16 (python -m ovseg_jax.amg's "
                             "flags with '_'); repeatable")
    parser.add_argument("--sam-dtype", choices=("float32", "bfloat16"), default="float32", help="SAM's compute dtype")


def parse_sam_options(specs: Sequence[str]) -> dict:
    """`["points_per_side=16", "pred_iou_thresh=0.5"]` (`--sam-option`) -> `AutomaticMaskGenerator`
    keyword arguments (ints and floats as typed); `InputError` naming a bad or unknown option."""
    import inspect  # noqa: PLC0415

    known = [n for n in inspect.signature(AutomaticMaskGenerator).parameters if n not in ("model", "output_mode",
                                                                                          "point_grids")]
    options = {}
    for spec in specs:
        name, sep, text = spec.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in known:
            raise InputError(f"--sam-option {spec!r}: expected NAME=VALUE with NAME one of {', '.join(known)}")
        try:
            options[name] = int(text) if text.strip().lstrip("-").isdigit() else float(text)
        except ValueError:
            raise InputError(f"--sam-option {spec!r}: {text!r} is not a number") from None
    return options
