"""`make bench`: short versions of the comparison benches, one process each, then the Measured
table (the `make-bench` section of docs/performance.md) from what they recorded.

    .venv/bin/python bench/make_bench.py                     # every run below
    .venv/bin/python bench/make_bench.py --only clip_encode,segmenter
    .venv/bin/python bench/make_bench.py --list
    .venv/bin/python bench/make_bench.py --docs docs/performance.md   # also put the table into the page

Each run is a bench of this folder with fewer rounds, a smaller batch or fewer proposals than its
defaults, and `--record` (a JSON line per comparison: what, our figure, torch's, the ratio, the
command, the commit, the machine, torch's thread count, the load average, the date). Every
figure comes from interleaved rounds in one process (`bench/common.interleaved`). The table is
printed at the end as Markdown rows for docs/performance.md (`--docs` writes them between its
`<!-- make-bench: begin` and `<!-- make-bench: end -->` lines); the runs' own output goes to stderr.
The timings are only comparable on a quiet machine: check the load average in the machine column.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (name, arguments): the short versions, estimated at 8-10 minutes on the project's 2-core EPYC when
# quiet (compilation is a third of it: the Swin-B training step alone compiles for 1-2 minutes). The
# bfloat16 figures come from clip_encode; `Predictor` is timed in float32 only, to stay in that time.
RUNS = [
    ("clip_encode", ["bench/clip_encode.py", "--batch", "16", "--rounds", "5"]),
    ("segmenter", ["bench/segmenter.py", "--rounds", "3"]),
    ("train_step_vit_b16", ["bench/train_step.py", "--model", "vit_b16", "--batch", "4", "--iters", "2",
                            "--warmup", "1"]),
    ("train_step_swin_b", ["bench/train_step.py", "--model", "swin_b", "--size", "128", "--batch", "1",
                           "--iters", "4", "--warmup", "1"]),
    ("inference_r101c_vitb", ["bench/inference.py", "--preset", "r101c_vitb", "--queries", "16", "--batches", "1",
                              "--rounds", "1", "--dtypes", "float32"]),
]

COLUMNS = ["what", "command", "ovseg_jax", "torch reference", "ratio", "torch threads", "machine, load average",
           "commit", "date"]


def command_of(row: dict) -> str:
    """The recorded command without its `--record` argument."""
    words = row["command"].split()
    if "--record" in words:
        i = words.index("--record")
        del words[i:i + 2]
    return " ".join(words)


def table(rows: list[dict]) -> str:
    """The recorded comparisons as Markdown table rows (header included), one per comparison."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        threads = row.get("torch", "").split(", ")[-1].split()[0] if row.get("torch") else ""
        machine = row["machine"] + (f", load {row['load average'].split()[0]}" if row.get("load average") else "")
        ratio = f"{row['ratio']:.2f}x" if row.get("ratio") else ""
        cells = [row["what"], f"`{command_of(row)}`", row["ours"], row["reference"], ratio, threads, machine,
                 row["commit"], row["date"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_note(rows: list[dict]) -> str:
    """A sentence under the table when some row was measured on a busy machine, else "". The benches
    keep every core busy themselves, so a 1-minute load average up to the core count (plus 0.5) is a
    quiet machine."""
    loads = [float(r["load average"].split()[0]) for r in rows if r.get("load average")]
    if not loads or max(loads) <= (os.cpu_count() or 1) + 0.5:
        return ""
    return (f"\nMeasured while other jobs shared the machine (load average up to {max(loads):.1f}, machine "
            "column): torch's threads lose more than XLA's on a busy machine, so these ratios favour ovseg_jax; "
            "re-measure on a quiet machine.")


def write_docs(path: Path, markdown: str) -> None:
    """Replace what lies between the `<!-- make-bench: begin ...-->` and `<!-- make-bench: end -->`
    lines of `path` with `markdown`."""
    text = path.read_text()
    begin, end = text.find("<!-- make-bench: begin"), text.find("<!-- make-bench: end -->")
    if begin < 0 or end < begin:
        sys.exit(f"{path}: expected a '<!-- make-bench: begin ... -->' line and a later '<!-- make-bench: end -->'")
    begin = text.index("-->", begin) + len("-->")
    path.write_text(text[:begin] + "\n\n" + markdown + "\n\n" + text[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", type=lambda s: s.split(","), help="comma-separated run names (see --list)")
    parser.add_argument("--list", action="store_true", help="print the runs and their commands, run nothing")
    parser.add_argument("--records", help="keep the JSON lines here (default: a temporary file)")
    parser.add_argument("--docs", type=Path, help="write the table into this page's make-bench section")
    args = parser.parse_args()
    runs = [(name, argv) for name, argv in RUNS if not args.only or name in args.only]
    if args.list or not runs:
        for name, argv in RUNS:
            print(f"{name:24s} python {' '.join(argv)}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        records = Path(args.records or Path(tmp) / "records.jsonl")
        took, failed = {}, []
        start = time.perf_counter()
        for name, argv in runs:
            print(f"[make bench] {name}: python {' '.join(argv)}", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            done = subprocess.run([sys.executable, *argv, "--record", str(records)], cwd=ROOT, check=False,
                                  stdout=sys.stderr, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            took[name] = time.perf_counter() - t0
            if done.returncode:
                failed.append(name)
        rows = [json.loads(line) for line in records.read_text().splitlines()] if records.exists() else []
    markdown = table(rows) + load_note(rows)
    print("\n" + markdown)
    if args.docs and rows:
        write_docs(args.docs, markdown)
    print("\nwall seconds per run: " + ", ".join(f"{n} {s:.0f}" for n, s in took.items())
          + f"; total {time.perf_counter() - start:.0f} s")
    if failed:
        sys.exit(f"make bench: these runs failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
