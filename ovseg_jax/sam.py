"""Public SAM API: load the checkpoints users have, embed images, predict masks, export back.

    sam = ovseg_jax.sam.load("sam_vit_b_01ec64.pth")                 # or a transformers SamModel directory
    embedding = sam.embed(image)                                       # [H, W, 3] uint8 RGB
    masks, iou, low_res = sam.predict(embedding, point_coords=[[[500, 375]]], point_labels=[[1]])
    # masks [N, 3, H, W] bool, iou [N, 3], low_res [N, 3, 256, 256] logits

Accepted checkpoints (`load(path)`): the released `segment_anything` state dicts
(`sam_vit_{b,l,h}_*.pth`, read with `torch.load(weights_only=True)`, or the same keys as
`.safetensors`), and transformers `SamModel` directories (config.json + model.safetensors /
pytorch_model.bin). `export` writes either layout back. The model itself is
`ovseg_jax.models.sam.Sam` (`SamModel.model`), whose `preprocess` / `image_embeddings` /
`predict_masks` / `postprocess_masks` work on batches inside `jax.jit`.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ovseg_jax.convert import sam_keys
from ovseg_jax.convert.params import nnx_to_torch, on_device, torch_to_nnx, unfilled
from ovseg_jax.convert.torch_io import (
    CheckpointError,
    read_json,
    read_safetensors,
    read_state_dict,
    write_safetensors,
    write_torch_file,
)
from ovseg_jax.models.layers import inference_split
from ovseg_jax.models.sam import Sam, SamConfig
from ovseg_jax.models.sam.transforms import ResizeLongestSide

__all__ = ["SamModel", "ImageEmbedding", "load", "export", "segment_anything_state_dict", "CheckpointError"]


class ImageEmbedding(NamedTuple):
    """An embedded image: `embedding [h, w, C]` float32, the resized `input_size (h, w)` and the
    `original_size (H, W)` in pixels."""

    embedding: jax.Array
    input_size: tuple[int, int]
    original_size: tuple[int, int]


@functools.partial(jax.jit, static_argnums=0)
def _embed(graphdef, state, padded_pixels, image_sizes):
    model = nnx.merge(graphdef, state)
    return model.image_embeddings(model.preprocess(padded_pixels, image_sizes))


@functools.partial(jax.jit, static_argnums=(0, 6))
def _decode(graphdef, state, embeddings, point_coords, point_labels, boxes_and_masks, multimask_output):
    model = nnx.merge(graphdef, state)
    boxes, mask_inputs = boxes_and_masks
    return model.predict_masks(embeddings, point_coords, point_labels, boxes, mask_inputs,
                               multimask_output=multimask_output)


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _postprocess(graphdef, state, low_res, input_size, original_size):
    return nnx.merge(graphdef, state).postprocess_masks(low_res, input_size, original_size)


class SamModel:
    """A loaded SAM with jitted image embedding and prompting (SamPredictor's workflow). The image
    encoder compiles once per model (images are padded to the square input on the host); the
    decoder once per prompt shape."""

    def __init__(self, model: Sam):
        self.model = model
        self.transform = ResizeLongestSide(model.config.image_size)

    @property
    def config(self) -> SamConfig:
        return self.model.config

    def embed(self, image: np.ndarray) -> ImageEmbedding:
        """`[H, W, 3]` uint8 RGB image -> its `ImageEmbedding` (resized with `ResizeLongestSide`,
        normalised, padded, encoded)."""
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"embed takes one [H, W, 3] uint8 RGB image; got {image.dtype} {image.shape}")
        resized = self.transform.apply_image(image)
        s = self.config.image_size
        padded = np.zeros((1, s, s, 3), np.float32)
        padded[0, :resized.shape[0], :resized.shape[1]] = resized
        graphdef, state = inference_split(self.model)
        embedding = _embed(graphdef, state, padded, np.asarray([resized.shape[:2]], np.int32))
        return ImageEmbedding(embedding[0], tuple(resized.shape[:2]), tuple(image.shape[:2]))

    def predict(self, embedding: ImageEmbedding, point_coords=None, point_labels=None, boxes=None,
                mask_input=None, *, multimask_output: bool = True,
                return_logits: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Masks for N prompt sets on one embedded image (as `SamPredictor.predict_torch`).

        point_coords `[N, P, 2]` (x, y) and boxes `[N, 4]` (x0, y0, x1, y1) in pixels of the
        ORIGINAL image (resized here as `ResizeLongestSide.apply_coords` / `apply_boxes` do);
        point_labels `[N, P]` (1 foreground, 0 background, -1 padding); mask_input `[N, 4h, 4w]`
        low-resolution logits (a previous `low_res` output).
        -> (masks `[N, K, H, W]` bool (logits with `return_logits`), IoU predictions `[N, K]`,
        low-resolution logits `[N, K, 4h, 4w]`), K = 3 with `multimask_output`, else 1.
        """
        if (point_coords is None) != (point_labels is None):
            raise ValueError("point_coords and point_labels go together (both or neither)")
        original = embedding.original_size
        coords = labels = None
        if point_coords is not None:
            coords = self.transform.apply_coords(np.asarray(point_coords, np.float64), original)
            coords, labels = coords.astype(np.float32)[None], np.asarray(point_labels, np.int32)[None]
            if coords.ndim != 4 or labels.shape != coords.shape[:3]:
                raise ValueError(f"point_coords must be [N, P, 2] and point_labels [N, P]; got "
                                 f"{coords.shape[1:]} and {labels.shape[1:]}")
        if boxes is not None:
            boxes = self.transform.apply_boxes(np.asarray(boxes, np.float64), original).astype(np.float32)[None]
        if mask_input is not None:
            mask_input = np.asarray(mask_input, np.float32)[None]
        graphdef, state = inference_split(self.model)
        low_res, iou = _decode(graphdef, state, embedding.embedding[None], coords, labels, (boxes, mask_input),
                               multimask_output)
        masks = _postprocess(graphdef, state, low_res[0], tuple(embedding.input_size), tuple(original))
        return (masks if return_logits else masks > 0.0), iou[0], low_res[0]


# ---------------------------------------------------------------------------------------------
# Loading


def _read_transformers_dir(directory: Path) -> tuple[dict[str, np.ndarray], SamConfig]:
    config_file = directory / "config.json"
    config = sam_keys.config_from_transformers(read_json(config_file), str(config_file))
    if (directory / "model.safetensors").is_file():
        state = read_safetensors(directory / "model.safetensors")
    elif (directory / "model.safetensors.index.json").is_file():
        index = read_json(directory / "model.safetensors.index.json")
        state = {}
        for shard in sorted(set(index.get("weight_map", {}).values())):
            state.update(read_safetensors(directory / shard))
    elif (directory / "pytorch_model.bin").is_file():
        state = read_state_dict(directory / "pytorch_model.bin")
    else:
        raise CheckpointError(f"{directory}: transformers SAM directory without weights; expected "
                              "model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    return sam_keys.transformers_to_segment_anything(state), config


def _read_checkpoint(path: Path, decoder_heads: int) -> tuple[dict[str, np.ndarray], SamConfig, str]:
    """A SAM file or directory -> (segment_anything-layout state dict, architecture, layout name)."""
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: a directory must be a transformers SAM checkpoint "
                                  "(config.json + model.safetensors / pytorch_model.bin)")
        state, config = _read_transformers_dir(path)
        return state, config, "transformers"
    state = read_state_dict(path)
    if sam_keys.is_transformers_layout(state):
        config_file = path.parent / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{path}: transformers-layout SAM weights need their config.json next to them")
        config = sam_keys.config_from_transformers(read_json(config_file), str(config_file))
        return sam_keys.transformers_to_segment_anything(state), config, "transformers"
    if not any(k.startswith(sam_keys.SEGMENT_ANYTHING_PREFIXES) for k in state):
        raise CheckpointError(f"{path}: not a SAM checkpoint: expected segment_anything keys (image_encoder.*, "
                              f"prompt_encoder.*, mask_decoder.*) or a transformers SamModel (vision_encoder.*); "
                              f"found keys such as {sorted(state)[:6]}")
    return state, sam_keys.config_from_segment_anything(state, str(path), decoder_heads), "segment_anything"


def load(path: str | os.PathLike, *, dtype=jnp.float32, decoder_heads: int = 8) -> SamModel:
    """Load a SAM checkpoint (see the module docstring for the accepted layouts).

    dtype: compute dtype (float32 or bfloat16); parameters stay float32.
    decoder_heads: the mask decoder's attention heads for segment_anything files, whose tensor
        shapes do not show it (8 in every released model); transformers configs state it.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    state, config, layout = _read_checkpoint(path, decoder_heads)
    # no random initialisation (636M draws for ViT-H): the file fills every parameter or torch_to_nnx raises
    model = unfilled(lambda rngs: Sam(config, dtype=dtype, rngs=rngs))
    torch_to_nnx(sam_keys.to_nnx_layout(state), model, source=f"{path} ({layout} layout)")
    on_device(model)
    return SamModel(model)


# ---------------------------------------------------------------------------------------------
# Export


def segment_anything_state_dict(model: SamModel | Sam) -> dict[str, np.ndarray]:
    """Float32 parameters under segment_anything's key names (what `sam_model_registry[...]`
    loads with `load_state_dict`)."""
    model = model.model if isinstance(model, SamModel) else model
    return sam_keys.from_nnx_layout(nnx_to_torch(model))


def export(model: SamModel | Sam, path: str | os.PathLike, format: str = "segment_anything") -> Path:
    """Write `model` for PyTorch.

    format="segment_anything": one state-dict file as released (`torch.save`, or safetensors by a
        `.safetensors` suffix); `segment_anything.build_sam*(checkpoint=path)` loads it when the
        architecture is a released one (ViT-B/L/H at 1024, 8 decoder heads).
    format="transformers": a directory (config.json + model.safetensors) that
        `transformers.SamModel.from_pretrained` loads.
    """
    path = Path(path)
    config = (model.model if isinstance(model, SamModel) else model).config
    state = segment_anything_state_dict(model)
    if format == "transformers":
        from transformers import SamConfig as HFSamConfig  # noqa: PLC0415

        path.mkdir(parents=True, exist_ok=True)
        HFSamConfig(**sam_keys.transformers_config_dict(config)).save_pretrained(str(path))
        write_safetensors(sam_keys.segment_anything_to_transformers(state), path / "model.safetensors",
                          metadata={"format": "pt"})
        return path
    if format != "segment_anything":
        raise ValueError(f"format must be 'segment_anything' or 'transformers'; got {format!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        write_safetensors(state, path, metadata={"format": "pt"})
    else:
        write_torch_file(state, path)
    return path
