"""Where a forward pass's time goes, per operation: ovseg_jax (XLA:CPU, by HLO operation) next to
torch (by aten operation) on the same input and the same random weights.

    .venv/bin/python bench/profile_vit.py                              # CLIP ViT-B/16 image tower, batch 8
    .venv/bin/python bench/profile_vit.py --model vit_l14 --batch 4
    .venv/bin/python bench/profile_vit.py --model swin_b --size 640    # the Swin-B segmenter forward
    taskset -c 0 .venv/bin/python bench/profile_vit.py --threads 1     # one core on both sides

Models: `vit_b16` / `vit_l14` are the CLIP image towers (ovseg_jax `CLIP.encode_image` against
transformers' `CLIPModel.get_image_features`, SDPA attention); `swin_b` is the segmenter forward
at `--size` (`Segmenter` against transformers' `MaskFormerForInstanceSegmentation`, Swin-B backbone,
6-layer decoder, 100 queries). ovseg_jax runs in each of `--dtypes`, torch in float32.

How: `--rounds` calls of each implementation after a warm-up call, ours under `jax.profiler` (the
XLA:CPU runtime records one event per executed HLO operation or fusion, on the thread that runs
it), torch under `torch.profiler` (self time of each aten operator). Each operation is put in a
category (matmuls by their shapes, attention, normalisation, activations, layout copies, ...),
and the table gives milliseconds per forward pass and the share of the implementation's summed
operation time. Operation times are wall times of the thread that launched the operation (both
sides' matmuls run on several threads and are counted once), so the shares, not the sums, are
what compares across a loaded machine. Separately, untraced rounds give each side's wall time and
CPU time per forward pass and how that CPU time spreads over the process's threads (read from
/proc/self/task/*/schedstat): "busy threads" = CPU seconds / wall seconds (spin-waiting
included: torch's OpenMP threads spin between operations).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import tempfile
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from common import environment_lines  # bench/common.py

# ---------------------------------------------------------------------------------------------
# XLA:CPU: HLO operations by category

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.-]+) = (\S+) (\w[\w-]*)\((.*)$")
_CALLS = re.compile(r"calls=%?([\w.-]+)")


def hlo_computations(text: str) -> dict[str, list[str]]:
    """{computation name: its instruction lines} of an HLO module's text."""
    computations, name = {}, None
    for line in text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.-]+) .*\{\s*$", line)
        if header and not line.startswith(" "):
            name = header.group(1)
            computations[name] = []
        elif name and line.startswith(" "):
            computations[name].append(line)
    return computations


def _dims(shape: str) -> list[int]:
    match = re.search(r"\[([\d,]*)\]", shape)
    return [int(d) for d in match.group(1).split(",") if d] if match else []


def _weight_product(lines: list[str], shapes: dict[str, str]) -> str:
    """Category of a product without batch dimensions, from its contracted and free sizes (see
    `weight_product_category`)."""
    for line in lines:
        m = _INSTRUCTION.match(line)
        if not m or m.group(3) != "dot":
            continue
        operands = re.findall(r"%([\w.-]+)", m.group(4).split(")")[0])
        rhs = _dims(shapes.get(operands[1], "")) if len(operands) > 1 else []
        contracting = re.search(r"rhs_contracting_dims=\{(\d+)\}", line)
        if len(rhs) != 2 or not contracting:
            return "matmul: other"
        return weight_product_category(rhs[int(contracting.group(1))], rhs[1 - int(contracting.group(1))])
    return "matmul: other"


def weight_product_category(k: int, n: int) -> str:
    """[M, K] x [K, N]: N = 4K is an MLP's first layer, K = 4N its second, N = 3K (one fused
    product) or N = K (transformers' separate q, k, v and output products) attention projections."""
    if n == 4 * k:
        return "matmul: MLP first layer"
    if k == 4 * n:
        return "matmul: MLP second layer"
    if n in (k, 3 * k):
        return "matmul: attention projections (q, k, v, output)"
    return "matmul: other"


def classify_hlo(instruction_line: str, computations: dict[str, list[str]]) -> str:
    """Category of one top-level HLO instruction (a fusion is classified by what it computes)."""
    m = _INSTRUCTION.match(instruction_line)
    if not m:
        return "other"
    opcode = m.group(3)
    called = _CALLS.search(instruction_line)
    lines = computations.get(called.group(1), []) if called and opcode == "fusion" else [instruction_line]
    ops = collections.Counter(_INSTRUCTION.match(line).group(3) for line in lines if _INSTRUCTION.match(line))
    shapes = {mm.group(1): mm.group(2) for mm in map(_INSTRUCTION.match, lines) if mm}
    text = "\n".join(lines)
    if ops["convolution"]:
        return "convolutions"
    if ops["dot"]:
        batched = "lhs_batch_dims" in text
        if not batched:
            return _weight_product(lines, shapes)
        if ops["dot"] >= 2:
            return "attention: scores + softmax + values (one fusion)"
        if ops["exponential"]:
            return "attention: scores + softmax"
        return "attention: products (scores or values)"
    if ops["exponential"] and ops["reduce"]:
        return "softmax"
    if ops["reduce"] or ops["rsqrt"]:
        return "normalisation (layer norm statistics and apply)"
    if ops["exponential"] or ops["erf"] or ops["logistic"] or ops["tanh"]:
        return "activations (GELU)"
    if ops["transpose"] or ops["copy"] or opcode in ("transpose", "copy"):
        return "layout copies (transpose, copy)"
    if ops["concatenate"] or ops["slice"] or ops["pad"] or ops["dynamic-slice"] or ops["gather"]:
        return "slices, concatenation, padding"
    if ops["convert"] and set(ops) <= {"convert", "parameter", "bitcast", "broadcast"}:
        return "dtype casts"
    return "elementwise (bias, residual, scale)"


def xla_op_table(compiled, call: Callable, rounds: int) -> dict[str, float]:
    """{category: seconds per call} of `rounds` traced calls of `call` (a compiled XLA:CPU program)."""
    text = compiled.as_text()
    computations = hlo_computations(text)
    instructions = {}
    for lines in computations.values():
        for line in lines:
            m = _INSTRUCTION.match(line)
            if m:
                instructions[m.group(1)] = line
    totals = collections.Counter()
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(rounds):
                jax.block_until_ready(call())
        path = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[0]
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    for event in events:
        if event.get("ph") == "X" and event["name"] in instructions:
            totals[classify_hlo(instructions[event["name"]], computations)] += event["dur"] * 1e-6 / rounds
    return dict(totals)


# ---------------------------------------------------------------------------------------------
# torch: aten operators by category

_MATMUL = {"aten::addmm", "aten::mm", "aten::linear", "aten::matmul", "aten::_addmm_activation"}
_ATTENTION = {"aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math",
              "aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention",
              "aten::_flash_attention_forward"}
_TORCH_CATEGORIES = [
    ({"aten::bmm", "aten::baddbmm"}, "attention: products (scores or values)"),
    ({"aten::_softmax", "aten::softmax"}, "softmax"),
    ({"aten::native_layer_norm", "aten::layer_norm", "aten::group_norm", "aten::native_group_norm"},
     "normalisation (layer norm statistics and apply)"),
    ({"aten::sigmoid", "aten::gelu", "aten::relu", "aten::relu_", "aten::tanh", "aten::erf"}, "activations (GELU)"),
    ({"aten::copy_", "aten::contiguous", "aten::clone", "aten::permute", "aten::transpose", "aten::roll",
      "aten::_unsafe_view", "aten::reshape", "aten::view", "aten::as_strided", "aten::t", "aten::expand"},
     "layout copies (transpose, copy)"),
    ({"aten::cat", "aten::pad", "aten::constant_pad_nd", "aten::slice", "aten::index", "aten::narrow",
      "aten::select", "aten::stack", "aten::gather", "aten::unfold"}, "slices, concatenation, padding"),
    ({"aten::conv2d", "aten::convolution", "aten::_convolution", "aten::mkldnn_convolution",
      "aten::_convolution_mode", "aten::_nnpack_spatial_convolution", "aten::thnn_conv2d"}, "convolutions"),
    ({"aten::to", "aten::_to_copy"}, "dtype casts"),
]


def _torch_weight_product(name: str, shapes: list) -> str:
    dims = [s for s in shapes if len(s) == 2]
    if name == "aten::addmm" and len(dims) >= 2:
        k, n = dims[-1]
    elif name == "aten::mm" and len(dims) == 2:
        k, n = dims[1]
    else:
        return "matmul: other"
    return weight_product_category(k, n)


def classify_torch(name: str, shapes: list) -> str:
    if name in _MATMUL:
        return _torch_weight_product(name, shapes)
    if name in _ATTENTION:
        return "attention: scores + softmax + values (one fusion)"
    for names, category in _TORCH_CATEGORIES:
        if name in names:
            return category
    if name.startswith("aten::upsample"):
        return "interpolation"
    return "elementwise (bias, residual, scale)"


def torch_op_table(call: Callable, rounds: int) -> dict[str, float]:
    """{category: seconds per call} from the self CPU time of each aten operator over `rounds` calls."""
    import torch

    totals = collections.Counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(rounds):
            call()
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key.startswith("aten::"):
            totals[classify_torch(event.key, event.input_shapes or [])] += event.self_cpu_time_total * 1e-6 / rounds
    return dict(totals)


# ---------------------------------------------------------------------------------------------
# Threads: how much CPU time each thread of the process spent


def thread_cpu_seconds() -> dict[int, float]:
    """{thread id: CPU seconds so far} of this process's threads (Linux schedstat)."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                out[int(tid)] = int(f.read().split()[0]) * 1e-9
        except OSError:
            pass
    return out


def thread_usage(call: Callable, rounds: int) -> dict[str, float]:
    """Wall and CPU seconds per call and how the CPU time spreads over threads, over `rounds` calls."""
    before, t0 = thread_cpu_seconds(), time.perf_counter()
    walls = []
    for _ in range(rounds):
        t1 = time.perf_counter()
        jax.block_until_ready(call())
        walls.append(time.perf_counter() - t1)
    wall_total = time.perf_counter() - t0
    after = thread_cpu_seconds()
    per_thread = sorted((after[t] - before.get(t, 0.0) for t in after), reverse=True)
    cpu = sum(per_thread)
    return {"wall": statistics.median(walls), "cpu": cpu / rounds, "busy": cpu / wall_total,
            "top": [s / cpu for s in per_thread[:3]] if cpu else [], "threads": sum(s > 0.02 * cpu for s in per_thread)}


# ---------------------------------------------------------------------------------------------
# The models


def vit_pair(model: str, batch: int, dtypes: list[str], layers: int | None):
    """({dtype: (compiled, call)} of ours, torch call) for a CLIP image tower on random crops."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    import ovseg_jax.clip as oclip
    from ovseg_jax.models.clip import ClipConfig
    from ovseg_jax.models.layers import inference_split

    preset: ClipConfig = getattr(ClipConfig, model)()
    depth = layers or preset.vision_layers
    hf = CLIPConfig(projection_dim=preset.embed_dim, vision_config=dict(
        image_size=preset.image_size, patch_size=preset.patch_size, hidden_size=preset.vision_width,
        intermediate_size=preset.vision_mlp_dim, num_hidden_layers=depth,
        num_attention_heads=preset.vision_heads, hidden_act="quick_gelu"),
        text_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=1, num_attention_heads=1))
    torch.manual_seed(0)
    torch_model = CLIPModel(hf).eval()
    images = np.random.RandomState(0).randn(batch, preset.image_size, preset.image_size, 3).astype(np.float32)
    ours = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch_model.save_pretrained(tmp)
        for dtype in dtypes:
            clip = oclip.load(tmp, dtype=getattr(jnp, dtype))
            graphdef, state = inference_split(clip.model)  # as Clip.encode_image
            forward = jax.jit(lambda state, x, g=graphdef: nnx.merge(g, state).encode_image(x))
            x = jnp.asarray(images)
            compiled = forward.lower(state, x).compile()
            ours[dtype] = (compiled, lambda c=compiled, s=state, x=x: c(s, x))
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()

    def torch_call():
        with torch.inference_mode():
            return torch_model.get_image_features(pixel_values=pixels)

    what = f"CLIP {model} image tower ({depth} layers), batch {batch} @ {preset.image_size}"
    return ours, torch_call, what


def swin_pair(size: int, batch: int, dtypes: list[str]):
    """The Swin-B segmenter forward at `size` (ours, torch), as bench/segmenter.py builds them."""
    import torch

    from common import torch_maskformer
    from ovseg_jax.segmenter import load

    swin = dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=12)
    decoder = dict(d_model=256, decoder_layers=6, decoder_ffn_dim=2048, decoder_attention_heads=8, num_queries=100)
    rs = np.random.RandomState(0)
    images = rs.randn(batch, size, size, 3).astype(np.float32)
    bank = rs.randn(171, 768).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=-1, keepdims=True)
    ours = {}
    with tempfile.TemporaryDirectory() as tmp:
        from pathlib import Path

        torch_model = torch_maskformer(swin, decoder, 256, 171, Path(tmp))
        for dtype in dtypes:
            segmenter = load(tmp, clip_dim=768, dtype=getattr(jnp, dtype))
            graphdef, state = nnx.split(segmenter)

            def forward(state, x, t, g=graphdef):
                out = nnx.merge(g, state)(x, t)
                return out["pred_logits"], out["pred_masks"]

            x, t = jnp.asarray(images), jnp.asarray(bank)
            compiled = jax.jit(forward).lower(state, x, t).compile()
            ours[dtype] = (compiled, lambda c=compiled, s=state, x=x, t=t: c(s, x, t))
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()

    def torch_call():
        with torch.inference_mode():
            return torch_model(pixel_values=pixels).masks_queries_logits

    return ours, torch_call, f"Swin-B segmenter forward, batch {batch} @ {size}x{size}"


def print_tables(what: str, tables: dict[str, dict[str, float]], usage: dict[str, dict[str, float]]) -> None:
    columns = list(tables)
    categories = sorted({c for t in tables.values() for c in t}, key=lambda c: -max(t.get(c, 0) for t in tables.values()))
    print(f"\n{what}: milliseconds per forward pass by operation (share of the implementation's operation time)\n")
    print("| operation | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for category in categories:
        cells = []
        for name in columns:
            seconds, total = tables[name].get(category, 0.0), sum(tables[name].values())
            cells.append(f"{1e3 * seconds:.1f} ({100 * seconds / total:.0f}%)" if seconds else "-")
        print(f"| {category} | " + " | ".join(cells) + " |")
    print("| **sum of operation times** | " + " | ".join(f"**{1e3 * sum(t.values()):.0f}**" for t in tables.values()) + " |")
    print("| wall time per forward, untraced (median) | "
          + " | ".join(f"{1e3 * usage[n]['wall']:.0f}" for n in columns) + " |")
    print("| CPU time per forward (all threads) | " + " | ".join(f"{1e3 * usage[n]['cpu']:.0f}" for n in columns) + " |")
    print("| busy threads (CPU s / wall s) | " + " | ".join(f"{usage[n]['busy']:.2f}" for n in columns) + " |")
    print("| CPU time of the 3 busiest threads | "
          + " | ".join(" / ".join(f"{100 * s:.0f}%" for s in usage[n]["top"]) for n in columns) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["vit_b16", "vit_l14", "swin_b"], default="vit_b16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=640, help="swin_b: image side")
    parser.add_argument("--layers", type=int, help="ViT: fewer blocks than the preset (the table per block is the same)")
    parser.add_argument("--dtypes", type=lambda s: s.split(","), default=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=3, help="traced calls per implementation (and untraced ones)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's); XLA:CPU uses every "
                        "core the process may run on: pin the process (taskset) to compare on fewer")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "swin_b":
        ours, torch_call, what = swin_pair(args.size, args.batch, args.dtypes)
    else:
        ours, torch_call, what = vit_pair(args.model, args.batch, args.dtypes, args.layers)
    calls = {f"ovseg_jax {d}": call for d, (_, call) in ours.items()} | {"torch float32": torch_call}
    for call in calls.values():  # warm up
        jax.block_until_ready(call())
    tables, usage = {}, {}
    for name, call in calls.items():  # untraced first: the busy-thread figures
        usage[name] = thread_usage(call, args.rounds)
    for d, (compiled, call) in ours.items():
        tables[f"ovseg_jax {d}"] = xla_op_table(compiled, call, args.rounds)
    tables["torch float32"] = torch_op_table(torch_call, args.rounds)
    print("\n".join(environment_lines()))
    print_tables(what, tables, usage)


if __name__ == "__main__":
    main()
