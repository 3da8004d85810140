"""Fixtures shared across test files."""

from __future__ import annotations

import json
import os

import pytest
from filelock import FileLock


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
    shared = tmp_path_factory.getbasetemp().parent  # this session's root, common to its workers
    out, done = shared / "quick_demo", shared / "quick_demo.done"
    with FileLock(str(shared / "quick_demo.lock")):
        if not done.exists():
            demo.run(out, "quick")
            done.touch()
    return out, json.loads((out / "metrics.json").read_text())
