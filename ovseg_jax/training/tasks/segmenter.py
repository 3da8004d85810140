"""Segmenter training (reference 3): MaskFormer queries classified against the frozen CLIP text bank
of the training classes, Hungarian matching and CE / focal / dice losses with deep supervision.

Config fields:
- `config.model.segmenter`: `SegmenterConfig.to_dict()` (backbone kind + config, decoder sizes,
  `clip_dim` = the CLIP's embedding width).
- `config.model.clip_init`: the frozen CLIP that embeds the class names (any checkpoint
  `ovseg_jax.clip.load` reads, or a CLIP-stage trainer workdir, whose saved config gives the
  architecture); `config.model.tokenizer` a tokenizer directory or
  OpenAI BPE file when the checkpoint has none; `config.model.templates` ("vild").
- `config.model.class_names`: the training classes (e.g. the 171 COCO-Stuff names; for a dataset
  folder its class list, `configs/custom_seg.py`), one per label id of the training data.
- `config.init_from`: "" (random init), an OVSeg `.pth`, a backbone-only checkpoint (ImageNet Swin,
  detectron2 R-101 `.pkl`), a transformers MaskFormer directory, or a segmenter-stage workdir.
- `config.loss`: `{"ce": 1, "mask": 20, "dice": 1, "no_object": 0.1}` (reference 3.3).

Batches (`ovseg_jax.data`): `{"image": uint8 [B, S, S, 3] (padding 128), "masks": uint8 [B, G, S, S],
"classes": int32 [B, G], "valid": bool [B, G]}` (other keys are ignored).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ovseg_jax.losses.mask_losses import LossWeights, maskformer_loss
from ovseg_jax.models.maskformer import Segmenter, SegmenterConfig, normalize_images

TARGET_KEYS = ("masks", "classes", "valid")


class TextBank(nnx.Variable):
    """Frozen `[C, D]` unit-norm class embeddings: model state (checkpointed), never trained."""


class SegmenterWithTextBank(nnx.Module):
    """The segmenter plus the text bank of the training classes and the loss weights (static)."""

    def __init__(self, segmenter: Segmenter, text_bank: np.ndarray, loss_weights: LossWeights,
                 no_object_weight: float):
        self.segmenter = segmenter
        self.text_bank = TextBank(jnp.asarray(text_bank, jnp.float32))
        self.loss_weights = loss_weights
        self.no_object_weight = no_object_weight

    def __call__(self, images: jax.Array, **kwargs) -> dict:
        """Normalised images `[B, H, W, 3]` -> the segmenter's outputs over the training classes."""
        return self.segmenter(images, self.text_bank[...], **kwargs)


def model_config(config) -> SegmenterConfig:
    return SegmenterConfig.from_dict(config.model.segmenter.to_dict())


def check_inputs(config) -> None:
    """Fail early with one message naming every missing input (weights, tokenizer, dataset layout)."""
    m = config.model
    if not m.get("clip_init"):
        raise ValueError("config.model.clip_init is required: the CLIP whose text tower embeds the class names")
    if not list(m.get("class_names") or []):
        raise ValueError("config.model.class_names is empty: the segmenter needs its training classes")
    missing = []
    for field, value, what in [
            ("init_from", config.get("init_from"), "segmenter initialisation: the ImageNet Swin-B checkpoint "
             "(swin_base_patch4_window12_384_22k.pth from microsoft/Swin-Transformer), detectron2's R-103.pkl, "
             "an OVSeg .pth or a segmenter workdir"),
            ("model.clip_init", m.clip_init, "the frozen CLIP for the class names: OpenAI ViT-L-14.pt / "
             "ViT-B-16.pt (the `clip` package downloads them), a transformers CLIP directory or a CLIP-stage workdir"),
            ("model.tokenizer", m.get("tokenizer"), "OpenAI's bpe_simple_vocab_16e6.txt.gz (in the `clip` "
             "package) or a tokenizer directory")]:
        if value and not Path(value).exists():
            missing.append(f"config.{field}={value!r}: {what}")
    data = config.get("data")
    if data and data.get("dataset"):
        from ovseg_jax.data import registry  # noqa: PLC0415
        from ovseg_jax.data.sources import DatasetLayoutError  # noqa: PLC0415

        try:
            source = registry.get(data.dataset).make_source(data.root, data.get("split", "train"))
        except DatasetLayoutError as e:
            missing.append(f"config.data ({data.dataset} under {data.root!r}): {e}")
        else:
            if len(source.class_names) != len(m.class_names):
                from ovseg_jax.configs import ConfigError  # noqa: PLC0415

                raise ConfigError(f"config.model.class_names has {len(m.class_names)} names but the labels of "
                                  f"{data.dataset} index {len(source.class_names)} classes "
                                  f"({', '.join(source.class_names[:3])}, ...)")
    if missing:
        raise FileNotFoundError("missing inputs:\n- " + "\n- ".join(missing))


def _frozen_clip(config):
    """The `ovseg_jax.clip.Clip` of `config.model.clip_init` (mask prompts off: only its text
    tower is used) with `config.model.tokenizer`, or the checkpoint's / the CLIP run's own."""
    from ovseg_jax.clip import load  # noqa: PLC0415  (imports transformers' tokenizer code)

    m = config.model
    clip = load(m.clip_init, mask_prompt_depth=0, tokenizer=m.get("tokenizer") or None)
    if clip.tokenizer is None:
        raise ValueError(f"config.model.tokenizer is required: config.model.clip_init={m.clip_init!r} "
                         "brings no tokenizer")
    return clip


def text_bank(config) -> np.ndarray:
    """`[C, D]` template-ensembled, unit-norm embeddings of `config.model.class_names`."""
    clip = _frozen_clip(config)
    names = list(config.model.class_names)
    return np.asarray(clip.class_embeddings(names, templates=config.model.get("templates", "vild")))


def build_model(config, *, dtype, rngs: nnx.Rngs) -> SegmenterWithTextBank:
    """The segmenter of `config.model.segmenter`, initialised from `config.init_from`, with the text bank."""
    cfg = model_config(config)
    init = config.get("init_from") or ""
    if not init:
        segmenter = Segmenter(cfg, dtype=dtype, rngs=rngs)
    else:
        from ovseg_jax.segmenter import load  # noqa: PLC0415

        segmenter = load(init, config=cfg, dtype=dtype)
    bank = text_bank(config)
    if bank.shape[1] != cfg.clip_dim:
        raise ValueError(f"config.model.segmenter.clip_dim={cfg.clip_dim} but the CLIP at "
                         f"{config.model.clip_init} embeds to {bank.shape[1]}")
    weights = config.get("loss") or loss_config()
    return SegmenterWithTextBank(segmenter, bank, LossWeights(ce=weights.ce, mask=weights.mask, dice=weights.dice),
                                 weights.no_object)


def loss(model: SegmenterWithTextBank, batch, rng: jax.Array):
    """Matched CE / focal / dice over the final and auxiliary decoder outputs -> (loss, metrics)."""
    outputs = model(normalize_images(batch["image"]), deterministic=False, rngs=nnx.Rngs(dropout=rng))
    return maskformer_loss(outputs, {k: batch[k] for k in TARGET_KEYS}, weights=model.loss_weights,
                           no_object_weight=model.no_object_weight)


def post_update(params: dict) -> dict:
    return params


def loss_config(ce: float = 1.0, mask: float = 20.0, dice: float = 1.0, no_object: float = 0.1):
    """Loss weights of reference 3.3 (CE 1, focal 20, dice 1; non-object class weight 0.1)."""
    return ml_collections.ConfigDict({"ce": ce, "mask": mask, "dice": dice, "no_object": no_object})


def make_data(config):
    """This process's training batches of `config.data.dataset` (a registry name under `config.data.root`,
    or a dataset folder: `ovseg_jax.data.custom`);
    `config.data.photometric` / `flip` switch the SSD colour jitter and the horizontal flip (reference
    3.1: both on; a world whose classes are colours needs the jitter off)."""
    from ovseg_jax.data import pipeline, registry, transforms  # noqa: PLC0415

    d = config.data
    source = registry.get(d.dataset).make_source(d.root, d.get("split", "train"))
    return iter(pipeline.segmentation_loader(
        source, batch_size=config.batch_size, crop_size=d.crop_size, max_masks=d.max_masks,
        scales=tuple(d.get("scales") or transforms.TRAIN_SCALES), max_size=d.get("max_size", 2560),
        photometric=d.get("photometric", True), flip=d.get("flip", True),
        seed=d.get("seed", config.seed), num_workers=d.get("num_workers", 0),
        skip_bad_examples=d.get("skip_bad_examples", False)))


def make_evaluator(config):
    """`evaluate(model, step) -> {"eval/mIoU", ...}` on `config.eval` (dataset, root, split, short,
    max_size, bucket, mask_threshold, max_examples): the segmenter alone (no CLIP ensemble) over the
    dataset's classes, embedded by the frozen CLIP. None without `config.eval`."""
    e = config.get("eval")
    if not e:
        return None
    from ovseg_jax.data import pipeline, registry  # noqa: PLC0415
    from ovseg_jax.evaluation.evaluator import evaluate_dataset  # noqa: PLC0415
    from ovseg_jax.inference.ensemble import Predictor  # noqa: PLC0415

    spec = registry.get(e.dataset)
    source = spec.make_source(e.root, e.get("split", "val"))
    clip = _frozen_clip(config)

    def evaluate(model: SegmenterWithTextBank, step: int) -> dict[str, float]:
        del step
        predictor = Predictor(model.segmenter, clip, mask_threshold=e.get("mask_threshold", 0.4), ensemble_weight=None,
                              templates=config.model.get("templates", "vild"))
        examples = pipeline.eval_loader(source, short=e.get("short", 640), max_size=e.get("max_size", 2560),
                                        bucket=e.get("bucket", 32))
        m = evaluate_dataset(predictor, examples, source.class_names, ignore_value=spec.ignore_value,
                             max_examples=e.get("max_examples"), log_every=0)
        return {"eval/mIoU": m["mIoU"], "eval/pACC": m["pACC"], "eval/mACC": m["mACC"]}

    return evaluate
