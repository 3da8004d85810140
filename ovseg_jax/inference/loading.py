"""One call from a checkpoint file or workdir to a ready `Predictor` (`load_predictor`), with the
original's per-mode and per-backbone settings (reference 1.1, 1.7, 1.10, 3.5)."""

from __future__ import annotations

import os
from pathlib import Path

from ovseg_jax.inference.ensemble import Predictor
from ovseg_jax.inference.inputs import InputError
from ovseg_jax.inference.sam_proposals import SPACE_RESIZE, SPACE_TEMPLATES, SamProposals

# The original's settings per mode (reference 1.7 evaluation config; 1.10 demo config).
MODE_DEFAULTS = {"semantic": {"ensemble_weight": 0.7, "mask_threshold": 0.4},
                 "demo": {"ensemble_weight": 0.0, "mask_threshold": 0.35}}
# Reference 1.1 / 3.5: test-time resize (short side, long-side cap) per segmenter backbone.
RESIZE = {"swin": (640, 2560), "resnet": (512, 2048)}
BUCKET = 128
# Where a tokenizer is looked for next to a checkpoint file that has none (the demo's layout included).
TOKENIZER_PLACES = ("tokenizer", "bpe_simple_vocab_16e6.txt.gz", "world/tokenizer")


def sam_defaults(proposals: str, mode: str) -> dict:
    """The defaults SAM proposals change (`inference.sam_proposals`): "sam" classifies with CLIP only
    (λ 0) at the Space's input size (long side 1280); demo mode with SAM uses the Space's prompt."""
    defaults = {"ensemble_weight": 0.0, "resize": SPACE_RESIZE} if proposals == "sam" else {}
    if proposals != "maskformer" and mode == "demo":
        defaults["templates"] = SPACE_TEMPLATES
    return defaults


def find_tokenizer(checkpoint: str | os.PathLike) -> Path | None:
    """The first of `TOKENIZER_PLACES` beside a checkpoint file (a directory with `vocab.json` or
    `tokenizer.json`, or OpenAI's BPE file), or None."""
    for name in TOKENIZER_PLACES:
        place = Path(checkpoint).parent / name
        if place.is_file() or any((place / f).is_file() for f in ("vocab.json", "tokenizer.json")):
            return place
    return None


def load_predictor(checkpoint: str | os.PathLike, tokenizer: str | os.PathLike | None = None, *,
                   sam_checkpoint: str | os.PathLike | None = None, sam_options: dict | None = None,
                   sam_dtype: str = "float32", **predictor_kwargs) -> Predictor:
    """A `Predictor` from one checkpoint: our merged OVSeg `.pth` (`python -m ovseg_jax.merge`, the
    demo's `ovseg_synthetic.pth`), an original OVSeg `.pth`, or a segmenter training workdir (with the
    frozen CLIP it trained against).

    tokenizer: a tokenizer directory or OpenAI's `bpe_simple_vocab_16e6.txt.gz`; by default the
        run's tokenizer of a workdir, else `find_tokenizer(checkpoint)`. None found: `InputError`.
    sam_checkpoint: a SAM checkpoint (`sam_vit_{b,l,h}_*.pth` or a transformers `SamModel` directory)
        for `proposals="sam"` / `"both"`: the predictor's `sam` (`SamProposals`), with
        `AutomaticMaskGenerator` options `sam_options` and compute dtype `sam_dtype` ("float32" or
        "bfloat16"). Given with proposals "maskformer", it is loaded and carried for copies.
    predictor_kwargs: `Predictor` options; `mode` sets the defaults of `ensemble_weight` and
        `mask_threshold` (`MODE_DEFAULTS`), and `resize` defaults to the backbone's test resize
        (`RESIZE`), so `predictor.segment(raw_image, names)` works as the original; SAM proposals
        change some defaults (`sam_defaults`).
    """
    import ovseg_jax.clip  # noqa: PLC0415  (heavy imports kept out of `--help`)
    import ovseg_jax.segmenter  # noqa: PLC0415

    path = Path(checkpoint)
    if not path.exists():
        raise InputError(f"checkpoint {path}: no such file or directory")
    if tokenizer is not None and not Path(tokenizer).exists():
        raise InputError(f"tokenizer {tokenizer}: no such file or directory")
    proposals, mode = predictor_kwargs.get("proposals", "maskformer"), predictor_kwargs.get("mode", "semantic")
    if proposals != "maskformer" and sam_checkpoint is None:
        raise InputError(f"proposals {proposals!r} need a SAM checkpoint (--sam-checkpoint): sam_vit_{{b,l,h}}_*.pth "
                         "or a transformers SamModel directory")
    if sam_checkpoint is not None and not Path(sam_checkpoint).exists():
        raise InputError(f"SAM checkpoint {sam_checkpoint}: no such file or directory")
    if tokenizer is None and path.is_file():
        tokenizer = find_tokenizer(path)
        if tokenizer is None:  # a checkpoint file never holds one: say so before the slow loading
            raise _no_tokenizer(path)
    segmenter = ovseg_jax.segmenter.load(path)
    clip = ovseg_jax.clip.load(path, tokenizer=tokenizer)
    if clip.tokenizer is None:
        raise _no_tokenizer(path)
    if sam_checkpoint is not None:
        predictor_kwargs["sam"] = _load_sam(sam_checkpoint, sam_options or {}, sam_dtype)
    kwargs = {**MODE_DEFAULTS.get(mode, {}), "resize": RESIZE.get(segmenter.config.backbone),
              **sam_defaults(proposals, mode), **predictor_kwargs}
    return Predictor(segmenter, clip, **kwargs)


def _load_sam(checkpoint, options: dict, dtype: str):
    import jax.numpy as jnp  # noqa: PLC0415

    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"sam_dtype must be 'float32' or 'bfloat16'; got {dtype!r}")
    return SamProposals.load(checkpoint, dtype=getattr(jnp, dtype), **options)


def _no_tokenizer(path: Path) -> InputError:
    return InputError(f"{path} holds no tokenizer and none was found beside it ({', '.join(TOKENIZER_PLACES)}); "
                      "pass --tokenizer (a tokenizer directory or OpenAI's bpe_simple_vocab_16e6.txt.gz)")
