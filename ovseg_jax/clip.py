"""Public CLIP API: load checkpoints users have, encode images/text, export back to PyTorch.

    clip = ovseg_jax.clip.load("ovseg_swinbase_vitL14_ft_mpt.pth", tokenizer="bpe_simple_vocab_16e6.txt.gz")
    text = clip.class_embeddings(["cat", "wall-brick"])            # [C, D], unit norm
    feats = clip.encode_image(crops, region_masks)                  # [N, D], unit norm
    logits = 100 * feats @ text.T

Accepted checkpoints (`load(path)`): a transformers CLIP directory (config.json + model.safetensors
or pytorch_model.bin), an OpenAI / open_clip state-dict file (.pt/.pth/.bin/.safetensors, fp16 or
fp32, TorchScript archives read without running their code), an OVSeg checkpoint (`model` dict
with `clip_adapter.clip_model.*` keys, incl. `visual.mask_embedding`), an open_clip training
checkpoint (`state_dict` with `module.` prefixes), and training workdirs (`python -m
ovseg_jax.train`): a CLIP stage's (its CLIP, with the tokenizer the run used) or a segmenter
stage's (the frozen CLIP that embedded its class names: `config.model.clip_init`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ovseg_jax.convert import clip_keys
from ovseg_jax.convert.params import nnx_to_torch, on_device, torch_to_nnx, unfilled
from ovseg_jax.training import checkpoint
from ovseg_jax.convert.torch_io import (SIDECAR_SUFFIX, CheckpointError, check_sidecar_fields, read_json,
                                        read_safetensors, read_sidecar, read_state_dict, write_safetensors,
                                        write_sidecar, write_torch_file)
from ovseg_jax.models.clip import CLIP, ClipConfig
from ovseg_jax.models.layers import inference_split
from ovseg_jax.text import Tokenizer, templates as resolve_templates

log = logging.getLogger(__name__)

__all__ = ["Clip", "load", "export", "openai_state_dict", "CheckpointError"]

_ANCHORS = ("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight")
_TEXT_BUCKET = 256  # texts per text-tower call; smaller batches are padded to a power of two
# Up to this many new class names are encoded one name (its T template texts) per call: a new class
# list then reuses the one compiled [T, L] text tower instead of compiling its own power of two.
_FEW_NAMES = 16


def _l2_normalize(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


@functools.partial(jax.jit, static_argnums=0)
def _normalized_image_features(graphdef, state, images, region_masks):
    model = nnx.merge(graphdef, state)
    return _l2_normalize(model.encode_image(images, region_masks))


@functools.partial(jax.jit, static_argnums=0)
def _normalized_text_features(graphdef, state, token_ids):
    model = nnx.merge(graphdef, state)
    return _l2_normalize(model.encode_text(token_ids))


class Clip:
    """A loaded CLIP model with its tokenizer; every output is float32 and L2-normalised."""

    def __init__(self, model: CLIP, tokenizer: Tokenizer | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self._class_cache: dict[tuple[str, tuple[str, ...]], np.ndarray] = {}

    @property
    def config(self) -> ClipConfig:
        return self.model.config

    def encode_image(self, images, region_masks=None) -> jax.Array:
        """`[N, H, W, 3]` CLIP-normalised images (+ `[N, H, W]` 0/1 region masks) -> `[N, D]`.

        With mask prompts in the model and `region_masks` given, background patches get the
        learned mask prompts (reference 1.9); without masks the plain ViT forward is used.
        """
        images = jnp.asarray(images, jnp.float32)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [N, H, W, 3] (NHWC); got shape {images.shape}")
        if region_masks is not None:
            region_masks = jnp.asarray(region_masks, jnp.float32)
            if region_masks.shape != images.shape[:3]:
                raise ValueError(f"region_masks must be [N, H, W] = {images.shape[:3]}; got {region_masks.shape}")
        graphdef, state = inference_split(self.model)
        return _normalized_image_features(graphdef, state, images, region_masks)

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        if self.tokenizer is None:
            raise ValueError("this CLIP was loaded without a tokenizer: pass tokenizer= (a tokenizer "
                             "directory or OpenAI's bpe_simple_vocab_16e6.txt.gz) to ovseg_jax.clip.load")
        return self.tokenizer(list(texts))

    def encode_text(self, texts: Sequence[str]) -> jax.Array:
        """`texts` (N strings) -> `[N, D]`. Batches are padded to a few fixed sizes so that
        the text tower compiles at most a handful of times."""
        ids = self.tokenize(texts)
        n = len(ids)
        if n == 0:
            return jnp.zeros((0, self.config.embed_dim), jnp.float32)
        graphdef, state = inference_split(self.model)
        chunks = []
        for start in range(0, n, _TEXT_BUCKET):
            part = ids[start:start + _TEXT_BUCKET]
            size = min(_TEXT_BUCKET, 1 << (len(part) - 1).bit_length())
            padded = np.zeros((size, ids.shape[1]), ids.dtype)
            padded[:len(part)] = part
            padded[len(part):] = part[0]
            chunks.append(_normalized_text_features(graphdef, state, jnp.asarray(padded))[:len(part)])
        return jnp.concatenate(chunks)

    def class_embeddings(self, names: Sequence[str], templates: str | Sequence[str] = "vild") -> jax.Array:
        """Template-ensembled class embeddings `[C, D]` (reference 2): each name is formatted into
        every template, encoded and normalised; the mean over templates is normalised again.
        Names are stripped of surrounding whitespace and cached per (name, templates); up to
        `_FEW_NAMES` new names are encoded one name per call (one compiled shape per template count)."""
        temps = resolve_templates(templates)
        names = [n.strip() for n in names]
        if not names:
            raise ValueError("class_embeddings needs at least one class name; got an empty list")
        todo = list(dict.fromkeys(n for n in names if (n, temps) not in self._class_cache))
        if todo:
            if len(todo) <= _FEW_NAMES:
                feats = np.concatenate([np.asarray(self.encode_text([t.format(n) for t in temps])) for n in todo])
            else:
                feats = self.encode_text([t.format(n) for n in todo for t in temps])
            feats = np.asarray(feats).reshape(len(todo), len(temps), -1).mean(axis=1)
            feats /= np.linalg.norm(feats, axis=-1, keepdims=True)
            for name, f in zip(todo, feats):
                self._class_cache[(name, temps)] = f
        # device_put, not jnp.asarray: JAX compiles a staging program per shape for the latter
        return jax.device_put(np.stack([self._class_cache[(n, temps)] for n in names]))


# ---------------------------------------------------------------------------------------------
# Loading


def _find_clip_prefix(state: dict[str, np.ndarray], source: str) -> str:
    prefixes = {k[: -len(a)] for k in state for a in _ANCHORS if k.endswith(a)}
    if not prefixes:
        raise CheckpointError(f"{source}: no CLIP weights found (looked for keys ending in "
                              f"{' or '.join(_ANCHORS)}); keys start with {sorted(state)[:6]}")
    if len(prefixes) > 1:
        raise CheckpointError(f"{source}: several CLIP models in one file (prefixes {sorted(prefixes)})")
    return prefixes.pop()


def _read_hf_dir(directory: Path) -> tuple[dict[str, np.ndarray], ClipConfig]:
    config = clip_keys.config_from_hf(read_json(directory / "config.json"), str(directory / "config.json"))
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
        raise CheckpointError(f"{directory}: transformers CLIP directory without weights; expected "
                              "model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    return state, config


def _read_checkpoint(path: Path) -> tuple[dict[str, np.ndarray], ClipConfig, str]:
    """Any supported file/dir -> (OpenAI-layout state dict, architecture, layout name)."""
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: a directory must be a transformers CLIP checkpoint "
                                  "(config.json + model.safetensors / pytorch_model.bin)")
        state, config = _read_hf_dir(path)
        return clip_keys.hf_to_openai(state), config, "transformers"
    raw = read_state_dict(path)
    prefix = _find_clip_prefix(raw, str(path))
    state = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
    if clip_keys.is_hf_layout(state):
        cfg_file = path.parent / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"{path}: transformers-layout weights need their config.json next to them")
        return clip_keys.hf_to_openai(state), clip_keys.config_from_hf(read_json(cfg_file), str(cfg_file)), "transformers"
    for extra in clip_keys.OPENAI_EXTRA_KEYS:
        state.pop(extra, None)
    layout = {"": "openai", "module.": "open_clip", "state_dict.module.": "open_clip",
              "state_dict.": "open_clip"}.get(prefix, "ovseg" if "clip_adapter" in prefix else prefix)
    recorded = read_sidecar(path, "clip")
    if recorded is not None:
        check_sidecar_fields(recorded, ClipConfig, f"{path}{SIDECAR_SUFFIX} (section 'clip')")
    config = ClipConfig(**recorded) if recorded is not None else clip_keys.config_from_openai(state, str(path))
    return state, config, layout


def _prompt_depth(config: ClipConfig, has_prompts: bool, requested: int | None,
                  source: Path) -> tuple[ClipConfig, bool, bool]:
    """`config` with the requested mask prompt depth -> (config, drop the checkpoint's prompts,
    initialise fresh prompts); see `load`."""
    if requested is None or requested == config.mask_prompt_depth:
        return config, False, False
    if requested == 0:
        return config.replace(mask_prompt_depth=0, mask_prompt_shared=False), True, False
    if has_prompts:
        raise CheckpointError(f"{source}: checkpoint has mask prompts of depth {config.mask_prompt_depth}, "
                              f"but mask_prompt_depth={requested} was requested")
    log.info("%s: no mask prompts in the checkpoint; initialised depth %d with N(0, 0.02)", source, requested)
    return config.replace(mask_prompt_depth=requested), False, True


def _with_tokenizer(model: CLIP, tokenizer, default_dir: Path | None) -> Clip:
    """`Clip(model, tokenizer)`: `tokenizer` (a spec for `Tokenizer.load`), else the tokenizer files
    in `default_dir` if any; checked against the model's vocabulary and end-of-text id."""
    config, tok = model.config, None
    if tokenizer is not None:
        tok = Tokenizer.load(tokenizer, context_length=config.context_length)
    elif default_dir is not None and any((default_dir / f).is_file() for f in ("vocab.json", "tokenizer.json")):
        tok = Tokenizer.from_dir(default_dir, context_length=config.context_length)
    if tok is not None and tok.vocab_size > config.vocab_size:
        raise CheckpointError(f"tokenizer has {tok.vocab_size} tokens but the model's embedding has "
                              f"{config.vocab_size} rows")
    if tok is not None and tok.eot_token_id != config.eot_token_id:
        raise CheckpointError(f"tokenizer's end-of-text id {tok.eot_token_id} differs from the model's "
                              f"{config.eot_token_id} (used for pooling)")
    return Clip(model, tok)


def _run_tokenizer(saved: dict, path: Path) -> str | None:
    """The tokenizer a CLIP-stage run used (`config.data.tokenizer`, or a transformers `init_from`
    with tokenizer files; see text.tokenizer_path), None if it had none."""
    import ml_collections  # noqa: PLC0415

    from ovseg_jax.text import tokenizer_path  # noqa: PLC0415

    if not isinstance(saved.get("data"), dict):
        return None
    spec = tokenizer_path(ml_collections.ConfigDict(saved))
    if spec and not Path(spec).exists():
        raise FileNotFoundError(f"{path}: the run's tokenizer {spec!r} (config.data.tokenizer, relative to where "
                                "it was trained) is not there; pass tokenizer= (a tokenizer directory or "
                                "OpenAI's bpe_simple_vocab_16e6.txt.gz)")
    return spec or None


def _load_workdir(path: Path, mask_prompt_depth: int | None, tokenizer, step: int | None, dtype) -> Clip:
    saved = checkpoint.stage_config(path, ("clip", "segmenter"), step)
    if saved["task"] == "segmenter":  # the frozen CLIP that embedded the class names
        m = saved["model"]
        if not Path(m["clip_init"]).exists():
            raise CheckpointError(f"{path}: the run's frozen CLIP config.model.clip_init={m['clip_init']!r} "
                                  "(relative to where it was trained) is not there")
        run_tokenizer = m.get("tokenizer") or None
        return load(m["clip_init"], mask_prompt_depth, tokenizer if tokenizer is not None else run_tokenizer,
                    dtype=dtype)
    config = ClipConfig(**saved["model"]["clip"])
    config, drop, fresh = _prompt_depth(config, config.mask_prompt_depth > 0, mask_prompt_depth, path)
    model = CLIP(config, dtype=dtype, rngs=nnx.Rngs(0))
    checkpoint.restore_params(model, path, step=step, drop=("visual/mask_embedding",) if drop else (),
                              allow_missing=("^visual/mask_embedding$",) if fresh else ())
    return _with_tokenizer(model, tokenizer if tokenizer is not None else _run_tokenizer(saved, path), None)


def load(path: str | os.PathLike, mask_prompt_depth: int | None = None,
         tokenizer: str | os.PathLike | Tokenizer | None = None, *, step: int | None = None,
         dtype=jnp.float32) -> Clip:
    """Load a CLIP checkpoint or training workdir (see the module docstring for accepted layouts).

    mask_prompt_depth: None infers it from `visual.mask_embedding` (0 when absent); 0 drops the
        checkpoint's mask prompts (plain CLIP forward); a positive depth for a checkpoint without
        mask prompts adds fresh ones initialised N(0, 0.02), as mask prompt tuning starts.
    tokenizer: a Tokenizer, a tokenizer directory or OpenAI's `bpe_simple_vocab_16e6.txt.gz`;
        by default the tokenizer files of a transformers directory, or the tokenizer a training
        run used (`config.data.tokenizer`; a segmenter run's `config.model.tokenizer`), if any.
    step: which checkpoint of a training workdir (default the latest); only for workdirs.
    dtype: compute dtype (float32 or bfloat16); parameters stay float32 (the encode calls keep a
        bfloat16 copy of the weight matrices, `models.layers.inference_split`).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if checkpoint.is_checkpoint_dir(path):
        return _load_workdir(path, mask_prompt_depth, tokenizer, step, dtype)
    if step is not None:
        raise ValueError(f"{path}: step={step} is only for training workdirs (<workdir>/checkpoints/<step>)")
    state, config, layout = _read_checkpoint(path)
    config, drop, fresh = _prompt_depth(config, "visual.mask_embedding" in state, mask_prompt_depth, path)
    if drop:
        state.pop("visual.mask_embedding", None)
    if fresh:  # new mask prompts keep their initialisation N(0, 0.02)
        model = CLIP(config, dtype=dtype, rngs=nnx.Rngs(0))
        torch_to_nnx(state, model, source=f"{path} ({layout} layout)", ignore_missing=("visual.mask_embedding",))
    else:  # the file fills every parameter: no random initialisation to throw away
        model = unfilled(lambda rngs: CLIP(config, dtype=dtype, rngs=rngs))
        torch_to_nnx(state, model, source=f"{path} ({layout} layout)")
        on_device(model)
    return _with_tokenizer(model, tokenizer, path if path.is_dir() else None)


# ---------------------------------------------------------------------------------------------
# Export


def openai_state_dict(model: CLIP | Clip) -> dict[str, np.ndarray]:
    """Float32 parameters under OpenAI CLIP key names (reference 6.3, plus `visual.mask_embedding`)."""
    model = model.model if isinstance(model, Clip) else model
    return nnx_to_torch(model)


def export(clip: Clip, path: str | os.PathLike, format: str = "hf") -> Path:
    """Write `clip` for PyTorch.

    format="hf": a directory loadable by transformers' `CLIPModel.from_pretrained` (config.json +
        model.safetensors, tokenizer files when known). Mask prompts are stored as the extra
        tensor `vision_model.embeddings.mask_embedding` (transformers ignores it; we read it back).
    format="openai": one file in the OpenAI key layout incl. `visual.mask_embedding`: `.safetensors`
        by extension, else a `torch.save` state dict (needs torch). If the architecture is not the
        one OpenAI's loader infers from the keys (heads = width / 64, ...), a sidecar
        `<path>.ovseg_jax.json` records it.
    """
    path = Path(path)
    state = openai_state_dict(clip)
    if format == "hf":
        from transformers import CLIPConfig  # noqa: PLC0415

        path.mkdir(parents=True, exist_ok=True)
        CLIPConfig(**clip_keys.hf_config_dict(clip.config)).save_pretrained(str(path))
        write_safetensors(clip_keys.openai_to_hf(state), path / "model.safetensors", metadata={"format": "pt"})
        if clip.tokenizer is not None:
            clip.tokenizer.save(path)
        return path
    if format != "openai":
        raise ValueError(f"format must be 'hf' or 'openai'; got {format!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        write_safetensors(state, path, metadata={"format": "pt"})
    else:
        write_torch_file(state, path)
    write_clip_sidecar(path, clip.config, state)
    return path


def write_clip_sidecar(path: str | os.PathLike, config: ClipConfig, state: dict[str, np.ndarray]) -> None:
    """Record `config` next to the OpenAI-layout `state` written at `path` when the keys alone
    would give a different architecture (OpenAI's loader rules); otherwise clear the record."""
    derived = clip_keys.config_from_openai(state, str(path))
    write_sidecar(path, "clip", None if derived == config else dataclasses.asdict(config))
