"""`python -m ovseg_jax.train`: config files with variants and overrides, stage hand-off, TensorBoard
logs, the persistent compilation cache on by default, and real configs failing early on missing inputs."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ovseg_jax.training.checkpoint import Checkpointer, load_config, load_params
from ovseg_jax.training.trainer import run

ROOT = Path(__file__).resolve().parents[1]

CONFIG = '''
import ml_collections
from tests.train_helpers import tiny_config


def get_config(arg="ft"):
    stages = arg.split("+")
    configs = {}
    for name in stages:
        c = tiny_config(name, total_steps=4, lr=0.05)
        c.data = ml_collections.ConfigDict({"kind": "python", "factory": "tests.train_helpers:pair_batches"})
        configs[name] = c
    if len(stages) == 1:
        return configs[stages[0]]
    configs["mpt"].init_from = "{workdir}/ft"
    return ml_collections.ConfigDict({"stages": stages, **configs})
'''


@pytest.mark.slow
def test_cli_runs_stages_with_overrides_and_hands_off(tmp_path):
    """One run of the command (a process of its own) checks what the command adds to `run`: the
    config file with a variant, overrides of both stages (stage ft scanned and rematerialised, as
    `--config.scan_layers` / `--config.remat` on a recipe), the hand-off to stage mpt, clu's
    progress lines, TensorBoard logs, and JAX's compilation cache in its default place."""
    config_file = tmp_path / "tiny.py"
    config_file.write_text(CONFIG)
    workdir = tmp_path / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    proc = subprocess.run([sys.executable, "-m", "ovseg_jax.train", f"--config={config_file}:ft+mpt",
                           f"--workdir={workdir}", "--config.ft.checkpoint.interval=2",
                           "--config.mpt.total_steps=3", "--config.ft.scan_layers=true", "--config.ft.remat=dots"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "steps_per_sec" in proc.stderr and "ETA:" in proc.stderr  # clu's ReportProgress
    cache = tmp_path / "xdg" / "ovseg_jax" / "jax_cache"  # compilation.default_cache_dir()
    assert f"compilation cache: {cache}" in proc.stderr
    assert any(cache.iterdir())  # at least the train steps (compiled in > 0.5 s) were stored
    assert Checkpointer(workdir / "ft" / "checkpoints").latest_step() == 4
    assert sorted(p.name for p in (workdir / "ft" / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    assert Checkpointer(workdir / "mpt" / "checkpoints").latest_step() == 3  # the override
    saved = load_config(workdir / "ft")
    assert saved["scan_layers"] is True and saved["remat"] == "dots"
    assert load_config(workdir / "mpt")["scan_layers"] is False  # an override of one stage only
    assert list((workdir / "ft" / "tensorboard").glob("events.out.tfevents.*"))
    ft, mpt = load_params(workdir / "ft"), load_params(workdir / "mpt")
    assert sorted(mpt) == sorted([*ft, "visual/mask_embedding"])  # scanned: the loop's parameter paths
    for path, value in ft.items():  # initialised from stage ft, then only the prompts train
        np.testing.assert_array_equal(mpt[path], value, err_msg=path)


def _load_config(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize("name, expected", [("vitl_ft", "weights/ViT-L-14.pt"), ("vitb_ft", "weights/ViT-B-16.pt"),
                                            ("vitl_mpt", "runs/vitl_ft"), ("vitb_mpt", "runs/vitb_ft")])
def test_real_configs_fail_early_naming_missing_files(tmp_path, monkeypatch, name, expected):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=expected):
        run(_load_config(name), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_real_config_names_missing_pairs_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = _load_config("vitl_ft")
    config.init_from = ""
    with pytest.raises(FileNotFoundError, match="coco_proposal_1cap.csv"):
        run(config, tmp_path / "run")
