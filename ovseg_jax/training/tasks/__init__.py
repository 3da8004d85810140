"""Training tasks: what a stage trains and with which loss. Each task module provides
`build_model(config, *, dtype, rngs)`, `loss(model, batch, rng) -> (loss, metrics)`,
`post_update(params) -> params` (constraints applied after each optimiser step on the trained
parameters) and `check_inputs(config)` (fail early on missing files).

- `clip`: contrastive CLIP training; the pretraining, full fine-tuning (reference 4.2) and mask
  prompt tuning (4.3) stages differ only in config (init, mask prompts, frozen parameters).
- `segmenter`: the MaskFormer-style segmenter with the frozen CLIP text bank (reference 3).
"""

from __future__ import annotations

import importlib
from types import ModuleType

TASKS = {"clip": "ovseg_jax.training.tasks.clip_contrastive", "segmenter": "ovseg_jax.training.tasks.segmenter"}


def get(name: str) -> ModuleType:
    if name not in TASKS:
        raise ValueError(f"config.task must be one of {sorted(TASKS)}; got {name!r}")
    return importlib.import_module(TASKS[name])
