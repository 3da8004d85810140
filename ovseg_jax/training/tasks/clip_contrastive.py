"""Contrastive CLIP training (reference 4.2-4.3): pretraining on captions (synthetic world only),
full fine-tuning on masked crops, and mask prompt tuning. The stages differ only in config:

- `config.model.clip`: `ClipConfig` fields (mask prompts on when `mask_prompt_depth > 0`).
- `config.init_from`: "" (random init), a trainer workdir of a previous stage, or any CLIP
  checkpoint `ovseg_jax.clip.load` reads (OpenAI/open_clip/transformers/OVSeg). A missing
  `visual.mask_embedding` is initialised N(0, 0.02), as mask prompt tuning starts; a missing
  `visual.vpt_embedding` (deep visual prompts, `vpt_tokens > 0`) keeps VPT's uniform init.
- `config.optim.freeze` / `trainable`: e.g. the text tower for fine-tuning, everything but
  `visual/mask_embedding` for mask prompt tuning. The appendix's variants (MPT then FT, both at
  once, VPT, other prompt depths) are built from these two by `ovseg_jax.ablate`.

Batches: `{"image": float32 [B, S, S, 3] CLIP-normalised, "token_ids": int32 [B, L],
"region_mask": float32 [B, S, S] 0/1 (used only when the model has mask prompts)}`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
from flax import nnx

from ovseg_jax.losses.contrastive import clamp_logit_scale, clip_contrastive_loss
from ovseg_jax.models.clip import CLIP, ClipConfig
from ovseg_jax.text import tokenizer_path
from ovseg_jax.training import checkpoint

BATCH_KEYS = ("image", "token_ids")


def model_config(config) -> ClipConfig:
    return ClipConfig(**config.model.clip.to_dict())


def check_inputs(config) -> None:
    """Fail early with one message naming every missing input: `init_from`, the pairs / captions
    file and the tokenizer."""
    from ovseg_jax.configs import OPENAI_BPE_HINT  # noqa: PLC0415

    missing = []
    init = config.get("init_from") or ""
    if init and not Path(init).exists():
        missing.append(
            f"config.init_from={init!r}: a trainer workdir of the previous stage "
            "(<workdir>/checkpoints/<step>/params) or a CLIP checkpoint: OpenAI ViT-L-14.pt / "
            "ViT-B-16.pt (the `clip` package downloads them), a transformers CLIP directory, or an OVSeg .pth")
    data = config.data
    kind = data.get("kind")
    if kind in ("clip_pairs", "captions"):
        if not Path(data.path).exists():
            missing.append(
                f"config.data.path={data.path!r}: the mask-category pairs: the released coco_proposal_1cap.csv "
                "(tab-separated filepath/title) with its crop images, from the Google Drive link in OVSeg's "
                "open_clip_training/README.md, or our JSON-lines pairs" if kind == "clip_pairs" else
                f"config.data.path={data.path!r}: image-caption JSON lines {{'image', 'caption'}}")
        tokenizer = data.get("tokenizer") or ""
        if tokenizer and not Path(tokenizer).exists():
            missing.append(f"config.data.tokenizer={tokenizer!r}: {OPENAI_BPE_HINT}")
        elif not tokenizer and not (init and not Path(init).exists()) and not tokenizer_path(config):
            missing.append(f"config.data.tokenizer is empty and config.init_from={init!r} has no tokenizer files: "
                           f"set it to OpenAI's bpe_simple_vocab_16e6.txt.gz; {OPENAI_BPE_HINT}")
    if missing:
        raise FileNotFoundError("missing inputs (see README.md, 'Training > Inputs'):\n- " + "\n- ".join(missing))


def build_model(config, *, dtype, rngs: nnx.Rngs) -> CLIP:
    """The CLIP of `config.model.clip`, initialised from `config.init_from` when given."""
    cfg = model_config(config)
    init = config.get("init_from") or ""
    if not init:
        return CLIP(cfg, dtype=dtype, rngs=rngs)
    check_inputs(config)
    allow = (("^visual/mask_embedding$",) if cfg.mask_prompt_depth else ()) + \
        (("^visual/vpt_embedding$",) if cfg.vpt_tokens else ())
    if checkpoint.is_checkpoint_dir(init):
        model = CLIP(cfg, dtype=dtype, rngs=rngs)
        checkpoint.assign_params(model, checkpoint.load_params(init), source=init, allow_missing=allow)
        return model
    from ovseg_jax.clip import load  # noqa: PLC0415  (imports transformers' tokenizer code)

    model = load(init, mask_prompt_depth=cfg.mask_prompt_depth, dtype=dtype).model
    if cfg.vpt_tokens and not model.config.vpt_tokens:  # fresh visual prompts on a plain CLIP file
        base, model = model, CLIP(cfg, dtype=dtype, rngs=rngs)
        _, params, _ = nnx.split(base, nnx.Param, ...)
        flat = checkpoint.FlatTree(params).flatten(params)
        checkpoint.assign_params(model, flat, source=init, allow_missing=allow)
    if model.config != cfg:
        diff = {f.name: (getattr(model.config, f.name), getattr(cfg, f.name))
                for f in dataclasses.fields(cfg) if getattr(model.config, f.name) != getattr(cfg, f.name)}
        raise ValueError(f"{init}: checkpoint architecture differs from config.model.clip "
                         f"(field: (checkpoint, config)) {diff}")
    return model


def loss(model: CLIP, batch, rng: jax.Array):
    """Symmetric InfoNCE over the (global) batch -> (loss, metrics)."""
    del rng  # no dropout in CLIP
    masks = batch.get("region_mask") if model.config.mask_prompt_depth else None
    image_features = model.encode_image(batch["image"], masks)
    text_features = model.encode_text(batch["token_ids"])
    return clip_contrastive_loss(image_features, text_features, model.logit_scale[...])


def post_update(params: dict) -> dict:
    """Clamp `logit_scale` to `[0, ln 100]` after each step (when it is trained)."""
    if "logit_scale" in params:
        params = {**params, "logit_scale": clamp_logit_scale(params["logit_scale"])}
    return params


def make_data(config):
    """This process's batches for `config.data.kind`: "clip_pairs" (masked-crop pairs file, `.csv`
    or `.jsonl`) or "captions" (image-caption JSON lines), tokenised with `tokenizer_path(config)`,
    which must fit the model's vocabulary and end-of-text id."""
    from ovseg_jax.data import pipeline  # noqa: PLC0415
    from ovseg_jax.text import Tokenizer  # noqa: PLC0415

    d = config.data
    cfg = model_config(config)
    path = tokenizer_path(config)
    tokenizer = Tokenizer.load(path, context_length=cfg.context_length)
    if tokenizer.vocab_size > cfg.vocab_size or tokenizer.eot_token_id != cfg.eot_token_id:
        raise ValueError(f"tokenizer {path}: {tokenizer.vocab_size} tokens, end-of-text id {tokenizer.eot_token_id}; "
                         f"config.model.clip has vocab_size {cfg.vocab_size}, eot_token_id {cfg.eot_token_id}")
    common = dict(batch_size=config.batch_size, seed=d.get("seed", config.seed), num_workers=d.num_workers,
                  skip_bad_examples=d.skip_bad_examples)
    size = cfg.image_size
    if d.kind == "clip_pairs":
        return iter(pipeline.clip_pairs_loader(d.path, tokenizer, image_size=size,
                                               region_mask=cfg.mask_prompt_depth > 0, **common))
    if d.kind == "captions":
        return iter(pipeline.caption_loader(d.path, tokenizer, image_size=size, **common))
    raise ValueError(f"config.data.kind={d.kind!r}: the clip task reads 'clip_pairs' or 'captions' "
                     "(or use kind='python' with a factory)")


def make_evaluator(config):
    """`evaluate(model, step) -> {"eval/crop_acc", "eval/crop_acc_seen", "eval/crop_acc_unseen"}`:
    zero-shot accuracy of masked ground-truth regions of `config.eval` (dataset, root, split,
    max_examples, templates, unseen class names) over all the dataset's class names
    (`ovseg_jax.evaluation.zero_shot`). None without `config.eval`."""
    e = config.get("eval")
    if not e:
        return None
    from ovseg_jax.clip import Clip  # noqa: PLC0415
    from ovseg_jax.data import registry  # noqa: PLC0415
    from ovseg_jax.text import Tokenizer  # noqa: PLC0415
    from ovseg_jax.evaluation.zero_shot import crop_accuracy, ground_truth_crops  # noqa: PLC0415

    cfg = model_config(config)
    source = registry.get(e.dataset).make_source(e.root, e.get("split", "val"))
    crops = ground_truth_crops(source, image_size=cfg.image_size, max_examples=e.get("max_examples"))
    tokenizer = Tokenizer.load(tokenizer_path(config), context_length=cfg.context_length)

    def evaluate(model: CLIP, step: int) -> dict[str, float]:
        del step
        m = crop_accuracy(Clip(model, tokenizer), crops, source.class_names, templates=e.get("templates", "vild"),
                          unseen=list(e.get("unseen") or ()))
        return {f"eval/{k}": v for k, v in m.items() if k != "crops"}

    return evaluate
