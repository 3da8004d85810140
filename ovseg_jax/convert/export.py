"""Export any model this package loads (a checkpoint file or a training workdir) for PyTorch
(`python -m ovseg_jax.export` is its command; the formats are described there)."""

from __future__ import annotations

from pathlib import Path

from ovseg_jax.convert.torch_io import CheckpointError

FORMATS = ("ovseg", "openai", "hf")


def export(source: str | Path, format: str, out: str | Path, *, clip: str | Path | None = None,
           tokenizer: str | Path | None = None) -> Path:
    """Write the model(s) of `source` (and `clip`, for "ovseg") to `out` in `format` -> `out`."""
    import ovseg_jax.clip as oclip  # noqa: PLC0415
    import ovseg_jax.segmenter as osegmenter  # noqa: PLC0415

    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {format!r}")
    if format != "ovseg":
        if clip is not None:
            raise ValueError(f"--clip is for --format ovseg; for {format}, --from is the CLIP to export")
        return oclip.export(oclip.load(source, tokenizer=tokenizer), out, format=format)
    segmenter = osegmenter.load(source)
    if clip is None:
        try:
            adapted = oclip.load(source, tokenizer=tokenizer)
        except CheckpointError as e:
            raise CheckpointError(f"{source} holds no CLIP to put into the OVSeg checkpoint ({e}); "
                                  "pass --clip") from None
    else:
        adapted = oclip.load(clip, tokenizer=tokenizer)
    if adapted.config.embed_dim != segmenter.config.clip_dim:
        raise ValueError(f"the CLIP embeds to {adapted.config.embed_dim} but the segmenter's open-vocabulary "
                         f"head has clip_dim {segmenter.config.clip_dim}")
    return osegmenter.export(segmenter, out, clip=adapted)
