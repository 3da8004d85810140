"""Building blocks for the config files in `configs/` (trainer defaults and the reference solvers).

Regex tables are matched with `re.search` against flat parameter paths such as
`visual/transformer/resblocks/0/ln_1/scale` (`ovseg_jax.checkpoint.key_path_str`).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from ovseg_jax.models.clip import ClipConfig

# open_clip (reference 4.2): no weight decay for 0/1-d parameters and names with bn/ln/bias/logit_scale.
CLIP_NO_DECAY = r"(^|/)(ln_\w+/(scale|bias)|bias|logit_scale|class_embedding)$"
# The frozen text tower of the CLIP adaptation stages.
CLIP_TEXT_TOWER = r"^(token_embedding|positional_embedding|transformer|ln_final|text_projection)(/|$)"


def base(task: str) -> ml_collections.ConfigDict:
    """Trainer defaults shared by every stage."""
    c = ml_collections.ConfigDict()
    c.task = task
    c.seed = 0
    c.dtype = "float32"  # compute dtype; parameters and optimiser state stay float32
    c.total_steps = 1000
    c.batch_size = 32  # global
    c.log_every = 50
    c.eval_every = 0
    c.init_from = ""
    c.mesh = [("data", -1), ("model", 1)]
    c.sharding = ml_collections.ConfigDict({"rules": [], "fsdp_min_size": 2**22})
    c.checkpoint = ml_collections.ConfigDict({"interval": 1000, "max_to_keep": 3, "async_save": True})
    c.data = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict()
    return c


def clip_optim(lr: float, total_steps: int, warmup_steps: int = 100, weight_decay: float = 0.2,
               freeze: tuple[str, ...] = (), trainable: tuple[str, ...] | None = None) -> ml_collections.ConfigDict:
    """open_clip's AdamW (b=(0.9, 0.98), eps 1e-6) with warmup + cosine, no clipping (reference 4.2/4.3)."""
    return ml_collections.ConfigDict({
        "lr": lr, "b1": 0.9, "b2": 0.98, "eps": 1e-6, "weight_decay": weight_decay,
        "schedule": {"kind": "warmup_cosine", "warmup_steps": warmup_steps, "total_steps": total_steps},
        "grad_clip_norm": 0.0,
        "lr_mults": [],
        "wd_mults": [(CLIP_NO_DECAY, 0.0)],
        "freeze": list(freeze),
        "trainable": None if trainable is None else list(trainable),
    })


def clip_model(clip: ClipConfig) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"clip": dataclasses.asdict(clip)})


def clip_finetune(clip: ClipConfig, *, lr: float = 5e-6, total_steps: int, warmup_steps: int = 100,
                  batch_size: int) -> ml_collections.ConfigDict:
    """Stage A (reference 4.2): all visual parameters + logit_scale train; text tower frozen."""
    c = base("clip")
    c.model = clip_model(clip.replace(mask_prompt_depth=0))
    c.optim = clip_optim(lr, total_steps, warmup_steps, freeze=(CLIP_TEXT_TOWER,))
    c.total_steps = total_steps
    c.batch_size = batch_size
    return c


def mask_prompt_tuning(clip: ClipConfig, *, depth: int = 3, lr: float = 0.05, total_steps: int,
                       warmup_steps: int = 100, batch_size: int) -> ml_collections.ConfigDict:
    """Stage B (reference 4.3): only `visual/mask_embedding` trains, weight decay 0.

    The reference also leaves `logit_scale` trainable (clamped at ln 100, irrelevant to OVSeg,
    which uses a fixed 100); here it is frozen so that the stage changes nothing but the prompts.
    """
    c = base("clip")
    c.model = clip_model(clip.replace(mask_prompt_depth=depth))
    c.optim = clip_optim(lr, total_steps, warmup_steps, weight_decay=0.0,
                         trainable=(r"^visual/mask_embedding$",))
    c.total_steps = total_steps
    c.batch_size = batch_size
    return c


def clip_pairs_data(path: str, image_size: int = 224) -> ml_collections.ConfigDict:
    """Masked-crop / text pairs for the CLIP stages: a tab-separated `filepath<TAB>title` CSV
    (the released format) or our JSON-lines pairs; train crops RandomResizedCrop(scale 0.9-1)."""
    return ml_collections.ConfigDict({"kind": "clip_pairs", "path": path, "image_size": image_size,
                                      "num_workers": 8, "seed": 0})


# detectron2/MaskFormer (reference 3.4): no weight decay for normalisation layers, the query
# embedding (nn.Embedding) and Swin's relative-position / absolute-position tables.
SEGMENTER_NO_DECAY = (r"(^|/)norm\d*/(scale|bias)$|(^|/)query_embed/embedding$"
                      r"|(^|/)relative_position_bias_table$|(^|/)absolute_pos_embed$")
SEGMENTER_BACKBONE = r"(^|/)backbone/"


def segmenter_optim(lr: float, weight_decay: float, backbone_lr_mult: float, total_steps: int,
                    warmup_steps: int = 1500) -> ml_collections.ConfigDict:
    """MaskFormer's AdamW (b=(0.9, 0.999), eps 1e-8), WarmupPolyLR (power 0.9, warmup factor 1e-6)
    and full-model gradient clipping at global norm 0.01 (reference 3.4)."""
    return ml_collections.ConfigDict({
        "lr": lr, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": weight_decay,
        "schedule": {"kind": "warmup_poly", "warmup_steps": warmup_steps, "total_steps": total_steps,
                     "power": 0.9, "warmup_factor": 1e-6},
        "grad_clip_norm": 0.01,
        "lr_mults": [(SEGMENTER_BACKBONE, backbone_lr_mult)],
        "wd_mults": [(SEGMENTER_NO_DECAY, 0.0)],
        "freeze": [],
        "trainable": None,
    })


def segmenter_training(segmenter: dict, *, clip_init: str, class_names: list[str],
                       lr: float, weight_decay: float, backbone_lr_mult: float, total_steps: int,
                       batch_size: int, warmup_steps: int = 1500, tokenizer: str = "",
                       templates: str | list[str] = "vild") -> ml_collections.ConfigDict:
    """Segmenter stage (reference 3): `segmenter` is `SegmenterConfig.to_dict()`; the frozen CLIP
    `clip_init` (tokenizer files `tokenizer` when it has none) embeds
    `class_names` with `templates` (the 14 ViLD templates by default)."""
    from ovseg_jax.tasks.segmenter import loss_config  # noqa: PLC0415

    c = base("segmenter")
    c.model = ml_collections.ConfigDict({
        "segmenter": segmenter, "clip_init": clip_init, "tokenizer": tokenizer,
        "templates": templates, "class_names": list(class_names)})
    c.loss = loss_config()
    c.optim = segmenter_optim(lr, weight_decay, backbone_lr_mult, total_steps, warmup_steps)
    c.total_steps = total_steps
    c.batch_size = batch_size
    return c


def segmentation_data(dataset: str, root: str, *, crop_size: int, short_sides, max_size: int,
                      max_masks: int = 64, num_workers: int = 8) -> ml_collections.ConfigDict:
    """Segmenter training data: `dataset` (an `ovseg_jax.data.registry` name) under `root`, random
    short-side scale from `short_sides`, `crop_size` crops, up to `max_masks` class masks per crop."""
    return ml_collections.ConfigDict({"dataset": dataset, "root": root, "split": "train", "crop_size": crop_size,
                                      "scales": list(short_sides), "max_size": max_size, "max_masks": max_masks,
                                      "num_workers": num_workers})
