"""Fixtures shared across test files."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """`python -m ovseg_jax.demo --quick` run once per session -> (output dir, its result dict).

    The dir holds `ovseg_synthetic.pth` (merged segmenter + mask-prompted CLIP), the world with its
    tokenizer (`world/tokenizer`) and val split (`world/val`), and the stage workdirs (`train/*`).
    Tests must not write into it."""
    from ovseg_jax import demo

    out = tmp_path_factory.mktemp("quick_demo")
    return out, demo.run(out, "quick")
