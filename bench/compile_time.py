"""Compile time of the real recipes' training steps with and without `scan_layers`, measured
side by side: the two settings alternate, `--rounds` times each, in one process on one device.

    .venv/bin/python bench/compile_time.py                       # the three presets, 3 rounds
    .venv/bin/python bench/compile_time.py --presets vitl_mpt --rounds 2 --remat block

XLA:CPU runs with its memory-aware scheduler, as in bench/memory.py. Each measurement builds a fresh Trainer (abstract model and state, as bench/memory.py) and times
tracing + lowering (`lower`) and XLA's compilation (`compile`) of its `train_step`; nothing is
cached between them (no persistent cache; a new jitted function each time). Prints every round
and the medians.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics

from memory import CPU_SCHEDULER, PRESETS, REMATS, measure  # bench/memory.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", choices=sorted(PRESETS), default=["vitl_ft", "vitl_mpt", "swinb_seg"])
    parser.add_argument("--remat", choices=REMATS, default="none")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = f"{CPU_SCHEDULER} {os.environ.get('XLA_FLAGS', '')}".strip()  # as bench/memory.py
    logging.disable(logging.WARNING)
    rows = []
    for preset in args.presets:
        times = {False: [], True: []}
        for r in range(args.rounds):
            for scan in (False, True):
                m = measure(preset, scan, args.remat, args.dtype)
                times[scan].append((m["lower_s"], m["compile_s"]))
                print(f"{preset} round {r + 1} scan={'on' if scan else 'off'}: lower {m['lower_s']:.1f} s, "
                      f"compile {m['compile_s']:.1f} s", flush=True)
        rows.append((preset, times))
    print(f"\nTrain step compile time, 1 device, remat={args.remat}, {args.dtype}: median of {args.rounds} "
          "(s: trace + lower / XLA compile / total)")
    print(f"{'preset':<10} {'scan off':>22} {'scan on':>22} {'on / off':>9}")
    for preset, times in rows:
        cells, totals = [], []
        for scan in (False, True):
            lower = statistics.median(t[0] for t in times[scan])
            comp = statistics.median(t[1] for t in times[scan])
            total = statistics.median(t[0] + t[1] for t in times[scan])
            cells.append(f"{lower:5.1f} / {comp:6.1f} / {total:6.1f}")
            totals.append(total)
        print(f"{preset:<10} {cells[0]:>22} {cells[1]:>22} {totals[1] / totals[0]:8.2f}x")


if __name__ == "__main__":
    main()
