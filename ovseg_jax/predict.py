"""OVSeg inference for one image: segmenter proposals, CLIP on their masked crops, ensemble.

    predictor = Predictor(segmenter, clip, mask_threshold=0.4, ensemble_weight=0.7)
    labels = predictor.predict(image, class_names, resized_hw=(h, w), original_hw=(H0, W0))

`image` is the resized image (short side 640 as reference 1.1, uint8 `[Hp, Wp, 3]`), possibly
padded at the bottom/right beyond `resized_hw` (e.g. to a shape bucket). Pixels outside
`resized_hw` are zero in the segmenter's normalised input, exactly as the original's own padding,
and masks are cut to `resized_hw` before cropping and scoring; so a bucket equal to the
multiple-of-32 padded size reproduces the original. One compilation per padded shape; the final
resize to the original size (a small jitted function) compiles once per original size.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ovseg_jax.clip import Clip
from ovseg_jax.image_ops import window_interpolation_matrix
from ovseg_jax.inference import ensemble_class_probs, upsample_masks
from ovseg_jax.masked_crops import masked_crops
from ovseg_jax.models.maskformer import TEMPERATURE, Segmenter, normalize_images


@functools.partial(jax.jit, static_argnames=("seg_graph", "clip_graph", "mask_threshold", "ensemble_weight",
                                             "mask_prompts"))
def _scores(seg_graph, seg_state, clip_graph, clip_state, image, text_bank, resized_hw, *, mask_threshold: float,
            ensemble_weight: float | None, mask_prompts: bool) -> jax.Array:
    """`[Hp, Wp, C]` scores (zero outside `resized_hw`) for one padded image `[Hp, Wp, 3]` 0-255."""
    segmenter = nnx.merge(seg_graph, seg_state)
    clip = nnx.merge(clip_graph, clip_state)
    hp, wp = image.shape[:2]
    inside = (jnp.arange(hp)[:, None] < resized_hw[0]) & (jnp.arange(wp)[None, :] < resized_hw[1])
    x = jnp.where(inside[..., None], normalize_images(image[None])[0], 0.0)
    out = segmenter(x[None], text_bank)
    pred_logits, mask_logits = out["pred_logits"][0], out["pred_masks"][0]  # [Q, C+1], [Q, Hq/4, Wq/4]
    mask_probs = jnp.where(inside, jax.nn.sigmoid(upsample_masks(mask_logits, (hp, wp))), 0.0)
    if ensemble_weight is None:
        probs = ensemble_class_probs(pred_logits, None, None, 0.0)
    else:
        size = clip.config.image_size
        crops = masked_crops(image.astype(jnp.float32), mask_probs, threshold=mask_threshold, size=size)
        feats = clip.encode_image(crops.images, crops.region_masks if mask_prompts else None)
        feats = feats / jnp.linalg.norm(feats, axis=-1, keepdims=True)
        clip_logits = TEMPERATURE * feats @ text_bank.T  # the non-object column is dropped anyway
        clip_logits = jnp.concatenate([clip_logits, jnp.zeros_like(clip_logits[:, :1])], axis=-1)
        probs = ensemble_class_probs(pred_logits, clip_logits, crops.valid, ensemble_weight)
    return jnp.einsum("qc,qhw->hwc", probs, mask_probs, precision="highest")


@functools.partial(jax.jit, static_argnames="original_hw")
def _labels(scores: jax.Array, resized_hw: jax.Array, original_hw: tuple[int, int]) -> jax.Array:
    """Bilinear resize of the `resized_hw` window of `[Hp, Wp, C]` scores to `original_hw`, argmax."""
    hp, wp = scores.shape[:2]
    rows = window_interpolation_matrix(0, resized_hw[0], hp, original_hw[0], "bilinear")
    cols = window_interpolation_matrix(0, resized_hw[1], wp, original_hw[1], "bilinear")
    full = jnp.einsum("oh,hwc,pw->opc", rows, scores, cols, precision="highest")
    return jnp.argmax(full, axis=-1).astype(jnp.int32)


class Predictor:
    """Segmenter + (mask-adapted) CLIP -> per-pixel labels over any class names.

    mask_threshold: 0.4 (Swin-B model), 0.5 (R101c). ensemble_weight: λ of reference 1.7
    (0.7 A-150/A-847, 0.6 PC-59/PC-459, 0.45 PAS-20; 0 = CLIP only; None = segmenter only).
    mask_prompts: feed region masks to CLIP (reference `MASK_PROMPT_FWD`) when it has prompts.
    templates: prompt templates of the class-name embeddings ("vild" = the 14 ViLD templates).
    """

    def __init__(self, segmenter: Segmenter, clip: Clip, *, mask_threshold: float = 0.4,
                 ensemble_weight: float | None = 0.7, mask_prompts: bool = True,
                 templates: str | Sequence[str] = "vild"):
        self.segmenter, self.clip, self.templates = segmenter, clip, templates
        self.mask_threshold, self.ensemble_weight = mask_threshold, ensemble_weight
        self.mask_prompts = mask_prompts and clip.config.mask_prompt_depth > 0

    def scores(self, image, class_names: Sequence[str], resized_hw: tuple[int, int] | None = None) -> jax.Array:
        """`[Hp, Wp, 3]` uint8 resized (+ padded) image -> `[Hp, Wp, C]` scores (0 outside `resized_hw`)."""
        image = jnp.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"image must be [H, W, 3] RGB; got {image.shape}")
        resized_hw = image.shape[:2] if resized_hw is None else tuple(int(v) for v in resized_hw)
        if resized_hw[0] > image.shape[0] or resized_hw[1] > image.shape[1]:
            raise ValueError(f"resized_hw {resized_hw} exceeds the image {image.shape[:2]}")
        seg_graph, seg_state = nnx.split(self.segmenter)
        clip_graph, clip_state = nnx.split(self.clip.model)
        return _scores(seg_graph, seg_state, clip_graph, clip_state, image.astype(jnp.float32),
                       self.clip.class_embeddings(class_names, self.templates), jnp.asarray(resized_hw, jnp.int32),
                       mask_threshold=self.mask_threshold, ensemble_weight=self.ensemble_weight,
                       mask_prompts=self.mask_prompts)

    def predict(self, image, class_names: Sequence[str], *, resized_hw: tuple[int, int] | None = None,
                original_hw: tuple[int, int] | None = None) -> np.ndarray:
        """-> `[H0, W0]` int32 class indices into `class_names` at the original resolution."""
        image = np.asarray(image)
        resized_hw = image.shape[:2] if resized_hw is None else tuple(int(v) for v in resized_hw)
        original_hw = resized_hw if original_hw is None else tuple(int(v) for v in original_hw)
        scores = self.scores(image, class_names, resized_hw)
        return np.asarray(_labels(scores, jnp.asarray(resized_hw, jnp.int32), original_hw))
