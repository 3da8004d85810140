"""The appendix's CLIP adaptation variants (Tables 2-5) on the synthetic world.

    python -m ovseg_jax.ablate --table 2 --from outputs/demo --out outputs/ablate   # FT/MPT order
    python -m ovseg_jax.ablate --table 3 --from outputs/demo --out outputs/ablate   # prompt depth
    python -m ovseg_jax.ablate --table 4 --from outputs/demo --out outputs/ablate   # MPT vs deep VPT
    python -m ovseg_jax.ablate --table 5 --from outputs/demo --out outputs/ablate   # pair source

The variants and plans are `ovseg_jax.experiments.ablation`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ovseg_jax.experiments.ablation import TABLES, run
from ovseg_jax.utils.host_memory import keep_freed_memory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", type=int, required=True, choices=sorted(TABLES), help="appendix table")
    parser.add_argument("--out", type=Path, default=Path("outputs/ablate"), help="output directory")
    parser.add_argument("--from", dest="from_dir", type=Path, default=None,
                        help="a demo output directory whose world, pretrained CLIP and segmenter to reuse")
    parser.add_argument("--quick", action="store_true", help="a few steps per stage (smoke test)")
    args = parser.parse_args(argv)
    keep_freed_memory()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)
    run(args.table, args.out, args.from_dir, args.quick)


if __name__ == "__main__":
    main()
