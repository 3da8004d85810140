"""Train a stage: `python -m ovseg_jax.train --config configs/vitl_mpt.py --workdir DIR`.

Any config field can be overridden: `--config.optim.lr=1e-5 --config.total_steps=100`; a config
file may take a variant string: `--config configs/synthetic.py:clip_ft`. Compiled steps are kept in
JAX's persistent compilation cache (`--compile_cache`, default `~/.cache/ovseg_jax/jax_cache`;
`--compile_cache=none` turns it off), so a restarted or resumed run skips most of its compilation.
An override of a field the config does not have is refused in one line naming the closest fields.
With several simulated CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=N`) the
command adds the XLA:CPU scheduler flag that cached programs need
(`ovseg_jax.training.trainer.prepare_simulated_devices`). The loop itself is `ovseg_jax.training.trainer`.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import sys

from absl import app, flags
from ml_collections import config_flags

from ovseg_jax import configs
from ovseg_jax.configs import ConfigError
from ovseg_jax.training import sharding
from ovseg_jax.training.monitor import DropInfoFrom
from ovseg_jax.training.trainer import SIMULATED_DEVICES_XLA_FLAG, NonFiniteLossError, prepare_simulated_devices, run
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
    if prepare_simulated_devices():  # before anything starts JAX's backend
        log.info("simulated CPU devices: added %s to XLA_FLAGS", SIMULATED_DEVICES_XLA_FLAG)
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


def _load_config_file(spec: str):
    """`file.py[:variant]` -> its `get_config(variant)`, as `config_flags` loads it."""
    path, _, variant = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_ovseg_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant) if variant else module.get_config()


def _config_spec(argv: list[str]) -> str | None:
    """The value of `--config=SPEC` or `--config SPEC` in `argv`."""
    for arg, following in zip(argv, [*argv[1:], None]):
        if re.fullmatch(r"--?config", arg):
            return following
        if re.match(r"--?config=", arg):
            return arg.split("=", 1)[1]
    return None


def _unknown_override(argv: list[str]) -> str | None:
    """The first `--config.a.b=v` override in `argv` naming a field the config lacks -> one line about
    it (`configs.unknown_field`); None when there is none or the config cannot be loaded."""
    spec = _config_spec(argv)
    if spec is None:
        return None
    try:
        config = _load_config_file(spec)
    except Exception:  # noqa: BLE001 - the config file's own error is config_flags' to report
        return None
    for arg in argv:
        override = re.match(r"--?(?:no)?config\.([\w.]+)", arg)
        problem = override and configs.unknown_field(config, override.group(1))
        if problem:
            return f"--config.{override.group(1)}: {problem}"
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing; an override of a field the config lacks ends in one line naming it and
    the closest existing fields (ml_collections raises a bare AttributeError)."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError):
        problem = _unknown_override(argv)
        if problem is None:
            raise
        sys.stderr.write(f"FATAL Flags parsing error: {problem}\n")
        sys.exit(1)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=parse_flags)
