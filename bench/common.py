"""Shared helpers of the bench/ scripts: timing with a separate first (compiling) call, interleaved
rounds, ratio tables, and the torch side of the comparisons (random models whose weights ours load,
smooth test images, the original adapter's per-mask crop loop)."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/torch_clip_reference.py

from ovseg_jax.utils.host_memory import keep_freed_memory  # noqa: E402

# As the command-line tools do: XLA:CPU steps reuse their buffers instead of page-faulting them afresh.
keep_freed_memory()


def timed(fn: Callable, iters: int) -> tuple[float, float]:
    """(seconds of the first call, mean seconds of the following `iters` calls); blocks on results."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(iters):
        jax.block_until_ready(fn())
    return first, (time.perf_counter() - t0) / iters


def seconds(fn: Callable) -> float:
    """Wall seconds of one call of `fn`, blocking on its (JAX or torch/numpy) result."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def interleaved(fns: dict[str, Callable], rounds: int, log: Callable[[str], None] | None = None,
                warmup: int = 0) -> dict[str, tuple[float, float, float]]:
    """Each function's first call (compiling), then `warmup` untimed rounds, then `rounds` rounds
    calling every function once in turn, so that the implementations share the machine's load alike
    -> {name: (first-call s, of which tracing + compiling s, median s of the rounds)}. With `rounds=0`
    the "median" is the first call less its compile time (for runs too slow to repeat). `log` gets a
    line per finished call."""
    from ovseg_jax.utils.compilation import CompileTimer

    first, times = {}, {name: [] for name in fns}
    for name, fn in fns.items():
        with CompileTimer() as compiling:
            first[name] = (seconds(fn), compiling.seconds)
        if log:
            log(f"  {name}: first call {first[name][0]:.2f} s (compiling {first[name][1]:.2f} s)")
    for r in range(warmup + rounds):
        for name, fn in fns.items():
            took = seconds(fn)
            if r >= warmup:
                times[name].append(took)
            if log:
                log(f"  {name}: {'warm-up' if r < warmup else 'round'} {r + 1 - warmup * (r >= warmup)} {took:.3f} s")
    return {name: (*first[name], statistics.median(times[name]) if times[name] else first[name][0] - first[name][1])
            for name in fns}


def print_rate_table(rows: list[tuple[str, str, float, float]], unit: str, reference: float | None) -> None:
    """Rows (implementation, dtype, first-call s, rate) with the ratio of each rate to `reference`."""
    print(f"{'implementation':<34} {'dtype':<9} {'first call s':>12} {unit:>9} {'vs torch':>8}")
    for name, dtype, first, rate in rows:
        ratio = f"{rate / reference:7.2f}x" if reference else "-"
        print(f"{name:<34} {dtype:<9} {first:12.2f} {rate:9.3f} {ratio:>8}")


# ---------------------------------------------------------------------------------------------
# The torch side


def smooth_image(height: int, width: int, rs: np.random.RandomState) -> np.ndarray:
    """uint8 `[height, width, 3]` upsampled noise (so that random segmenters still form regions)."""
    from PIL import Image

    small = rs.randint(0, 256, (max(2, height // 16), max(2, width // 16), 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR))


def torch_maskformer(swin: dict, decoder: dict, fpn: int, num_labels: int, directory: Path):
    """A random transformers `MaskFormerForInstanceSegmentation` with a Swin backbone (`SwinConfig`
    fields `swin`, DETR decoder fields `decoder`), saved into `directory` for
    `ovseg_jax.segmenter.load` -> the torch model (eval mode)."""
    import torch
    from transformers import MaskFormerConfig, MaskFormerForInstanceSegmentation, SwinConfig

    torch.manual_seed(0)
    backbone = SwinConfig(image_size=224, drop_path_rate=0.0, out_features=["stage1", "stage2", "stage3", "stage4"],
                          **swin)
    config = MaskFormerConfig(backbone_config=backbone, fpn_feature_size=fpn, mask_feature_size=fpn,
                              num_labels=num_labels, decoder_config=dict(model_type="detr", encoder_layers=0,
                                                                          dropout=0.0, **decoder))
    model = MaskFormerForInstanceSegmentation(config).eval()
    model.save_pretrained(directory)
    return model


def torch_clip(clip: dict, vocab_size: int, path: Path):
    """A random OpenAI-layout torch CLIP with mask prompts (`tests/torch_clip_reference.OpenAIClip`
    fields `clip`, a small text tower), saved to `path` for `ovseg_jax.clip.load` -> the torch model."""
    import torch

    from tests.torch_clip_reference import OpenAIClip

    torch.manual_seed(0)
    model = OpenAIClip(context=16, vocab=vocab_size, text_width=64, text_layers=1, **clip).eval()
    torch.save(model.state_dict(), path)
    return model


def torch_masks(segmenter, image: np.ndarray):
    """The original's segmenter step on one resized uint8 `[h, w, 3]` image with a transformers
    MaskFormer: normalise, pad to 32 with 0, forward, bilinear x4, cut, sigmoid -> `[Q, h, w]`."""
    import torch
    import torch.nn.functional as F

    from ovseg_jax.models.maskformer import PIXEL_MEAN, PIXEL_STD

    h, w = image.shape[:2]
    img = torch.from_numpy(image).permute(2, 0, 1).float()
    x = (img - torch.tensor(PIXEL_MEAN)[:, None, None]) / torch.tensor(PIXEL_STD)[:, None, None]
    x = F.pad(x, (0, -w % 32, 0, -h % 32))[None]  # detectron2's ImageList: 0 in normalised space
    masks = segmenter(pixel_values=x).masks_queries_logits
    return F.interpolate(masks, scale_factor=4, mode="bilinear", align_corners=False)[0, :, :h, :w].sigmoid()


def torch_region_logits(clip, bank, image: np.ndarray, binary, size: int):
    """The original adapter's CLIP step (reference 1.8-1.9) on one resized uint8 `[h, w, 3]` image and
    `[Q, h, w]` bool masks: a Python loop over the valid masks (box, crop, mean fill, normalise,
    bicubic to `size`), one CLIP call on the stacked crops with their region masks ->
    (`[n_valid, C]` logits `100 · f̂ · bankᵀ`, `[n_valid]` indices of the valid masks)."""
    import torch
    import torch.nn.functional as F

    from ovseg_jax.inference.masked_crops import CLIP_FILL, CLIP_MEAN, CLIP_STD

    img = torch.from_numpy(image).permute(2, 0, 1).float()
    valid = binary.flatten(1).any(1).nonzero()[:, 0]
    fill = torch.tensor(CLIP_FILL)[:, None, None]
    mean, std = 255 * torch.tensor(CLIP_MEAN)[:, None, None], 255 * torch.tensor(CLIP_STD)[:, None, None]
    regions, region_masks = [], []
    for q in valid.tolist():  # the adapter's per-mask loop
        rows, cols = binary[q].any(1).nonzero()[:, 0], binary[q].any(0).nonzero()[:, 0]
        y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        m = binary[q, y0:y1, x0:x1].float()
        crop = ((img[:, y0:y1, x0:x1] * m + fill * (1 - m)) - mean) / std
        regions.append(F.interpolate(crop[None], (size, size), mode="bicubic", align_corners=False))
        region_masks.append(F.interpolate(m[None, None], (size, size), mode="nearest"))
    if not regions:
        return torch.zeros(0, bank.shape[0]), valid
    feats = clip.encode_image(torch.cat(regions), torch.cat(region_masks))
    return 100 * F.normalize(feats, dim=-1) @ bank.T, valid
