"""Public segmenter API: build the MaskFormer segmenter from checkpoints users have, export it back.

    segmenter = ovseg_jax.segmenter.load("ovseg_swinbase_vitL14_ft_mpt.pth")   # or a training workdir
    out = segmenter(normalize_images(images), text_bank)    # see models/maskformer.Segmenter
    segmenter.config                                        # its SegmenterConfig
    ovseg_jax.segmenter.export(segmenter, "segmenter.pth", clip=clip)

Accepted by `load(path)`:
- a segmenter-stage training workdir (`python -m ovseg_jax.train`; its latest checkpoint, or
  `step=`), the architecture from its saved config. Its frozen CLIP: `ovseg_jax.clip.load(workdir)`.
- an OVSeg checkpoint (reference 6.1): `.pth`/`.pkl`/`.safetensors` with `backbone.*`,
  `sem_seg_head.*` and `clip_adapter.non_object_embedding` (detectron2's `{"model": ...}` wrapper
  or flat). Its CLIP (`clip_adapter.clip_model.*`) is ignored here: load it with `ovseg_jax.clip.load`.
- a transformers MaskFormer directory (config.json + model.safetensors / pytorch_model.bin) with a
  Swin backbone. Its closed-vocabulary `class_predictor` is dropped; the open-vocabulary head
  (`class_embed`, `non_object_embedding`) starts from a fresh initialisation.
- backbone-only initialisation files (official Swin `model` dict, transformers Swin, detectron2 /
  torchvision ResNet): the backbone is loaded, everything else is freshly initialised.
The architecture is read off the weights (plus a `<path>.ovseg_jax.json` sidecar written by
`export` when the weights alone do not determine it), or given with `config=`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ovseg_jax.convert import backbone_keys, segmenter_keys as keys
from ovseg_jax.convert.params import nnx_to_torch, on_device, torch_to_nnx, unfilled
from ovseg_jax.training import checkpoint
from ovseg_jax.convert.torch_io import (SIDECAR_SUFFIX, CheckpointError, check_sidecar_fields, read_json,
                                        read_safetensors, read_sidecar, read_state_dict, write_safetensors,
                                        write_sidecar, write_torch_file)
from ovseg_jax.inference.masked_crops import CLIP_MEAN, CLIP_STD
from ovseg_jax.models.maskformer import Segmenter, SegmenterConfig
from ovseg_jax.models.resnet import ResNetConfig
from ovseg_jax.models.swin import SwinConfig, relative_position_index

log = logging.getLogger(__name__)

__all__ = ["load", "export", "CheckpointError"]

CLIP_PREFIX = "clip_adapter.clip_model."
WORKDIR_PREFIX = "segmenter/"  # parameter paths of the segmenter stage (tasks/segmenter.py's wrapper)


def _strip_model_wrapper(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """detectron2 files are `{"model": {...}}` (flattened to `model.*` keys); drop the wrapper and
    any non-tensor siblings (`iteration`, ...)."""
    inner = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    if len(inner) == len(state) or keys.OVSEG_ANCHOR in inner:
        return inner
    return state


def _backbone_kind(backbone_state: dict[str, np.ndarray]) -> str | None:
    if "patch_embed.proj.weight" in backbone_state:
        return "swin"
    if "stem.conv1.weight" in backbone_state:
        return "resnet"
    return None


def _read_sidecar(path: Path) -> SegmenterConfig | None:
    recorded = read_sidecar(path, "segmenter")
    if recorded is None:
        return None
    where = f"{path}{SIDECAR_SUFFIX} (section 'segmenter')"
    check_sidecar_fields(recorded, SegmenterConfig, where)
    backbones = {"swin": SwinConfig, "resnet": ResNetConfig}
    if recorded.get("backbone") in backbones and isinstance(recorded.get("backbone_config"), dict):
        check_sidecar_fields(recorded["backbone_config"], backbones[recorded["backbone"]], f"{where}, backbone_config")
    try:
        return SegmenterConfig.from_dict(recorded)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{where}: not a segmenter config: {type(e).__name__}: {e}") from None


def _ovseg_config(head: dict, backbone: dict, source: str) -> SegmenterConfig:
    kind = _backbone_kind(backbone)
    if kind == "swin":
        backbone_config = keys.swin_config_from_state(backbone, source)
    elif kind == "resnet":
        backbone_config = keys.resnet_config_from_state(backbone, source)
    else:
        raise CheckpointError(f"{source}: no backbone weights found (expected backbone.patch_embed.* for "
                              "Swin or backbone.stem.* for ResNet)")
    return SegmenterConfig(backbone=kind, backbone_config=backbone_config,
                           **keys.head_config_from_state(head, source))


def _load_ovseg(state: dict, path: Path, config: SegmenterConfig | None, dtype) -> Segmenter:
    head, backbone, other = keys.split_ovseg(state)
    unexpected = [k for k in other if not k.startswith(keys.OVSEG_OTHER_PREFIXES)]
    if unexpected:
        raise CheckpointError(f"{path}: unexpected keys in an OVSeg checkpoint ({len(unexpected)}): "
                              + ", ".join(sorted(unexpected)[:20]))
    config = config or _read_sidecar(path) or _ovseg_config(head, backbone, str(path))
    model = unfilled(lambda rngs: Segmenter(config, dtype=dtype, rngs=rngs))  # the file fills every parameter
    converted = _backbone_to_ours(config.backbone, backbone)
    torch_to_nnx({**{"backbone." + k: v for k, v in converted.items()}, **head}, model,
                 source=f"{path} (OVSeg layout)")
    return on_device(model)


def _backbone_to_ours(kind: str, state: dict) -> dict:
    if kind == "swin":
        return backbone_keys.swin_from_official(state)
    return backbone_keys.resnet_from_detectron2(state)


def _read_hf_weights(directory: Path) -> dict[str, np.ndarray]:
    if (directory / "model.safetensors").is_file():
        return read_safetensors(directory / "model.safetensors")
    if (directory / "model.safetensors.index.json").is_file():
        index = read_json(directory / "model.safetensors.index.json")
        state = {}
        for shard in sorted(set(index.get("weight_map", {}).values())):
            state.update(read_safetensors(directory / shard))
        return state
    if (directory / "pytorch_model.bin").is_file():
        return read_state_dict(directory / "pytorch_model.bin")
    raise CheckpointError(f"{directory}: transformers MaskFormer directory without weights; expected "
                          "model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _load_hf(directory: Path, config: SegmenterConfig | None, clip_dim: int, dtype) -> Segmenter:
    cfg_file = directory / "config.json"
    hf = read_json(cfg_file)
    if hf.get("model_type") != "maskformer":
        raise CheckpointError(f"{cfg_file}: model_type {hf.get('model_type')!r}; expected a transformers "
                              "'maskformer' checkpoint")
    if config is None:
        backbone_config = keys.swin_config_from_hf(hf.get("backbone_config") or {}, str(cfg_file))
        config = SegmenterConfig(backbone="swin", backbone_config=backbone_config, clip_dim=clip_dim,
                                 **keys.head_config_from_hf(hf))
    state = _read_hf_weights(directory)
    head, backbone = keys.hf_maskformer_to_ours(state, num_features=4, source=str(directory))
    model = Segmenter(config, dtype=dtype, rngs=nnx.Rngs(0))
    converted = backbone_keys.swin_from_transformers(backbone)
    torch_to_nnx({**{"backbone." + k: v for k, v in converted.items()}, **head}, model,
                 source=f"{directory} (transformers MaskFormer)",
                 ignore_missing=("class_embed.", "non_object_embedding"))
    log.info("%s: closed-vocabulary class_predictor dropped; class_embed and non_object_embedding "
             "freshly initialised (clip_dim %d)", directory, config.clip_dim)
    return model


def _backbone_config_from_file(state: dict, path: Path):
    """(kind, backbone config) of a backbone-only file in any layout `backbone_keys` converts."""
    for convert in (backbone_keys.swin_from_official, backbone_keys.swin_from_transformers):
        ours = convert(state)
        if "patch_embed.proj.weight" in ours:
            return "swin", keys.swin_config_from_state(ours, str(path))
    for convert in (backbone_keys.resnet_from_detectron2, backbone_keys.resnet_from_torchvision):
        ours = convert(state)
        if "stem.conv1.weight" in ours:
            return "resnet", keys.resnet_config_from_state(ours, str(path))
    raise CheckpointError(f"{path}: neither an OVSeg segmenter checkpoint (no {keys.OVSEG_ANCHOR}) nor a "
                          f"Swin / ResNet backbone checkpoint (for a transformers MaskFormer, pass its directory); "
                          f"keys start with {sorted(state)[:5]}")


def _load_backbone_only(state: dict, path: Path, config: SegmenterConfig | None, clip_dim: int,
                        dtype) -> Segmenter:
    if config is None:
        kind, backbone_config = _backbone_config_from_file(state, path)
        config = SegmenterConfig(backbone=kind, backbone_config=backbone_config, clip_dim=clip_dim)
    model = Segmenter(config, dtype=dtype, rngs=nnx.Rngs(0))
    backbone_keys.load_backbone_weights(model.backbone, state, source=str(path))
    log.info("%s: backbone initialised from the file; pixel decoder, transformer decoder and heads "
             "freshly initialised", path)
    return model


def _load_workdir(path: Path, config: SegmenterConfig | None, step: int | None, dtype) -> Segmenter:
    saved = checkpoint.stage_config(path, "segmenter", step)
    config = config or SegmenterConfig.from_dict(saved["model"]["segmenter"])
    # initialised, not `unfilled`: non-parameter state a run did not save keeps its initial value
    model = Segmenter(config, dtype=dtype, rngs=nnx.Rngs(0))
    checkpoint.restore_params(model, path, step=step, prefix=WORKDIR_PREFIX)
    return model


def load(path: str | os.PathLike, *, config: SegmenterConfig | None = None, clip_dim: int | None = None,
         step: int | None = None, dtype=jnp.float32) -> Segmenter:
    """Build a `Segmenter` from a checkpoint or a training workdir (see the module docstring); its
    architecture is `segmenter.config`.

    config: the architecture, instead of reading it off the weights / the workdir's config (needed
        for settings the weights do not show, e.g. decoder heads != 8 or a ResNet's dilations,
        unless a sidecar has them).
    clip_dim: width of the open-vocabulary head for files without one (transformers MaskFormer,
        backbone-only); default 768 (CLIP ViT-L/14). Not allowed together with `config`.
    step: which checkpoint of a training workdir (default the latest); only for workdirs.
    dtype: compute dtype; parameters stay float32.
    """
    path = Path(path)
    if config is not None and clip_dim is not None:
        raise ValueError("pass clip_dim inside config (config.clip_dim), not both")
    clip_dim = 768 if clip_dim is None else clip_dim
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if checkpoint.is_checkpoint_dir(path):
        return _load_workdir(path, config, step, dtype)
    if step is not None:
        raise ValueError(f"{path}: step={step} is only for training workdirs (<workdir>/checkpoints/<step>)")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: a directory must be a segmenter training workdir "
                                  "(checkpoints/<step>/params) or a transformers MaskFormer checkpoint "
                                  "(config.json + model.safetensors)")
        return _load_hf(path, config, clip_dim, dtype)
    state = _strip_model_wrapper(read_state_dict(path))
    if keys.OVSEG_ANCHOR in state:
        return _load_ovseg(state, path, config, dtype)
    if any(k.startswith("sem_seg_head.") for k in state):
        raise CheckpointError(f"{path}: has sem_seg_head.* keys but no {keys.OVSEG_ANCHOR}: not a MaskFormer/"
                              "OVSeg segmenter checkpoint this loader knows")
    return _load_backbone_only(state, path, config, clip_dim, dtype)


# ---------------------------------------------------------------------------------------------
# Export


def ovseg_state_dict(segmenter: Segmenter, clip=None) -> dict[str, np.ndarray]:
    """The segmenter's parameters under OVSeg key names (reference 6.1), float32, plus Swin's
    `relative_position_index` buffers; with `clip` (an `ovseg_jax.clip.Clip` or `CLIP`) also
    `clip_adapter.clip_model.*` and the CLIP pixel statistics, as in a released checkpoint."""
    state = keys.to_ovseg(nnx_to_torch(segmenter))
    bc = segmenter.config.backbone_config
    if segmenter.config.backbone == "swin":
        index = relative_position_index(bc.window_size).astype(np.int64)
        for i, depth in enumerate(bc.depths):
            for j in range(depth):
                state[f"backbone.layers.{i}.blocks.{j}.attn.relative_position_index"] = index
    if clip is not None:
        from ovseg_jax.clip import openai_state_dict  # noqa: PLC0415

        state.update({f"{CLIP_PREFIX}{k}": v for k, v in openai_state_dict(clip).items()})
        state["clip_adapter.pixel_mean"] = (255 * np.asarray(CLIP_MEAN, np.float32)).reshape(1, 3, 1, 1)
        state["clip_adapter.pixel_std"] = (255 * np.asarray(CLIP_STD, np.float32)).reshape(1, 3, 1, 1)
    return state


def export(segmenter: Segmenter, path: str | os.PathLike, *, clip=None) -> Path:
    """Write `segmenter` in the OVSeg layout: `.safetensors` (flat OVSeg names) by extension, else a
    detectron2-style `torch.save({"model": {...}})` file (needs torch). With `clip`, the CLIP goes in
    as `clip_adapter.clip_model.*` (see `ovseg_state_dict`). When the weights alone do not determine
    the architecture (e.g. decoder heads != 8), a sidecar `<path>.ovseg_jax.json` records it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = ovseg_state_dict(segmenter, clip)
    if path.suffix == ".safetensors":
        write_safetensors(state, path, metadata={"format": "pt"})
    else:
        write_torch_file({"model": state}, path)
    head, backbone, _ = keys.split_ovseg(state)
    derived = _ovseg_config(head, backbone, str(path))
    write_sidecar(path, "segmenter", None if derived == segmenter.config else segmenter.config.to_dict())
    if clip is not None:
        from ovseg_jax.clip import write_clip_sidecar  # noqa: PLC0415

        clip_state = {k[len(CLIP_PREFIX):]: v for k, v in state.items() if k.startswith(CLIP_PREFIX)}
        write_clip_sidecar(path, (clip.model if hasattr(clip, "model") else clip).config, clip_state)
    return path
