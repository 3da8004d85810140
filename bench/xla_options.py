"""XLA:CPU options against the CLIP image tower: speed (ratio to torch in the same process) and numbers.

    .venv/bin/python bench/xla_options.py                          # ViT-B/16, 4 blocks, batch 8, float32
    .venv/bin/python bench/xla_options.py --dtype bfloat16 --layers 12 --rounds 7
    .venv/bin/python bench/xla_options.py --options "--xla_cpu_use_xnnpack=true"

Each setting of `XLA_FLAGS` runs in its own process (XLA reads the flags once, when it starts):
the CLIP image tower (random weights, `bench/profile_vit.vit_pair`) and transformers'
`get_image_features` on the same crops, in interleaved rounds (`bench/common.interleaved`, every
other round reversed). A process's ovseg_jax median divided by its torch median is the figure
that compares across processes on a shared machine (torch, untouched by `XLA_FLAGS`, is the
yardstick); CPU seconds per call are printed too. Every setting's embeddings are compared with the
first setting's (max |difference| / max |value|): an option that moves them beyond float32
rounding is not one to keep.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

YNN = "--xla_cpu_experimental_ynn_fusion_type="
OPTIONS = [
    "",  # XLA:CPU's defaults: dots, convolutions and reductions in YNNPACK, one library call each
    YNN,  # no YNNPACK: XLA's own (Eigen) dot and convolution kernels
    # dots fused with the elementwise work around them (bias, activation) into one YNNPACK call
    YNN + "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
    YNN + "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE,"
    "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
    "--xla_cpu_use_xnnpack=true",
    "--xla_cpu_multi_thread_eigen=false",
    "--xla_cpu_enable_concurrency_optimized_scheduler=false",
    "--xla_cpu_prefer_vector_width=512",
]


def child(args) -> None:
    """One setting: time ours and torch interleaved, save our embeddings, print one JSON line."""
    import jax
    import torch

    from common import interleaved  # bench/common.py
    from profile_vit import vit_pair  # bench/profile_vit.py

    ours, torch_call, _ = vit_pair(args.model, args.batch, [args.dtype], args.layers)
    _, call = ours[args.dtype]
    cpu: dict[str, float] = {}
    times = interleaved({"ours": lambda: jax.block_until_ready(call()), "torch": torch_call}, args.rounds,
                        cpu=cpu, alternate=True)
    np.save(args.out, np.asarray(call()))
    print(json.dumps({"ours": times["ours"][2], "torch": times["torch"][2], "cpu_ours": cpu["ours"], "cpu_torch": cpu["torch"], "torch_threads": torch.get_num_threads(),
                      "load": os.getloadavg()[0]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["vit_b16", "vit_l14"], default="vit_b16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4, help="blocks of the image tower (each is the same work)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--options", type=lambda s: s.split(";"), default=OPTIONS,
                        help="';'-separated XLA_FLAGS settings (the first is the numerical reference)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    from common import environment_lines  # bench/common.py

    print("\n".join(environment_lines()))
    print(f"\nCLIP {args.model} image tower, {args.layers} blocks, batch {args.batch}, {args.dtype}, "
          f"{args.rounds} interleaved rounds per setting against transformers float32\n")
    print("| XLA_FLAGS | ours ms | torch ms | ours / torch, wall | ours / torch, CPU s | max rel. difference "
          "| load |")
    print("|---|---|---|---|---|---|---|")
    reference = None
    with tempfile.TemporaryDirectory() as tmp:
        for i, flags in enumerate(args.options):
            out = os.path.join(tmp, f"{i}.npy")
            argv = [sys.executable, __file__, "--child", "--out", out, "--model", args.model, "--batch",
                    str(args.batch), "--layers", str(args.layers), "--dtype", args.dtype, "--rounds", str(args.rounds)]
            env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()}
            done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
            if done.returncode:
                print(f"| `{flags or '(defaults)'}` | failed: {done.stderr.strip().splitlines()[-1][:120]} ||||||")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            emb = np.load(out)
            reference = emb if reference is None else reference
            diff = float(np.abs(emb - reference).max() / np.abs(reference).max())
            print(f"| `{flags or '(defaults)'}` | {1e3 * r['ours']:.0f} | {1e3 * r['torch']:.0f} "
                  f"| {r['ours'] / r['torch']:.2f} | {r['cpu_ours'] / r['cpu_torch']:.2f} | {diff:.1e} "
                  f"| {r['load']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
