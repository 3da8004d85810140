"""Train a stage: `python -m ovseg_jax.train --config configs/vitl_mpt.py --workdir DIR`.

Any config field can be overridden: `--config.optim.lr=1e-5 --config.total_steps=100`; a config
file may take a variant string: `--config configs/synthetic.py:clip_ft`. Compiled steps are kept in
JAX's persistent compilation cache (`--compile_cache`, default `~/.cache/ovseg_jax/jax_cache`;
`--compile_cache=none` turns it off), so a restarted or resumed run skips most of its compilation.
The loop itself is `ovseg_jax.training.trainer`.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from ovseg_jax.configs import ConfigError
from ovseg_jax.training import sharding
from ovseg_jax.training.monitor import DropInfoFrom
from ovseg_jax.training.trainer import NonFiniteLossError, run
from ovseg_jax.utils import compilation
from ovseg_jax.utils.host_memory import keep_freed_memory

log = logging.getLogger("ovseg_jax.train")

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file, optionally file.py:variant", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints and TensorBoard logs")
_COMPILE_CACHE = flags.DEFINE_string(
    "compile_cache", str(compilation.default_cache_dir()),
    "JAX persistent compilation cache directory: a rerun or resumed run loads its compiled steps from it "
    "('none' turns it off)")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").addFilter(DropInfoFrom("/orbax/"))  # orbax's per-save INFO chatter (clu's notes stay)
    keep_freed_memory()
    sharding.initialize_distributed()
    if _CONFIG.value is None or not _WORKDIR.value:
        raise app.UsageError("--config FILE[:variant] and --workdir DIR are required")
    if _COMPILE_CACHE.value and _COMPILE_CACHE.value.lower() != "none":
        log.info("compilation cache: %s", compilation.enable_cache(_COMPILE_CACHE.value))
    try:
        result = run(_CONFIG.value, _WORKDIR.value)
    except (NonFiniteLossError, FileNotFoundError, ConfigError) as e:
        log.error("%s", e)
        sys.exit(1)
    log.info("training %s", result)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
