"""Checkpoints: exact resume, atomic saves, preemption, and the non-finite-loss stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from ovseg_jax.training.checkpoint import Checkpointer, load_params
from ovseg_jax.training.trainer import NonFiniteLossError, Trainer
from tests.train_helpers import PairBatches, tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _worker(*args, **popen):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "tests.train_worker", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


@pytest.mark.slow
def test_resume_is_exact(tmp_path):
    """6 steps straight == 3 steps, a new process-like restart from the workdir, then 3 steps."""
    config = tiny_config("mpt", total_steps=6, lr=0.05)
    straight = Trainer(config)
    straight.fit(PairBatches(8))
    expected = jax.device_get(straight.state["params"])

    first = Trainer(config, workdir=tmp_path)
    assert first.fit(PairBatches(8), num_steps=3) == "done"
    first.close()
    second = Trainer(config, workdir=tmp_path)
    batches = PairBatches(8)  # restarts at position 0; the checkpoint moves it to 3
    second.fit(batches)
    assert batches.position == 6
    assert int(second.state["step"]) == 6
    resumed = jax.device_get(second.state["params"])
    second.close()
    assert sorted(resumed) == sorted(expected)
    for path in expected:
        assert expected[path].tobytes() == resumed[path].tobytes(), path
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == 6


@pytest.mark.slow
def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    class PoisonAt4(PairBatches):
        def __next__(self):
            batch = super().__next__()
            if self.position == 5:  # the batch of step 5
                batch["image"] = np.full_like(batch["image"], np.nan)
            return batch

    trainer = Trainer(tiny_config("ft", total_steps=6), workdir=tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 5.*last good checkpoint is step 3"):
        trainer.fit(PoisonAt4(8))
    trainer.close()
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == 3
    assert all(np.isfinite(v).all() for v in load_params(tmp_path).values())


@pytest.mark.slow
def test_process_killed_during_save_leaves_last_checkpoint_loadable(tmp_path):
    proc = _worker("kill_during_save", tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err
    assert "saving" in out
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "1"]
    assert leftovers and all("tmp" in name for name in leftovers), leftovers  # step 2 was unfinished
    ck = Checkpointer(tmp_path)
    assert ck.latest_step() == 1
    np.testing.assert_array_equal(load_params(tmp_path)["w"], np.ones((4, 4), np.float32))


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path):
    out_file = tmp_path / "params.npz"
    proc = _worker("fit", out_file, "--workdir", tmp_path / "run", "--total", 1000)
    for line in proc.stdout:
        if line.startswith("batch 3"):
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "result preempted" in out, out
    stopped = int(out.split("result preempted step ")[1].split()[0])
    assert 3 <= stopped < 1000
    assert Checkpointer(tmp_path / "run" / "checkpoints").latest_step() == stopped
    saved = load_params(tmp_path / "run")
    final = np.load(out_file)
    for path, value in saved.items():
        np.testing.assert_array_equal(value, final[path.replace("/", "|")])
