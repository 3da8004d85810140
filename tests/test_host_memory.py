"""`ovseg_jax.utils.host_memory.keep_freed_memory`: XLA:CPU's per-run temporary buffer is reused instead
of page-faulted afresh (Linux/glibc), checked by counting the minor page faults of a repeated run
in fresh processes with and without it."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

# A jitted function whose temporaries (two 64 MB float32 intermediates, the operands of a product with a
# 64 x 64 result: 2 GFLOP a run) exceed what a glibc thread arena holds (64 MB), so without the setting
# each run maps and faults them anew.
PROGRAM = r"""
import json, resource, sys
from ovseg_jax.utils.host_memory import keep_freed_memory
applied = keep_freed_memory()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: (jnp.sin(x).reshape(64, -1) @ jnp.cos(x).reshape(-1, 64)).sum())
x = jnp.ones((4096, 4096), jnp.float32)
faults = []
for _ in range(int(sys.argv[1])):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""
TEMP_PAGES = 2 * 4096 * 4096 * 4 // 4096


def run_program(keep: bool, runs: int) -> dict:
    env = {**os.environ, "OVSEG_KEEP_FREED_MEMORY": "1" if keep else "0", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", PROGRAM, str(runs)], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # a program run 3 and 12 times in two fresh processes
@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_a_repeated_run_reuses_its_buffers_instead_of_faulting_them_afresh():
    default, kept = run_program(keep=False, runs=3), run_program(keep=True, runs=12)
    assert not default["applied"] and kept["applied"]
    # By default glibc maps and unmaps the temporaries in every run. Kept, runs reuse freed blocks and
    # fault nothing, except when a run allocates before the previous one has freed its temporaries
    # (asynchronous dispatch) and the heap grows by a block: in the first runs only, as it settles.
    assert min(default["faults"][1:]) >= TEMP_PAGES // 2, default
    assert min(kept["faults"][1:]) < TEMP_PAGES // 20, kept
