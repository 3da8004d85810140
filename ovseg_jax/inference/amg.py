"""SAM automatic mask generation: masks for a whole image from a grid of point prompts.

    generator = AutomaticMaskGenerator(sam, points_per_side=32)
    records = generator.generate(image)   # uint8 [H, W, 3] -> [{"segmentation", "area", "bbox", ...}]

The options, their defaults and the records are segment_anything's `SamAutomaticMaskGenerator`'s,
and so is the result (same masks, scores and order; tested against it). How it runs differs:

- Each crop (the whole image, then `crop_n_layers` layers of overlapping crops) is resized to
  the model's input size on the host (PIL bilinear, as the reference), the crops of a layer are
  encoded `ENCODER_BATCH` at a time, and then one jitted program per crop shape handles every
  point of the crop: a `lax.scan` over fixed-size point batches (the last padded, with validity
  flags) decodes three masks per point, upsamples the low-resolution logits to the crop's size
  (`Sam.postprocess_masks`: the reference's two bilinear resizes as one matrix per axis) and
  computes the stability score and the box of each mask at that size, as the reference does;
  predicted-IoU, stability and crop-edge filters become validity flags over the fixed budget of
  3 x points candidates; a greedy box NMS runs over that budget (one loop step per kept mask).
  Only the low-resolution logits stay on the device; kept masks are upsampled again for the
  output, in fixed-size chunks.
- Host steps work on the survivors only: the cross-crop NMS (preferring masks from smaller crops,
  scores 1 / crop area, on the same jitted NMS), removal of small regions and holes
  (`scipy.ndimage.label`, 8-connected as the reference's OpenCV call) and the encoding.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ovseg_jax.inference.amg_utils import (batched_mask_to_box, box_nms, box_xyxy_to_xywh, build_all_layer_point_grids,
                                           calculate_stability_score, coco_encode, float32_floor, generate_crop_boxes,
                                           is_box_near_crop_edge, mask_to_rle, masks_to_boxes_np, remove_small_regions,
                                           uncrop_boxes_xyxy, uncrop_masks, uncrop_points)
from ovseg_jax.models.layers import inference_split
from ovseg_jax.models.sam.transforms import ResizeLongestSide

if TYPE_CHECKING:
    from ovseg_jax.models.sam import Sam
    from ovseg_jax.sam import SamModel

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")
MASK_THRESHOLD = 0.0  # segment_anything's `Sam.mask_threshold`: logits > 0 are mask pixels
MASKS_PER_POINT = 3  # multimask output
ENCODER_BATCH = 4  # crops encoded per call (a layer of 16 crops runs as 4 calls)


# ----------------------------------------------------------------------------------------------
# Device programs


class _Filters(NamedTuple):
    """Which filters apply (static: the reference skips a filter whose threshold is 0)."""

    pred_iou: bool
    stability: bool


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _embed(graphdef, state, pixels: jax.Array, input_sizes: jax.Array) -> jax.Array:
    """`[n, S, S, 3]` resized crops (pixel values 0..255 in the top-left `[n, 2]` (h, w) corners)
    -> `[n, S/16, S/16, C]` image embeddings."""
    model = nnx.merge(graphdef, state)
    return model.image_embeddings(model.preprocess(pixels, input_sizes))


@functools.partial(jax.jit, static_argnames=("graphdef", "input_hw", "crop_hw", "filters"))
def _crop_candidates(graphdef, state, embedding, coords, point_valid, crop_box, orig_box, thresholds, *,
                     input_hw: tuple[int, int], crop_hw: tuple[int, int], filters: _Filters):
    """Every candidate mask of one crop, filtered and deduplicated over a fixed budget.

    `[1, h, w, C]` embedding, `[nb, B, 2]` points (x, y in the resized frame) with bool `[nb, B]`
    validity, int32 `[4]` crop and image boxes (XYXY), float32 `[4]` thresholds (predicted IoU,
    stability, stability offset, box NMS as `float32_floor`), the resized crop's `input_hw` and the
    crop's `crop_hw` (masks are thresholded at that size, as the reference's) -> dict of
    `[nb * B * 3, ...]` arrays (candidate c is mask c % 3 of point c // 3): "low_res" logits,
    "iou_preds", "stability", "boxes" (crop frame), then "order" (kept candidates first, by
    decreasing predicted IoU) and "kept" (their count)."""
    model = nnx.merge(graphdef, state)
    batch = coords.shape[1]
    labels = jnp.ones((1, batch, 1), jnp.int32)
    iou_thresh, stability_thresh, stability_offset, nms_thresh = thresholds

    def decode(_, points):
        low_res, iou_preds = model.predict_masks(embedding, points[None, :, None, :], labels, multimask_output=True)
        low_res = low_res[0].reshape(-1, *low_res.shape[-2:]).astype(jnp.float32)  # [B * 3, 4h, 4w]
        logits = model.postprocess_masks(low_res, input_hw, crop_hw)
        stability = calculate_stability_score(logits, MASK_THRESHOLD, stability_offset)
        boxes = batched_mask_to_box(logits > MASK_THRESHOLD)
        return None, (low_res, iou_preds[0].reshape(-1).astype(jnp.float32), stability, boxes)

    _, (low_res, iou_preds, stability, boxes) = jax.lax.scan(decode, None, coords)
    low_res = low_res.reshape(-1, *low_res.shape[-2:])
    iou_preds, stability, boxes = iou_preds.reshape(-1), stability.reshape(-1), boxes.reshape(-1, 4)
    valid = jnp.repeat(point_valid.reshape(-1), MASKS_PER_POINT)
    if filters.pred_iou:
        valid &= iou_preds > iou_thresh
    if filters.stability:
        valid &= stability >= stability_thresh
    valid &= ~is_box_near_crop_edge(boxes, crop_box, orig_box)
    order, kept = box_nms(boxes, iou_preds, valid, nms_thresh)
    return dict(low_res=low_res, iou_preds=iou_preds, stability=stability, boxes=boxes, order=order, kept=kept)


@functools.partial(jax.jit, static_argnames=("graphdef", "input_hw", "crop_hw"))
def _binary_masks(graphdef, state, low_res, indices, *, input_hw: tuple[int, int], crop_hw: tuple[int, int]):
    """`[C, 4h, 4w]` logits, int32 `[M]` candidates -> bool `[M, ch, cw]` masks at the crop's size."""
    return nnx.merge(graphdef, state).postprocess_masks(low_res[indices], input_hw, crop_hw) > MASK_THRESHOLD


_nms = jax.jit(box_nms)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Host arrays `[N, 4]`, `[N]` -> int64 indices kept by greedy NMS, by decreasing score. The
    jitted `box_nms` runs on a budget padded to a power of two (few distinct compilations)."""
    n = len(scores)
    if n == 0:
        return np.zeros(0, np.int64)
    budget = max(64, 1 << (n - 1).bit_length())
    pad = budget - n
    order, kept = _nms(np.pad(boxes.astype(np.float32), ((0, pad), (0, 0))),
                       np.pad(scores.astype(np.float32), (0, pad)), np.arange(budget) < n, float32_floor(iou_threshold))
    return np.asarray(order)[: int(kept)].astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Host-side records


@dataclasses.dataclass
class MaskSet:
    """Masks found so far, one row each: bool masks in their crop's frame (`masks[i]` is
    `[crop h, crop w]`, or `[H, W]` once post-processed), int64 `[N, 4]` XYXY boxes in the image
    frame, float32 `[N]` predicted IoUs and stability scores, float64 `[N, 2]` point prompts
    (image frame), int64 `[N, 4]` crop boxes."""

    masks: list[np.ndarray]
    boxes: np.ndarray
    iou_preds: np.ndarray
    stability: np.ndarray
    points: np.ndarray
    crop_boxes: np.ndarray

    def select(self, index: np.ndarray) -> MaskSet:
        """The rows at `index`, in that order."""
        return MaskSet([self.masks[i] for i in index], self.boxes[index], self.iou_preds[index],
                       self.stability[index], self.points[index], self.crop_boxes[index])

    @staticmethod
    def concatenate(sets: Sequence[MaskSet]) -> MaskSet:
        return MaskSet([m for s in sets for m in s.masks], *(np.concatenate([getattr(s, f) for s in sets])
                                                            for f in ("boxes", "iou_preds", "stability", "points",
                                                                      "crop_boxes")))

    def full_mask(self, i: int, height: int, width: int) -> np.ndarray:
        """Row `i`'s mask in the image frame, bool `[height, width]`."""
        if self.masks[i].shape == (height, width):  # the whole image's crop, or post-processed
            return self.masks[i]
        return uncrop_masks(self.masks[i], self.crop_boxes[i].tolist(), height, width)


# ----------------------------------------------------------------------------------------------
# The generator


class AutomaticMaskGenerator:
    """segment_anything's `SamAutomaticMaskGenerator` on an `ovseg_jax.models.sam.Sam` (same options,
    defaults and records; see the module docstring for how it runs). Defaults suit SAM ViT-H."""

    def __init__(self, model: Sam | SamModel, points_per_side: int | None = 32, points_per_batch: int = 64,
                 pred_iou_thresh: float = 0.88, stability_score_thresh: float = 0.95,
                 stability_score_offset: float = 1.0, box_nms_thresh: float = 0.7, crop_n_layers: int = 0,
                 crop_nms_thresh: float = 0.7, crop_overlap_ratio: float = 512 / 1500,
                 crop_n_points_downscale_factor: int = 1, point_grids: Sequence[np.ndarray] | None = None,
                 min_mask_region_area: int = 0, output_mode: str = "binary_mask"):
        if (points_per_side is None) == (point_grids is None):
            raise ValueError("give exactly one of points_per_side and point_grids")
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {OUTPUT_MODES}; got {output_mode!r}")
        if points_per_batch <= 0 or crop_n_layers < 0 or crop_n_points_downscale_factor <= 0:
            raise ValueError("points_per_batch and crop_n_points_downscale_factor must be positive and "
                             f"crop_n_layers >= 0; got {points_per_batch}, {crop_n_points_downscale_factor}, "
                             f"{crop_n_layers}")
        if points_per_side is not None and int(points_per_side / crop_n_points_downscale_factor**crop_n_layers) < 1:
            raise ValueError(f"crop layer {crop_n_layers} has no points: {points_per_side} points a side divided by "
                             f"{crop_n_points_downscale_factor} per layer rounds down to 0")
        if points_per_side is not None:
            point_grids = build_all_layer_point_grids(points_per_side, crop_n_layers, crop_n_points_downscale_factor)
        point_grids = [np.asarray(g, dtype=np.float64).reshape(-1, 2) for g in point_grids]
        if any(len(g) == 0 for g in point_grids[: crop_n_layers + 1]):
            raise ValueError("point_grids: every crop layer needs at least one point")
        if len(point_grids) < crop_n_layers + 1:
            raise ValueError(f"point_grids has {len(point_grids)} grids; crop_n_layers={crop_n_layers} needs "
                             f"{crop_n_layers + 1} (one per layer)")
        model = getattr(model, "model", model)  # an ovseg_jax.sam.SamModel holds the Sam
        self.model = model
        self.transform = ResizeLongestSide(model.config.image_size)
        self.point_grids = point_grids
        self.points_per_batch = points_per_batch
        self.filters = _Filters(pred_iou=pred_iou_thresh > 0.0, stability=stability_score_thresh > 0.0)
        # float32 as the reference's tensor-vs-number comparisons; the NMS one as torchvision's (float64)
        self.thresholds = np.array([pred_iou_thresh, stability_score_thresh, stability_score_offset,
                                    float32_floor(box_nms_thresh)], np.float32)
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode
        self._graphdef, self._state = inference_split(model)

    # -- public

    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        """uint8 `[H, W, 3]` RGB -> one record per mask: "segmentation" (bool `[H, W]`, or an RLE
        dict per `output_mode`), "area" (pixels), "bbox" (XYWH), "predicted_iou", "point_coords"
        ([[x, y]]), "stability_score", "crop_box" (XYWH); in the reference's order."""
        image = _check_image(image)
        height, width = image.shape[:2]
        found = self.generate_masks(image)
        if self.min_mask_region_area > 0:
            found = self.postprocess_small_regions(found, (height, width), self.min_mask_region_area,
                                                   max(self.box_nms_thresh, self.crop_nms_thresh))
        return [self._record(found, i, height, width) for i in range(len(found.masks))]

    def generate_masks(self, image: np.ndarray) -> MaskSet:
        """uint8 `[H, W, 3]` -> the masks of all crops after the per-crop and the cross-crop NMS."""
        height, width = image.shape[:2]
        crop_boxes, layers = generate_crop_boxes((height, width), self.crop_n_layers, self.crop_overlap_ratio)
        embeddings = self._embed_crops(image, crop_boxes, layers)
        found = MaskSet.concatenate([self._process_crop(image.shape[:2], box, layer, embedding)
                                     for box, layer, embedding in zip(crop_boxes, layers, embeddings)])
        if len(crop_boxes) > 1:  # prefer masks from smaller crops
            area = ((found.crop_boxes[:, 2] - found.crop_boxes[:, 0])
                    * (found.crop_boxes[:, 3] - found.crop_boxes[:, 1])).astype(np.float32)
            found = found.select(nms(found.boxes, np.float32(1.0) / area, self.crop_nms_thresh))
        return found

    @staticmethod
    def postprocess_small_regions(found: MaskSet, image_hw: tuple[int, int], min_area: int,
                                  nms_thresh: float) -> MaskSet:
        """Fill holes and drop islands smaller than `min_area` pixels in every mask, then NMS again
        preferring unchanged masks (score 1, changed ones 0); kept changed masks get their new mask
        and box (the reference's `postprocess_small_regions`)."""
        if not found.masks:
            return found
        height, width = image_hw
        cleaned, unchanged = [], []
        for i in range(len(found.masks)):
            mask, holes_changed = remove_small_regions(found.full_mask(i, height, width), min_area, "holes")
            mask, islands_changed = remove_small_regions(mask, min_area, "islands")
            cleaned.append(mask)
            unchanged.append(not (holes_changed or islands_changed))
        boxes = np.concatenate([masks_to_boxes_np(m[None]) for m in cleaned])
        keep = nms(boxes, np.asarray(unchanged, np.float32), nms_thresh)
        found = dataclasses.replace(found, masks=list(found.masks), boxes=found.boxes.copy())
        for i in keep:
            if not unchanged[i]:
                found.masks[i], found.boxes[i] = cleaned[i], boxes[i]  # an image-frame mask from now on
        return found.select(keep)

    # -- steps

    def _embed_crops(self, image: np.ndarray, crop_boxes: list[list[int]], layers: list[int]) -> list[jax.Array]:
        """Each crop resized (PIL bilinear) into the corner of a square input, the crops of a layer
        encoded `ENCODER_BATCH` at a time -> one `[1, S/16, S/16, C]` embedding per crop."""
        size = self.transform.target_length
        embeddings = []
        for layer in sorted(set(layers)):
            boxes = [box for box, crop_layer in zip(crop_boxes, layers) if crop_layer == layer]
            for start in range(0, len(boxes), ENCODER_BATCH):
                group = boxes[start:start + ENCODER_BATCH]
                pixels = np.zeros((len(group), size, size, 3), np.float32)
                input_sizes = np.zeros((len(group), 2), np.int32)
                for i, (x0, y0, x1, y1) in enumerate(group):
                    resized = self.transform.apply_image(image[y0:y1, x0:x1])
                    pixels[i, : resized.shape[0], : resized.shape[1]] = resized
                    input_sizes[i] = resized.shape[:2]
                batch = _embed(self._graphdef, self._state, pixels, input_sizes)
                embeddings += [batch[i:i + 1] for i in range(len(group))]
        return embeddings

    def _process_crop(self, image_hw: tuple[int, int], crop_box: list[int], layer: int,
                      embedding: jax.Array) -> MaskSet:
        """One crop's masks after its NMS, by decreasing predicted IoU, boxes and points in the image frame."""
        height, width = image_hw
        x0, y0, x1, y1 = crop_box
        crop_hw = (y1 - y0, x1 - x0)
        input_hw = self.transform.target_size(crop_hw)
        points = self.point_grids[layer] * np.array(crop_hw)[None, ::-1]  # crop frame, float64
        coords = self.transform.apply_coords(points, crop_hw)
        batch = self.points_per_batch
        n_batches = max(1, -(-len(points) // batch))
        padded = np.zeros((n_batches * batch, 2), np.float32)
        padded[: len(points)] = coords
        point_valid = np.arange(n_batches * batch) < len(points)
        geometry = dict(input_hw=input_hw, crop_hw=crop_hw)
        out = _crop_candidates(self._graphdef, self._state, embedding, padded.reshape(n_batches, batch, 2),
                               point_valid.reshape(n_batches, batch), np.asarray(crop_box, np.int32),
                               np.asarray([0, 0, width, height], np.int32), self.thresholds, filters=self.filters,
                               **geometry)
        kept = int(out["kept"])
        order = np.asarray(out["order"])[:kept]
        masks = []
        for start in range(0, kept, batch):  # fixed-size chunks: one compilation
            chunk = np.zeros(batch, np.int32)
            chunk[: min(batch, kept - start)] = order[start:start + batch]
            chunk_masks = _binary_masks(self._graphdef, self._state, out["low_res"], chunk, **geometry)
            masks += list(np.asarray(chunk_masks)[: kept - start])
        return MaskSet(
            masks=masks,
            boxes=uncrop_boxes_xyxy(np.asarray(out["boxes"])[order].astype(np.int64), crop_box),
            iou_preds=np.asarray(out["iou_preds"])[order],
            stability=np.asarray(out["stability"])[order],
            points=uncrop_points(points[order // MASKS_PER_POINT], crop_box),
            crop_boxes=np.tile(np.asarray(crop_box, np.int64), (kept, 1)))

    def _record(self, found: MaskSet, i: int, height: int, width: int) -> dict[str, Any]:
        mask = found.full_mask(i, height, width)
        if self.output_mode == "binary_mask":
            segmentation = mask
        else:
            segmentation = mask_to_rle(mask[None])[0]
            if self.output_mode == "coco_rle":
                segmentation = coco_encode(segmentation)
        return {
            "segmentation": segmentation,
            "area": int(mask.sum()),
            "bbox": box_xyxy_to_xywh(found.boxes[i]),
            "predicted_iou": float(found.iou_preds[i]),
            "point_coords": [found.points[i].tolist()],
            "stability_score": float(found.stability[i]),
            "crop_box": box_xyxy_to_xywh(found.crop_boxes[i]),
        }


def _check_image(image) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3 or 0 in image.shape:
        raise ValueError(f"generate takes a uint8 [H, W, 3] RGB image; got {image.dtype} {image.shape}")
    return image
