"""Fixtures shared across test files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from filelock import FileLock

# XLA:CPU generates code at LLVM's -O0 in the tests, unless XLA_FLAGS names a level already
# (`XLA_FLAGS=--xla_backend_optimization_level=2 make test` runs them as users do). The suite's
# time is mostly the compilation of tiny models, which this almost halves; their programs run up to
# 2x slower and compute the same up to float32 rounding (a tiny segmenter's parameters after 3 steps:
# within 3e-7). Set before JAX creates its CPU client (no test module computes at import);
# subprocesses inherit it.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

# The persistent compilation cache's settings, as environment variables that JAX reads when it is
# imported: subprocesses the tests start inherit them from os.environ.
CACHE_MIN_SECONDS = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}

# Test files in the order `make test` starts them: the longest first (measured), so that the two
# workers end together. The quick demo's file comes first: while one worker builds the demo, the
# other starts the recipes; the demo's other users come after.
LONGEST_FIRST = ["test_demo.py", "test_recipes.py", "test_learning.py", "test_mine_pairs.py", "test_evaluate_cli.py",
                 "test_predict_cli.py", "test_web_app.py", "test_train_segmenter.py", "test_ablate.py",
                 "test_scan_remat.py", "test_predict.py", "test_train_distributed.py"]


def session_root(tmp_path_factory) -> Path:
    """This test session's temporary root; under pytest-xdist (`make test`) common to its workers."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory) -> Path:
    """One JAX persistent compilation cache for the session, every program stored however quick its
    compilation -> its directory.

    A program compiled once is loaded by whoever builds it next: the other xdist worker, the
    subprocesses tests start (they inherit `JAX_COMPILATION_CACHE_DIR`; command-line tools need
    `--compile_cache` / `--compile-cache` pointed at it) and this process itself when a new `jit`
    traces the same program (a Trainer built again from an equal config). A session starts with an
    empty cache, as CI does, so no test's outcome depends on an earlier run."""
    import jax

    directory = session_root(tmp_path_factory) / "jax_cache"
    os.environ.update(JAX_COMPILATION_CACHE_DIR=str(directory), **CACHE_MIN_SECONDS)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    _store_every_program()
    # The process's first compilation fixes the cache's directory; make it this one, before a
    # command run in process (`demo.run`) points the setting at its own.
    jax.jit(lambda x: x + 1)(0)
    return directory


def _store_every_program() -> None:
    import jax

    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(autouse=True)
def _cache_every_program_again(compilation_cache):
    """Commands run in process (`demo.run`, `predict.run`) raise the cache's minimum compile time to
    their own; put the session's back after each test. (The cache's directory is fixed at the first
    compilation of the process, so theirs does not take effect.)"""
    yield
    _store_every_program()


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """`python -m ovseg_jax.demo --quick` run once per session -> (output dir, its result dict).

    The dir holds `ovseg_synthetic.pth` (merged segmenter + mask-prompted CLIP), the world with its
    tokenizer (`world/tokenizer`) and val split (`world/val`), and the stage workdirs (`train/*`).
    Tests must not write into it. Under pytest-xdist (`make test`) the workers share one run: the
    first to need it builds it in the session's common temporary directory, the others wait for it
    and read its `metrics.json` (the dict `demo.run` returned)."""
    from ovseg_jax.experiments import demo

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        out = tmp_path_factory.mktemp("quick_demo")
        return out, demo.run(out, "quick")
    shared = session_root(tmp_path_factory)
    out, done = shared / "quick_demo", shared / "quick_demo.done"
    with FileLock(str(shared / "quick_demo.lock")):
        if not done.exists():
            demo.run(out, "quick")
            done.touch()
    return out, json.loads((out / "metrics.json").read_text())


def pytest_collection_modifyitems(config, items):
    """Tests that use the quick demo are `slow` (`make test-fast` leaves them out). The files that
    take longest run first (`make test`: `--dist loadfile --no-loadscope-reorder` hands whole files
    to the workers in this order), so that no worker ends the session alone with a long file; the
    others follow with the most tests first, as xdist's own ordering does."""
    for item in items:
        if "quick_demo" in item.fixturenames:
            item.add_marker(pytest.mark.slow)
    counts: dict[str, int] = {}
    for item in items:
        counts[item.path.name] = counts.get(item.path.name, 0) + 1
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), -counts[item.path.name], str(item.path)))
