"""The whole of OVSeg on the generated open-vocabulary world: `python -m ovseg_jax.demo --out outputs/demo`.

Generates the world, trains every stage of `configs/synthetic.py`, evaluates them as the paper's
tables and writes the merged checkpoint (`ovseg_jax.experiments.demo`). `--quick` runs a few steps
per stage (a smoke test).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ovseg_jax.experiments.demo import run
from ovseg_jax.utils.host_memory import keep_freed_memory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output directory")
    parser.add_argument("--quick", action="store_true", help="a few steps per stage (smoke test)")
    args = parser.parse_args(argv)
    keep_freed_memory()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's per-save chatter
    run(args.out, "quick" if args.quick else None)


if __name__ == "__main__":
    main()
