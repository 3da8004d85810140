"""Shared helpers of the bench/ scripts: timing with a separate first (compiling) call, interleaved
rounds, ratio tables, and the torch side of the comparisons (random models whose weights ours load,
smooth test images, the original adapter's per-mask crop loop)."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import statistics
import subprocess
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


ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    """`git rev-parse --short HEAD` of the repository, with `+dirty` when tracked files differ from it."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def machine() -> str:
    """CPU model and the cores this process may run on, e.g. "AMD EPYC, 2 cores (AVX512-BF16)"."""
    model = platform.processor() or platform.machine()
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        model = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flags = " (AVX512-BF16)" if " avx512_bf16" in info else ""
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} cores{flags}"


def environment() -> dict[str, str]:
    """What a figure needs next to it: the command, the commit, the machine, torch's thread count
    (when torch is loaded), the versions, XLA_FLAGS, the load average and the date."""
    env = {"command": "python " + shlex.join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
           "commit": commit(), "machine": machine(), "jax": jax.__version__,
           "date": datetime.date.today().isoformat()}
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        env["torch"] = f"{torch.__version__}, {torch.get_num_threads()} threads"
    env["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "")
    if hasattr(os, "getloadavg"):
        env["load average"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
    return env


def environment_lines() -> list[str]:
    """`environment()` as lines to print above a bench's table."""
    return [f"{key}: {value}" for key, value in environment().items() if value != ""]


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
                warmup: int = 0, cpu: dict[str, float] | None = None,
                alternate: bool = False) -> dict[str, tuple[float, float, float]]:
    """Each function's first call (compiling), then `warmup` untimed rounds, then `rounds` rounds
    calling every function once in turn, so that the implementations share the machine's load alike
    -> {name: (first-call s, of which tracing + compiling s, median s of the rounds)}. With `rounds=0`
    the "median" is the first call less its compile time (for runs too slow to repeat). `log` gets a
    line per finished call. `cpu`: filled with {name: median process CPU seconds per call} (all
    threads; a loaded machine stretches wall time far more than CPU time). `alternate`: every other
    round calls the functions in reverse order (on a shared machine the order within a round moved
    the figures)."""
    from ovseg_jax.utils.compilation import CompileTimer

    first, times, cpu_times = {}, {name: [] for name in fns}, {name: [] for name in fns}
    for name, fn in fns.items():
        with CompileTimer() as compiling:
            first[name] = (seconds(fn), compiling.seconds)
        if log:
            log(f"  {name}: first call {first[name][0]:.2f} s (compiling {first[name][1]:.2f} s)")
    for r in range(warmup + rounds):
        order = list(fns.items())[::-1] if alternate and r % 2 else fns.items()
        for name, fn in order:
            cpu0 = time.process_time()
            took = seconds(fn)
            if r >= warmup:
                times[name].append(took)
                cpu_times[name].append(time.process_time() - cpu0)
            if log:
                log(f"  {name}: {'warm-up' if r < warmup else 'round'} {r + 1 - warmup * (r >= warmup)} {took:.3f} s")
    if cpu is not None:
        cpu.update({name: statistics.median(c) for name, c in cpu_times.items() if c})
    return {name: (*first[name], statistics.median(times[name]) if times[name] else first[name][0] - first[name][1])
            for name in fns}


def record(path: str | os.PathLike | None, what: str, ours: str, reference: str, ratio: float | None,
           **extra) -> None:
    """Append one comparison (what was measured, our figure, the reference's figure, ours / theirs)
    with `environment()` as a JSON line to `path` (`make bench` collects them into its table);
    nothing when `path` is None."""
    if path is None:
        return
    import json

    row = {"what": what, "ours": ours, "reference": reference, "ratio": ratio, **environment(), **extra}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


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
