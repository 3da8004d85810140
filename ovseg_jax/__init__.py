"""ovseg_jax: OVSeg (open-vocabulary semantic segmentation with mask-adapted CLIP) in JAX/Flax NNX.

The public API, loaded on first use so that `import ovseg_jax` stays fast:

    import ovseg_jax
    predictor = ovseg_jax.load_predictor("ovseg_swinbase_vitL14_ft_mpt.pth",
                                         tokenizer="bpe_simple_vocab_16e6.txt.gz")
    result = predictor.segment(image, ["sky", "tree", "red car"])     # labels [H, W], confidence

- Models: `ovseg_jax.clip.load` / `ovseg_jax.segmenter.load` (checkpoint files users have, and
  training workdirs) -> `Clip` / `Segmenter`; `Predictor` ensembles them (reference 1.7).
- Evaluation: `evaluate_benchmark` (the paper's protocol on a dataset), `evaluate_dataset`,
  `segmentation_metrics`.
- Training: `Trainer` with a config of `ovseg_jax.configs`.

Commands (`python -m ovseg_jax.<name>`): train, predict, serve, evaluate, mine_pairs, ablate,
export, merge, demo. The package is laid out by role: `models/`, `losses/`, `data/`, `convert/`,
`inference/`, `training/`, `evaluation/`, `mining/`, `experiments/`, `utils/`.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module that defines it
_LAZY = {
    "Predictor": "ovseg_jax.inference.ensemble",
    "Segmentation": "ovseg_jax.inference.ensemble",
    "load_predictor": "ovseg_jax.inference.loading",
    "load_image": "ovseg_jax.inference.inputs",
    "render": "ovseg_jax.inference.results",
    "summarize": "ovseg_jax.inference.results",
    "evaluate_benchmark": "ovseg_jax.evaluation.protocol",
    "evaluate_dataset": "ovseg_jax.evaluation.evaluator",
    "segmentation_metrics": "ovseg_jax.evaluation.metrics",
    "Trainer": "ovseg_jax.training.trainer",
    "Clip": "ovseg_jax.clip",
    "Segmenter": "ovseg_jax.models.maskformer",
    "CheckpointError": "ovseg_jax.convert.torch_io",
}
_SUBMODULES = ("clip", "segmenter", "text", "configs")

__all__ = sorted(_LAZY) + list(_SUBMODULES)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module 'ovseg_jax' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
