"""Issue 25: training never applies, saves or names as good a non-finite state, never hangs on
simulated CPU devices with the compilation cache, validates configs on every entry, and answers
mistyped overrides and odd inputs in one line."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from ovseg_jax import configs
from ovseg_jax.clip import Clip
from ovseg_jax.configs import ConfigError
from ovseg_jax.data import pipeline, synthetic
from ovseg_jax.inference.inputs import InputError, parse_class_names
from ovseg_jax.models.clip import CLIP
from ovseg_jax.training import tasks
from ovseg_jax.training.checkpoint import Checkpointer, load_params
from ovseg_jax.training.trainer import SIMULATED_DEVICES_XLA_FLAG, NonFiniteLossError, Trainer, make_data
from tests.train_helpers import TINY_CLIP, PairBatches, tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _finite(tree) -> bool:
    """Every floating-point leaf (numpy or jax, bfloat16 included) is finite."""
    leaves = [np.asarray(x) for x in jax.tree.leaves(tree)]
    return all(np.isfinite(x.astype(np.float32)).all() for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact))


# -- 1. a diverging update ----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_overflowing_update_is_never_applied_saved_or_named_good(tmp_path, dtype):
    """The issue's scenario: a rate of 1e39 (infinite in float32) at step 3, with a finite loss and
    finite gradients there. The step is not applied, nothing after step 2 is saved, the
    error names step 2 as the last good checkpoint, which is finite, a non-finite checkpoint (as
    saved before) is refused on resume, and a rerun at a sane rate resumes from step 2 and finishes."""
    sane = tiny_config("ft", total_steps=3, lr=1e-3)
    sane.dtype = dtype
    sane.checkpoint.interval = 2
    trainer = Trainer(sane, tmp_path)
    assert trainer.fit(PairBatches(8), num_steps=2) == "done"

    diverging = ml_collections.ConfigDict(sane.to_dict())
    diverging.optim.lr = 1e39
    diverging.allow_config_change = True
    bad = Trainer(diverging, tmp_path)
    with pytest.raises(NonFiniteLossError) as error:
        bad.fit(PairBatches(8))
    message = str(error.value)
    assert "at step 3" in message and f"the last good checkpoint is step 2 in {tmp_path / 'checkpoints'}" in message
    assert "learning rate inf" in message  # the loss and gradient norm were finite: the update was not
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == 2
    assert _finite(load_params(tmp_path, step=2)) and _finite(bad.state)
    assert int(bad.state["step"]) == 2  # the step was not applied

    # A non-finite checkpoint (as the trainer used to save) is refused on resume, naming it.
    nan_params = {path: np.full(v.shape, np.nan, v.dtype) for path, v in load_params(tmp_path, step=2).items()}
    trainer.checkpointer.save(3, nan_params, {k: v for k, v in trainer.state.items() if k != "params"})
    trainer.checkpointer.wait()
    with pytest.raises(NonFiniteLossError, match=re.escape(f"checkpoint step 3 in {tmp_path / 'checkpoints'} "
                                                           "holds non-finite parameters")):
        trainer.fit(PairBatches(8))
    trainer.checkpointer.manager.delete(3)

    assert trainer.fit(PairBatches(8)) == "done"  # the rerun at the sane rate resumes at step 2
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == 3
    assert _finite(load_params(tmp_path)) and _finite(trainer.state)


# -- 2. simulated devices and the compilation cache ----------------------------------------------

# The synthetic world's CLIP vision tower at batch 64 (smaller towers did not deadlock reliably).
SIMULATED_DEVICES_CONFIG = '''
import ml_collections
from ovseg_jax import configs
from tests.train_helpers import TINY_CLIP


def get_config():
    clip = TINY_CLIP.replace(embed_dim=64, patch_size=4, vision_width=96, vision_layers=3, vision_heads=3,
                             vision_mlp_dim=384)
    c = configs.mask_prompt_tuning(clip, depth=2, lr=0.05, total_steps=6, warmup_steps=2, batch_size=64)
    c.log_every = 2
    c.data = ml_collections.ConfigDict({"kind": "python", "factory": "tests.train_helpers:pair_batches"})
    return c
'''


@pytest.mark.slow
def test_two_simulated_devices_train_twice_with_the_compilation_cache(tmp_path):
    """`XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m ovseg_jax.train ... --compile_cache
    DIR` twice: the second run loads the steps from the cache (where XLA:CPU used to deadlock in
    the step's all-gathers and abort after 40 s) and finishes too."""
    config_file = tmp_path / "two_devices.py"
    config_file.write_text(SIMULATED_DEVICES_CONFIG)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    for run in ("first", "second"):
        proc = subprocess.run([sys.executable, "-m", "ovseg_jax.train", f"--config={config_file}",
                               f"--workdir={tmp_path / run}", f"--compile_cache={tmp_path / 'cache'}"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, f"{run} run:\n{proc.stderr[-3000:]}"
        assert f"added {SIMULATED_DEVICES_XLA_FLAG} to XLA_FLAGS" in proc.stderr and "training done" in proc.stderr
        assert Checkpointer(tmp_path / run / "checkpoints").latest_step() == 6


# -- 3. the Python API validates -----------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("world"), num_train=8, num_val=2, num_web=8, image_size=32)


def _recipe(world):
    """`configs.clip_finetune` with a data section of only its required fields, as a user writes it."""
    vocab = synthetic.tokenizer_size()
    config = configs.clip_finetune(TINY_CLIP.replace(vocab_size=vocab, eot_token_id=vocab - 1), total_steps=2,
                                   warmup_steps=1, batch_size=4)
    config.data = ml_collections.ConfigDict({"kind": "clip_pairs", "path": str(world / "pairs.jsonl"),
                                             "tokenizer": str(world / "tokenizer")})
    return config


def test_trainer_and_make_data_validate_and_fill_defaults_as_the_command_does(world):
    """From the Python API a recipe reads its data (the schema's defaults filled, as the command's
    validation fills them) and a mistyped data field is a ConfigError naming it, not an
    AttributeError later."""
    config = _recipe(world)
    batch = next(make_data(config, tasks.get("clip")))  # no Trainer, no command
    assert batch["image"].shape == (4, 32, 32, 3) and batch["token_ids"].shape == (4, 8)
    config = _recipe(world)
    Trainer(config)
    assert config.data.skip_bad_examples is False and config.data.num_workers == 0

    config = _recipe(world)
    config.data.skip_bad_exampels = True
    with pytest.raises(ConfigError, match=r"config.data.skip_bad_exampels: unknown field"):
        Trainer(config)


# -- 4. mistyped overrides -----------------------------------------------------------------------

def test_an_override_of_a_missing_field_is_one_line_naming_the_closest(tmp_path):
    """`--config.optim.schedule.total_steps=2` (a field that moved to `config.total_steps`) ends
    before anything runs, in one line naming the field, the hint and the closest fields."""
    config_file = tmp_path / "tiny.py"
    config_file.write_text("from tests.train_helpers import tiny_config\n\n\ndef get_config():\n"
                           "    return tiny_config('ft')\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "ovseg_jax.train", f"--config={config_file}",
                           f"--workdir={tmp_path / 'run'}", "--config.optim.schedule.total_steps=2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("FATAL Flags parsing error: --config.optim.schedule.total_steps: "
                               "config.optim.schedule has no field 'total_steps' (the schedule runs over "
                               "config.total_steps; set that instead); closest: config.total_steps, ")
    assert not (tmp_path / "run").exists()


def test_unknown_field_names_where_it_is_missing_and_close_fields():
    config = tiny_config("ft")
    assert configs.unknown_field(config, "optim.lr") is None
    assert configs.unknown_field(config, "optimm.lr").startswith("config has no field 'optimm'; closest: config.optim, ")
    assert configs.unknown_field(config, "checkpoint.max_keep").startswith(
        "config.checkpoint has no field 'max_keep'; closest: config.checkpoint.max_to_keep")
    assert configs.unknown_field(config, "optim.lr.x") == ("config.optim.lr is a value (float), not a section "
                                                           "with a field 'x'")


# -- 5. small input gaps -------------------------------------------------------------------------

def test_class_names_come_from_pipes_and_standard_input(tmp_path, monkeypatch):
    """`--classes-file <(...)` hands over a pipe as /dev/fd/N, `-` reads standard input; a directory
    or a missing file is one InputError naming it."""
    read_end, write_end = os.pipe()
    os.write(write_end, b"sky\n\nred car\n")
    os.close(write_end)
    try:
        assert parse_class_names(classes_file=f"/dev/fd/{read_end}") == ["sky", "red car"]
    finally:
        os.close(read_end)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("tree\n road \n".encode())))
    assert parse_class_names(classes_file="-") == ["tree", "road"]
    with pytest.raises(InputError, match=re.escape(f"classes file {tmp_path}: a directory")):
        parse_class_names(classes_file=tmp_path)
    with pytest.raises(InputError, match="nope.txt: no such file"):
        parse_class_names(classes_file=tmp_path / "nope.txt")


def test_binary_captions_and_empty_class_lists_are_clear_errors(tmp_path):
    (tmp_path / "captions.jsonl").write_bytes(b'{"image": "a.png", "caption": "x"}\n\xff\xfe binary')
    with pytest.raises(ValueError, match=r"captions.jsonl: not a text file \(.*can't decode byte 0xff.*, line 2\)"):
        pipeline.read_captions(tmp_path / "captions.jsonl")
    with pytest.raises(ValueError, match="at least one class name"):
        Clip(CLIP(TINY_CLIP, rngs=nnx.Rngs(0))).class_embeddings([])
