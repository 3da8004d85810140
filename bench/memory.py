"""Per-device memory and compile time of the real recipes' training steps, from XLA's compiled
memory analysis, for 1 / 8 / 32 devices, with and without scan and rematerialisation.

    .venv/bin/python bench/memory.py                                  # everything below (slow)
    .venv/bin/python bench/memory.py --presets vitl_ft --devices 1 8 --remat none block --scan on

Presets are the shipped recipes with their global batch, crop size, trained parameters,
optimiser and sharding rules (FSDP over the "data" axis for parameters of >= 2^22 elements):
`vitl_ft` (configs/vitl_ft.py: CLIP ViT-L/14 fine-tuning, batch 128), `vitl_mpt`
(configs/vitl_mpt.py: mask prompt tuning, depth 3, batch 128) and `swinb_seg`
(configs/swinb_vitl_seg.py: Swin-B segmenter, 640 crops, batch 32, 64 masks per crop).

Nothing full-size is allocated: the model is built with `nnx.eval_shape`, the trainer's state and
the batch are `jax.ShapeDtypeStruct`s with their shardings, and `Trainer.train_step` is lowered and
compiled for them. Each device count runs in its own process on fake CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=N`), with XLA:CPU's memory-aware scheduler
(`CPU_SCHEDULER`). Per-device bytes =
`argument + output - alias + temp + generated code` of `Compiled.memory_analysis()` (the state is
donated, so its outputs alias its arguments). The CPU backend's buffer assignment and fusion
differ from TPU/GPU ones: read the figures as an estimate of the accelerator's.
Compile time = tracing + lowering (`lower`) and XLA compilation (`compile`), seconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"vitl_ft": "configs/vitl_ft.py", "vitl_mpt": "configs/vitl_mpt.py", "swinb_seg": "configs/swinb_vitl_seg.py"}
REMATS = ("none", "block", "dots")
# XLA:CPU's default scheduler favours concurrency over memory: it runs the recomputed forward of
# unscanned remat blocks early and keeps their outputs alive (ViT-L MPT, 1 device, no remat:
# 98 GiB with it, 65 GiB with the memory-aware list scheduler that TPU/GPU compilers resemble).
CPU_SCHEDULER = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
GIB = 2**30
DEVICE_SIZES = (("16 GiB (TPU v3 core)", 16 * GIB), ("32 GiB (TPU v4)", 32 * GIB), ("80 GiB (A100/H100)", 80 * GIB))


def recipe(preset: str):
    path = ROOT / PRESETS[preset]
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.init_from = ""  # random weights: shapes are all that matter
    return config


def abstract_model(config, dtype):
    """The recipe's model as an abstract `nnx` module (no parameter allocated)."""
    import numpy as np  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    if config.task == "clip":
        from ovseg_jax.models.clip import CLIP, ClipConfig  # noqa: PLC0415

        cfg = ClipConfig(**config.model.clip.to_dict())
        return nnx.eval_shape(lambda: CLIP(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    from ovseg_jax.losses.mask_losses import LossWeights  # noqa: PLC0415
    from ovseg_jax.models.maskformer import Segmenter, SegmenterConfig  # noqa: PLC0415
    from ovseg_jax.training.tasks.segmenter import SegmenterWithTextBank  # noqa: PLC0415

    cfg = SegmenterConfig.from_dict(config.model.segmenter.to_dict())
    bank = np.zeros((len(config.model.class_names), cfg.clip_dim), np.float32)  # the frozen text bank
    w = config.loss
    return nnx.eval_shape(lambda: SegmenterWithTextBank(Segmenter(cfg, dtype=dtype, rngs=nnx.Rngs(0)), bank,
                                                        LossWeights(ce=w.ce, mask=w.mask, dice=w.dice), w.no_object))


def abstract_batch(config, sharding) -> dict:
    """The global batch the recipe's data pipeline yields, as shape/dtype/sharding structs."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    b = config.batch_size
    if config.task == "clip":
        clip = config.model.clip
        s = clip.image_size
        shapes = {"image": ((b, s, s, 3), np.float32), "token_ids": ((b, clip.context_length), np.int32)}
        if clip.mask_prompt_depth:
            shapes["region_mask"] = ((b, s, s), np.float32)
    else:
        s, g = config.data.crop_size, config.data.max_masks
        shapes = {"image": ((b, s, s, 3), np.uint8), "label": ((b, s, s), np.int32),
                  "masks": ((b, g, s, s), np.uint8), "classes": ((b, g), np.int32), "valid": ((b, g), np.bool_)}
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for k, (shape, dtype) in shapes.items()}


def measure(preset: str, scan: bool, remat: str, dtype: str) -> dict:
    """Compile the recipe's train step for the devices of this process -> times and bytes."""
    import jax  # noqa: PLC0415

    from ovseg_jax.training.trainer import DTYPES, Trainer  # noqa: PLC0415

    config = recipe(preset)
    config.scan_layers, config.remat, config.dtype = scan, remat, dtype
    t0 = time.perf_counter()
    trainer = Trainer(config, model=abstract_model(config, DTYPES[dtype]))
    lowered = trainer.train_step.lower(trainer.state, abstract_batch(config, trainer.batch_sharding))
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    m = compiled.memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
             + m.generated_code_size_in_bytes)
    return {"preset": preset, "devices": jax.device_count(), "scan": scan, "remat": remat, "dtype": dtype,
            "lower_s": t1 - t0, "compile_s": t2 - t1, "argument": m.argument_size_in_bytes,
            "output": m.output_size_in_bytes, "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes,
            "code": m.generated_code_size_in_bytes, "total": total}


def child(args) -> None:
    """One process, one device count: print a JSON line per (preset, scan, remat)."""
    logging.disable(logging.WARNING)
    for preset in args.presets:
        for scan in args.scan:
            for remat in args.remat:
                try:
                    row = measure(preset, scan == "on", remat, args.dtype)
                except Exception as e:  # noqa: BLE001  (reported in the table, the others go on)
                    row = {"preset": preset, "scan": scan == "on", "remat": remat, "error": f"{type(e).__name__}: {e}"}
                print(json.dumps(row), flush=True)


def run_devices(n: int, args, timeout: float) -> list[dict]:
    flags = f"--xla_force_host_platform_device_count={n} {CPU_SCHEDULER} {os.environ.get('XLA_FLAGS', '')}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "XLA_FLAGS": flags.strip()}
    cmd = [sys.executable, __file__, "--child", "--presets", *args.presets, "--scan", *args.scan,
           "--remat", *args.remat, "--dtype", args.dtype]
    rows = []
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True) as proc:
        start = time.monotonic()
        try:
            for line in proc.stdout:
                row = json.loads(line)
                row["devices"] = n
                rows.append(row)
                print(f"  [{n} devices] {summary(row)}", flush=True)
                if time.monotonic() - start > timeout:
                    proc.kill()
                    print(f"  [{n} devices] stopped after {timeout:.0f} s", flush=True)
                    break
        finally:
            proc.wait()
    return rows


def summary(row: dict) -> str:
    what = f"{row['preset']} scan={'on' if row['scan'] else 'off'} remat={row['remat']}"
    if "error" in row:
        return f"{what}: {row['error'][:200]}"
    return (f"{what}: {row['total'] / GIB:.2f} GiB/device (temp {row['temp'] / GIB:.2f}), "
            f"lower {row['lower_s']:.1f} s, compile {row['compile_s']:.1f} s")


def fits(total: float) -> str:
    """The device sizes of `DEVICE_SIZES` that hold `total` bytes."""
    return ", ".join(name for name, size in DEVICE_SIZES if total <= size) or "none of them"


def print_tables(rows: list[dict]) -> None:
    ok = [r for r in rows if "error" not in r]
    print("\nPer-device memory, GiB (args + outputs - aliased + temp + code; XLA CPU memory analysis)")
    print("(args: the train state, i.e. parameters + optimiser moments, and the batch; temp: activations and "
          "scratch)")
    print(f"{'preset':<10} {'devices':>7} {'scan':>5} {'remat':>6} {'args':>7} {'temp':>7} {'total':>7}  fits in")
    for r in sorted(ok, key=lambda r: (r["preset"], r["devices"], not r["scan"], REMATS.index(r["remat"]))):
        print(f"{r['preset']:<10} {r['devices']:>7} {'on' if r['scan'] else 'off':>5} {r['remat']:>6} "
              f"{r['argument'] / GIB:7.2f} {r['temp'] / GIB:7.2f} {r['total'] / GIB:7.2f}  {fits(r['total'])}")
    print("\nCompile time of the train step (s: trace + lower / XLA compile)")
    print(f"{'preset':<10} {'devices':>7} {'remat':>6} {'scan off':>16} {'scan on':>16}")
    keyed = {(r["preset"], r["devices"], r["remat"], r["scan"]): r for r in ok}
    for preset, n, remat in sorted({(r["preset"], r["devices"], r["remat"]) for r in ok},
                                   key=lambda k: (k[0], k[1], REMATS.index(k[2]))):
        cells = []
        for scan in (False, True):
            r = keyed.get((preset, n, remat, scan))
            cells.append(f"{r['lower_s']:6.1f} / {r['compile_s']:6.1f}" if r else "-")
        print(f"{preset:<10} {n:>7} {remat:>6} {cells[0]:>16} {cells[1]:>16}")
    for r in rows:
        if "error" in r:
            print(f"failed: {summary(r)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", choices=sorted(PRESETS), default=["vitl_ft", "vitl_mpt", "swinb_seg"])
    parser.add_argument("--devices", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--scan", nargs="+", choices=["off", "on"], default=["on", "off"])
    parser.add_argument("--remat", nargs="+", choices=REMATS, default=list(REMATS))
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="compute dtype (the recipes train in float32)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per device count")
    parser.add_argument("--json", type=Path, help="also append the rows to this JSON-lines file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    rows = []
    for n in args.devices:
        rows += run_devices(n, args, args.timeout)
        if args.json:
            with args.json.open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows if r["devices"] == n)
    print_tables(rows)


if __name__ == "__main__":
    main()
