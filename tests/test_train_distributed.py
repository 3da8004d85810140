"""Sharded training: 8 simulated CPU devices (FSDP + a model axis) and 2 processes over loopback
both end with the parameters of a plain single-device run on the same global batches."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from ovseg_jax.training.trainer import Trainer
from tests.train_helpers import PairBatches, assert_adam_runs_match, tiny_config

pytestmark = pytest.mark.slow  # training in subprocesses (make test-fast leaves them out)

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
LR = tiny_config("ft").optim.lr  # the peak learning rate of every run here


@pytest.fixture(scope="module")
def single_device_params():
    trainer = Trainer(tiny_config("ft", total_steps=6))
    before = jax.device_get(trainer.state["params"])
    trainer.fit(PairBatches(8), num_steps=STEPS)
    return before, jax.device_get(trainer.state["params"])


def _env(devices: int, **extra) -> dict:
    """The session's environment (its XLA_FLAGS kept: tests/conftest.py) with `devices` CPU devices."""
    flags = f"--xla_force_host_platform_device_count={devices} --xla_cpu_enable_concurrency_optimized_scheduler=false"
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
            "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}", **extra}


def _run(args, env):
    return subprocess.Popen([sys.executable, "-m", "tests.train_worker", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _assert_params_match(out_file, reference):
    """Same parameters up to float reduction order: the total update agrees to 3e-3 relative, the
    elements as `assert_adam_runs_match` says (those with a ~0 gradient barely touch the norm)."""
    before, expected = reference
    got = {k.replace("|", "/"): v for k, v in np.load(out_file).items()}
    assert sorted(got) == sorted(expected)
    delta_got = np.concatenate([(got[p] - before[p]).ravel() for p in sorted(expected)])
    delta_exp = np.concatenate([(expected[p] - before[p]).ravel() for p in sorted(expected)])
    assert np.linalg.norm(delta_exp) > 0
    assert np.linalg.norm(delta_got - delta_exp) <= 3e-3 * np.linalg.norm(delta_exp)
    assert_adam_runs_match(got, expected, lr=LR, steps=STEPS)


def test_eight_devices_fsdp_and_model_axis(tmp_path, single_device_params):
    out = tmp_path / "params.npz"
    proc = _run(["fit", out, "--steps", STEPS, "--mesh", "4,2", "--sharding", "fsdp"], _env(8))
    stdout, stderr = proc.communicate(timeout=170)
    assert proc.returncode == 0, stderr[-3000:]
    assert "result done step 3" in stdout
    _assert_params_match(out, single_device_params)


def test_two_processes_equal_single_process(tmp_path, single_device_params):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "params.npz"
    procs = [_run(["fit", out, "--steps", STEPS], _env(2, OVSEG_COORDINATOR=f"127.0.0.1:{port}",
                                                       OVSEG_NUM_PROCESSES="2", OVSEG_PROCESS_ID=str(i)))
             for i in range(2)]
    results = [p.communicate(timeout=170) for p in procs]
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr[-3000:]
        assert "result done step 3" in stdout
    _assert_params_match(out, single_device_params)
