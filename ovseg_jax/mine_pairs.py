"""Mine mask-category pairs from captions (reference 4.1; the original never released this step).

    python -m ovseg_jax.mine_pairs --config configs/mine_coco.py --workdir outputs/mined_coco
    python -m ovseg_jax.mine_pairs --config configs/mine_synthetic.py:outputs/demo --workdir outputs/demo/world/mined

Writes `pairs.jsonl`, `nouns.json`, `scores.png` and `report.json` into the workdir; what each
holds, the scores, sharding and resuming are described in `ovseg_jax.mining.miner`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from ovseg_jax.configs import ConfigError
from ovseg_jax.data.sources import DatasetLayoutError
from ovseg_jax.mining.miner import format_report, run
from ovseg_jax.utils.host_memory import keep_freed_memory

log = logging.getLogger("ovseg_jax.mine_pairs")


def main(argv: list[str]) -> None:
    from absl import app  # noqa: PLC0415

    from ovseg_jax.training import sharding  # noqa: PLC0415

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    keep_freed_memory()
    sharding.initialize_distributed()
    try:
        report = run(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, FileNotFoundError, DatasetLayoutError, ImportError, LookupError) as e:
        log.error("%s", e)
        sys.exit(1)
    if report is None:
        print(f"shard done; the last shard to finish merges into {_WORKDIR.value}")
    else:
        print(format_report(report))
        print(f"wrote {Path(_WORKDIR.value) / 'pairs.jsonl'}, nouns.json, scores.png, report.json")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file("config", None, "config file, optionally file.py:arg", lock_config=False)
    _WORKDIR = flags.DEFINE_string("workdir", None, "output directory (resumable)")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
