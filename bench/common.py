"""Shared helpers of the bench/ scripts: timing with a separate first (compiling) call, ratio tables."""

from __future__ import annotations

import time
from typing import Callable

import jax


def timed(fn: Callable, iters: int) -> tuple[float, float]:
    """(seconds of the first call, mean seconds of the following `iters` calls); blocks on results."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(iters):
        jax.block_until_ready(fn())
    return first, (time.perf_counter() - t0) / iters


def print_rate_table(rows: list[tuple[str, str, float, float]], unit: str, reference: float | None) -> None:
    """Rows (implementation, dtype, first-call s, rate) with the ratio of each rate to `reference`."""
    print(f"{'implementation':<34} {'dtype':<9} {'first call s':>12} {unit:>9} {'vs torch':>8}")
    for name, dtype, first, rate in rows:
        ratio = f"{rate / reference:7.2f}x" if reference else "-"
        print(f"{name:<34} {dtype:<9} {first:12.2f} {rate:9.3f} {ratio:>8}")
