"""clu in the trainer: metric collections (averages of the step values; a confusion matrix merged
across shards), the parameter table with trained/frozen marks, ReportProgress's line, the
TensorFlow-free TensorBoard writer behind clu's MetricWriter interface."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from ovseg_jax.training import monitor
from ovseg_jax.training.trainer import Trainer
from tests.train_helpers import PairBatches, tiny_config

ROOT = Path(__file__).resolve().parents[1]

TWO_DEVICES = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from ovseg_jax.training.metrics import ConfusionMatrix, train_collection

    assert jax.device_count() == 2
    mesh = jax.make_mesh((2,), ("data",))
    rows = NamedSharding(mesh, P("data"))
    rng = np.random.default_rng(0)

    # 1. Average over steps of a loss computed on a batch split over the 2 devices.
    Metrics = train_collection(["loss", "learning_rate"])
    step = jax.jit(lambda x, lr: Metrics.single_from_model_output(loss=jnp.mean(x ** 2), learning_rate=lr))
    merge = jax.jit(lambda a, b: a.merge(b))
    total, per_step = None, []
    for i in range(5):
        x = rng.normal(size=(8, 3)).astype(np.float32)
        per_step.append(np.mean(x.astype(np.float64) ** 2))
        update = step(jax.device_put(x, rows), jnp.float32(0.1 * i))
        total = update if total is None else merge(total, update)
    out = jax.device_get(total.compute())
    np.testing.assert_allclose(out["loss"], np.mean(per_step), rtol=1e-5)
    np.testing.assert_allclose(out["learning_rate"], 0.4, rtol=1e-6)

    # ... and per shard inside shard_map, gathered over the axis: the same means.
    def body(x):
        return Metrics.gather_from_model_output(axis_name="data", loss=jnp.mean(x ** 2), learning_rate=jnp.float32(0))
    x = rng.normal(size=(8, 3)).astype(np.float32)
    gathered = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("data"), out_specs=P(), check_vma=False))(jax.device_put(x, rows))
    np.testing.assert_allclose(gathered.compute()["loss"], np.mean(x.astype(np.float64) ** 2), rtol=1e-5)

    # 2. Confusion matrix: shards merged == one numpy matrix over everything (ignore and
    #    out-of-range labels excluded), and merged over batches on the host in int64.
    C, IGNORE = 5, 255
    Confusion = ConfusionMatrix.of(C, IGNORE)

    def numpy_confusion(pred, label):
        keep = (label != IGNORE) & (label >= 0) & (label < C)
        counts = np.zeros((C, C), np.int64)
        np.add.at(counts, (pred[keep], label[keep]), 1)
        return counts

    total, preds, labels = Confusion.empty(), [], []
    shard = jax.jit(jax.shard_map(lambda p, l: jax.lax.all_gather(Confusion.from_model_output(p, l), "data").reduce(),
                                  mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P(), check_vma=False))
    for _ in range(3):
        pred = rng.integers(0, C, (4, 6, 7)).astype(np.int32)
        label = rng.integers(0, C, (4, 6, 7)).astype(np.int32)
        label[:, 0] = IGNORE
        label[0, 1, :2] = C + 3
        per_shard = shard(jax.device_put(pred, rows), jax.device_put(label, rows))
        assert np.array_equal(np.asarray(per_shard.counts), numpy_confusion(pred, label))
        global_view = jax.jit(Confusion.from_model_output)(jax.device_put(pred, rows), jax.device_put(label, rows))
        assert np.array_equal(np.asarray(global_view.counts), numpy_confusion(pred, label))
        total = total.merge(per_shard)
        preds.append(pred), labels.append(label)
    expected = numpy_confusion(np.concatenate(preds), np.concatenate(labels))
    assert total.counts.dtype == np.int64 and np.array_equal(total.counts, expected)
    print("COMPUTED", total.compute())
    print("TWO DEVICES OK")
''')


@pytest.mark.slow
def test_collections_over_two_devices_equal_numpy():
    flags = "--xla_force_host_platform_device_count=2 --xla_cpu_enable_concurrency_optimized_scheduler=false"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}"}  # the session's flags kept
    proc = subprocess.run([sys.executable, "-c", TWO_DEVICES], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TWO DEVICES OK" in proc.stdout
    assert "'mIoU'" in proc.stdout and "'IoU'" not in proc.stdout  # scalars only, for writers


class _Recorder(monitor.metric_writers.MetricWriter):
    """Keeps what the trainer writes."""

    def __init__(self):
        self.scalars: dict[int, dict[str, float]] = {}

    def write_scalars(self, step, scalars):
        self.scalars.setdefault(step, {}).update({k: float(v) for k, v in scalars.items()})

    def write_summaries(self, *a, **k): ...
    def write_images(self, *a, **k): ...
    def write_videos(self, *a, **k): ...
    def write_audios(self, *a, **k): ...
    def write_texts(self, *a, **k): ...
    def write_histograms(self, *a, **k): ...
    def write_hparams(self, *a, **k): ...
    def flush(self): ...
    def close(self): ...


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def mpt_run():
    """Mask prompt tuning (only `visual/mask_embedding` trains), 4 steps, reports every 2 steps;
    the log lines, what the writer got and each step's own metrics."""
    handler, loggers = _Lines(), [logging.getLogger("ovseg_jax.train"), logging.getLogger("absl")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    try:
        config = tiny_config("mpt", total_steps=4)
        config.log_every = 2
        trainer = Trainer(config)
        steps = []
        compiled = trainer.train_step

        def recording_step(state, batch):
            state, metrics = compiled(state, batch)
            steps.append(jax.device_get(metrics))
            return state, metrics

        trainer.train_step = recording_step
        writer = _Recorder()
        assert trainer.fit(PairBatches(8), writer=writer) == "done"
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)
    return handler.lines, writer.scalars, steps


def test_reported_metrics_are_means_over_the_steps_since_the_last_report(mpt_run):
    _, scalars, steps = mpt_run
    assert sorted(scalars) == [2, 4]
    for report, window in ((2, steps[0:2]), (4, steps[2:4])):
        for name in ("loss", "grad_norm"):
            np.testing.assert_allclose(scalars[report][name], np.mean([float(s[name]) for s in window]), rtol=1e-6)
        assert scalars[report]["learning_rate"] == pytest.approx(float(window[-1]["learning_rate"]))
        assert scalars[report]["steps_per_sec"] > 0  # clu's ReportProgress, through the same writer


def test_parameter_table_marks_trained_and_frozen(mpt_run):
    lines, _, _ = mpt_run
    (table,) = [line for line in lines if line.startswith("parameters:")]
    rows = {cells[1].strip(): cells[5].strip() for cells in (r.split("|") for r in table.splitlines()) if len(cells) > 6}
    assert rows.pop("Name") == "Train"
    assert rows.pop("visual/mask_embedding") == "trained"
    assert rows and set(rows.values()) == {"frozen"}
    assert "trained" in table.splitlines()[-1] and "frozen" in table.splitlines()[-1]


def test_progress_line_with_eta(mpt_run):
    lines, _, _ = mpt_run
    progress = [line for line in lines if "steps/s" in line and "ETA" in line]
    assert any("(2/4)" in line for line in progress) and any("(4/4)" in line for line in progress)


def test_tensorboard_writer_without_tensorflow(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert "tensorflow" not in sys.modules
    writer = monitor.create_writer(tmp_path)
    assert isinstance(writer, monitor.metric_writers.MetricWriter)
    writer.write_scalars(3, {"loss": np.float32(0.25), "acc": 0.5})
    writer.write_hparams({"optim.lr": 1e-3, "mesh": [("data", -1)]})
    writer.write_texts(3, {"note": "hello"})
    writer.write_images(3, {"picture": np.zeros((4, 5, 3), np.uint8)})
    writer.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(3, 0.25)]
    assert "_hparams_/session_start_info" in events.Tags()["tensors"] and "note" in events.Tags()["tensors"]
    (image,) = events.Images("picture")
    assert (image.width, image.height) == (5, 4)
    with pytest.raises(ImportError, match="TensorBoardWriter"):
        monitor.metric_writers.SummaryWriter(str(tmp_path))


def test_log_filter_drops_orbax_chatter_only():
    import logging  # noqa: PLC0415

    from ovseg_jax.training.monitor import DropInfoFrom  # noqa: PLC0415

    keep = DropInfoFrom("/orbax/").filter

    def record(path, level, msg):
        return logging.LogRecord("absl", level, path, 1, msg, (), None)

    orbax = "/site-packages/orbax/checkpoint/_src/metadata/checkpoint.py"
    assert not keep(record(orbax, logging.INFO, "Saving checkpoint"))
    assert not keep(record(orbax, logging.WARNING, "Metadata file does not exist: %s"))
    assert keep(record(orbax, logging.WARNING, "Checkpoint step 3 is corrupt"))
    assert keep(record(orbax, logging.ERROR, "Metadata file does not exist: %s"))
    assert keep(record("/site-packages/clu/periodic_actions.py", logging.INFO, "Setting work unit notes"))
