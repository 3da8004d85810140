"""Configs that are wrong stop at start; no bad state is ever saved; failures lose no progress."""

from __future__ import annotations

import logging
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ovseg_jax import configs
from ovseg_jax.configs import ConfigError
from ovseg_jax.training import optim, sharding
from ovseg_jax.training.checkpoint import Checkpointer, load_params
from ovseg_jax.training.tasks import clip_contrastive
from ovseg_jax.training.trainer import NonFiniteLossError, Trainer, run
from tests.train_helpers import PairBatches, tiny_config

PYTHON_DATA = {"kind": "python", "factory": "tests.train_helpers:pair_batches"}


def python_config(**kw):
    c = tiny_config("ft", **kw)
    c.data = ml_collections.ConfigDict(PYTHON_DATA)
    return c


# ------------------------------------------------------------------------- configs stop at start

def test_schedule_runs_over_config_total_steps():
    """`--config.total_steps` alone sets the schedule's length (open_clip's cosine, written here)."""
    config = tiny_config("ft", total_steps=6, lr=1e-3)
    config.total_steps = 20
    trainer = Trainer(config)
    for step in (0, 1, 2, 10, 19):
        warm, total, base = 2, 20, 1e-3
        expected = base * (step + 1) / warm if step < warm else \
            0.5 * (1 + np.cos(np.pi * (step - warm) / (total - warm))) * base
        np.testing.assert_allclose(float(trainer.schedule(step)), expected, rtol=1e-5, atol=1e-12)


def test_stale_schedule_total_steps_is_rejected():
    config = tiny_config("ft")
    with config.unlocked():
        config.optim.schedule.total_steps = 6
    with pytest.raises(ConfigError, match=r"optim\.schedule\.total_steps: unknown field.*config\.total_steps"):
        configs.validate(config, data=False)


@pytest.mark.parametrize("field, value, expected", [
    ("log_every", 0, r"config\.log_every=0: must be > 0"),
    ("total_steps", -1, r"config\.total_steps=-1: must be > 0"),
    ("dtype", "float16", r"config\.dtype='float16': must be one of"),
])
def test_bad_values_stop_before_anything_is_built(tmp_path, field, value, expected):
    config = python_config()
    config[field] = value
    with pytest.raises(ConfigError, match=expected):
        run(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_fields_the_code_reads_can_be_set_on_a_locked_config():
    """As `--config.data.skip_bad_examples=true` does on a recipe (a locked config)."""
    config = tiny_config("ft")
    config.data = configs.clip_pairs_data("pairs.csv")
    seg = configs.segmentation_data("coco_stuff_171", "datasets", crop_size=64, short_sides=(64,), max_size=128)
    for c in (config, seg):
        c.lock()
    config.data.skip_bad_examples = True
    config.checkpoint.async_save = False
    config.allow_config_change = True
    config.optim.trainable = (r"^visual/",)
    seg.skip_bad_examples, seg.photometric, seg.flip, seg.split = True, False, False, "val"
    configs.validate(config)
    assert config.data.skip_bad_examples and config.optim.trainable == (r"^visual/",)


def test_unknown_missing_and_mistyped_fields_are_listed_together():
    config = tiny_config("ft")
    config.data = ml_collections.ConfigDict({"kind": "clip_pairs", "path": "p.csv", "num_wrokers": 2,
                                             "num_workers": "2"})
    with config.unlocked():
        del config.batch_size
    with pytest.raises(ConfigError) as e:
        configs.validate(config)
    message = str(e.value)
    for expected in ["config.data.num_wrokers: unknown field", "config.batch_size is required",
                     "config.data.num_workers='2': expected int"]:
        assert expected in message, message


def test_validation_fills_declared_defaults_into_hand_written_sections():
    config = tiny_config("ft")
    config.data = ml_collections.ConfigDict({"kind": "clip_pairs", "path": "p.csv", "tokenizer": "t"})
    configs.validate(config)
    assert config.data.skip_bad_examples is False and config.data.num_workers == 0


@pytest.mark.parametrize("table, rule", [("freeze", r"^text/"), ("trainable", r"^visual/prompt$"),
                                         ("lr_mults", (r"^backbone/", 0.1)), ("wd_mults", (r"norm/scale$", 0.0))])
def test_optimizer_rule_matching_no_parameter_is_an_error(table, rule):
    config = tiny_config("ft")
    config.optim[table] = (*config.optim[table], rule) if config.optim[table] else (rule,)
    pattern = rule if isinstance(rule, str) else rule[0]
    with pytest.raises(ConfigError, match=re.escape(f"config.optim.{table}: rule {pattern!r} matches no parameter")):
        Trainer(config)


def test_sharding_rule_matching_no_parameter_is_an_error():
    mesh = sharding.make_mesh([("data", -1)])
    with pytest.raises(ConfigError, match=r"config\.sharding\.rules: rule 'c_fc/kernal'"):
        sharding.param_specs({"mlp/c_fc/kernel": (4, 4)}, [("c_fc/kernal", (None, None))], mesh)


def test_table_assignment_is_logged_once_per_parameter(caplog):
    with caplog.at_level(logging.DEBUG, logger="ovseg_jax.train"):  # rule matches are DEBUG lines
        trainer = Trainer(tiny_config("ft"))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("optim.wd_mults: ")]
    expected = {p for p in trainer.param_tree.paths if p.endswith(("ln_1/scale", "/bias", "logit_scale"))}
    logged = {line.split(": ", 1)[1].split(" <- ")[0] for line in lines}
    assert expected <= logged and len(lines) == len(logged)
    assert any(line.startswith("optim.freeze: token_embedding/embedding <- ") for line in
               (r.getMessage() for r in caplog.records))


# ---------------------------------------------------------------------------------- resuming

@pytest.mark.slow
def test_resume_with_a_different_config_is_refused_unless_allowed(tmp_path):
    workdir = tmp_path / "run"
    assert run(python_config(total_steps=2), workdir) == "done"
    events = sorted((workdir / "tensorboard").iterdir())
    changed = python_config(total_steps=4, lr=2e-3)
    changed.batch_size = 4
    with pytest.raises(ConfigError, match=r"(?s)different config.*batch_size: 8 -> 4.*optim\.lr: 0\.001 -> 0\.002"
                                          r".*total_steps: 2 -> 4.*allow_config_change"):
        run(changed, workdir)
    assert sorted((workdir / "tensorboard").iterdir()) == events  # nothing written into the run's logs
    relaxed = python_config(total_steps=4, lr=2e-3)
    relaxed.log_every = 2  # logging fields may change freely
    relaxed.allow_config_change = True
    assert run(relaxed, workdir) == "done"
    assert Checkpointer(workdir / "checkpoints").latest_step() == 4


@pytest.mark.slow
def test_resuming_a_stateless_python_iterator_warns_that_data_restarts(tmp_path, caplog):
    def stateless():
        batches = PairBatches(8)
        while True:
            yield next(batches)

    config = tiny_config("ft", total_steps=4)
    first = Trainer(config, workdir=tmp_path)
    first.fit(stateless(), num_steps=2)
    first.close()
    second = Trainer(config, workdir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="ovseg_jax.train"):
        second.fit(stateless())
    second.close()
    assert any("no get_state/set_state" in r.getMessage() and "restarts from its beginning" in r.getMessage()
               for r in caplog.records)


# ------------------------------------------------------------------------ no bad state is saved

def _poisoned_loss(loss_fn):
    """The CLIP loss whose gradient is NaN (value unchanged) for batches with `poison` set: an
    overflow in the backward pass that the loss does not show."""
    @jax.custom_vjp
    def poison(x, flag):
        return x

    poison.defvjp(lambda x, flag: (x, flag), lambda flag, g: (jnp.where(flag > 0, jnp.nan, g), jnp.zeros_like(flag)))

    def loss(model, batch, rng):
        value, metrics = loss_fn(model, batch, rng)
        return poison(value, batch["poison"][0]), metrics

    return loss


class PoisonAt(PairBatches):
    """Pair batches whose step-`bad` batch has a NaN gradient (and a finite loss)."""

    def __init__(self, bad: int | None, *args, **kw):
        super().__init__(*args, **kw)
        self.bad = bad

    def __next__(self):
        batch = super().__next__()
        return {**batch, "poison": np.full(len(batch["image"]), float(self.position == self.bad), np.float32)}


@pytest.mark.slow
def test_a_nonfinite_step_changes_nothing_and_says_so(monkeypatch):
    monkeypatch.setattr(clip_contrastive, "loss", _poisoned_loss(clip_contrastive.loss))
    trainer = Trainer(tiny_config("ft"))
    before = jax.device_get(trainer.state)
    batch = {k: jnp.asarray(v) for k, v in next(PoisonAt(1, 8)).items()}
    state, metrics = trainer.train_step(trainer.state, batch)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["nonfinite"]) == 1.0
    jax.tree.map(np.testing.assert_array_equal, before, jax.device_get(state))  # step, params, Adam moments


@pytest.mark.slow
def test_nonfinite_update_is_never_saved_and_a_rerun_resumes_from_the_last_good_step(tmp_path, monkeypatch):
    monkeypatch.setattr(clip_contrastive, "loss", _poisoned_loss(clip_contrastive.loss))
    config = tiny_config("ft", total_steps=5)
    config.checkpoint.interval, config.checkpoint.max_to_keep = 1, 1
    trainer = Trainer(config, workdir=tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"gradient norm is nan at step 3; the step was not applied.*"
                                                 r"last good checkpoint is step 2.*allow_config_change"):
        trainer.fit(PoisonAt(3, 8))
    trainer.close()
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == 2
    assert all(np.isfinite(v).all() for v in load_params(tmp_path).values())

    config.optim.lr, config.allow_config_change = 1e-4, True  # a saner rerun of the same workdir
    rerun = Trainer(config, workdir=tmp_path)
    batches = PoisonAt(None, 8)
    assert rerun.fit(batches) == "done"
    rerun.close()
    assert batches.position == 5  # resumed after step 2's batch
    assert all(np.isfinite(v).all() for v in load_params(tmp_path).values())


@pytest.mark.slow
def test_huge_learning_rate_stops_with_a_finite_last_checkpoint(tmp_path):
    config = tiny_config("ft", total_steps=6, lr=1e6)
    config.checkpoint.interval, config.checkpoint.max_to_keep = 1, 1
    trainer = Trainer(config, workdir=tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"at step (\d); the step was not applied.*last good checkpoint "
                                                 r"is step") as e:
        trainer.fit(PairBatches(8))
    trainer.close()
    stopped = int(str(e.value).split(" at step ")[1].split(";")[0])
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == stopped - 1
    assert all(np.isfinite(v).all() for v in load_params(tmp_path).values())


@pytest.mark.slow
def test_an_evaluation_failure_loses_no_training_progress(tmp_path):
    config = tiny_config("ft", total_steps=4)
    config.checkpoint.interval, config.eval_every = 100, 2

    def evaluate(model, step):
        raise RuntimeError("evaluation data went missing")

    trainer = Trainer(config, workdir=tmp_path)
    with pytest.raises(RuntimeError, match="evaluation data went missing"):
        trainer.fit(PairBatches(8), evaluate=evaluate)
    trainer.close()
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == 2


# ------------------------------------------------------------------------------ CLIP tokenizer

def test_clip_tokenizer_may_come_from_a_transformers_init(tmp_path):
    from tests.clip_fixtures import build_checkpoint

    hf = build_checkpoint(tmp_path / "hf", seed=0)
    config = tiny_config("ft")
    config.init_from = str(hf)
    config.data = configs.clip_pairs_data(str(tmp_path / "pairs.csv"), tokenizer="")
    (tmp_path / "pairs.csv").write_text("filepath\ttitle\n")
    clip_contrastive.check_inputs(config)  # no tokenizer named: the directory's own is used
    assert clip_contrastive.tokenizer_path(config) == str(hf)
    config.init_from = ""
    with pytest.raises(FileNotFoundError, match=r"config\.data\.tokenizer is empty.*open_clip_torch"):
        clip_contrastive.check_inputs(config)
