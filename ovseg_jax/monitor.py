"""Training metrics: console + TensorBoard scalars and a progress meter (steps/s, examples/s, ETA).

clu 0.0.12's `metric_writers` (and `periodic_actions`, which imports it) cannot be imported
without TensorFlow, so the TensorBoard event files are written with the `tensorboard` package's
own event writer; the console format follows clu's `LoggingWriter`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Mapping

import jax

log = logging.getLogger("ovseg_jax.train")


class MetricWriter:
    """Scalars to the log (every process 0 call) and to TensorBoard under `logdir` (if given)."""

    def __init__(self, logdir: str | Path | None = None):
        self._tb = None
        if logdir is not None and jax.process_index() == 0:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter  # noqa: PLC0415

            Path(logdir).mkdir(parents=True, exist_ok=True)
            self._tb = EventFileWriter(str(logdir))

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if jax.process_index() != 0:
            return
        log.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in sorted(scalars.items())))
        if self._tb is not None:
            from tensorboard.compat.proto.event_pb2 import Event  # noqa: PLC0415
            from tensorboard.compat.proto.summary_pb2 import Summary  # noqa: PLC0415

            values = [Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
            self._tb.add_event(Event(wall_time=time.time(), step=int(step), summary=Summary(value=values)))

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class Progress:
    """Throughput since the previous report, and the ETA to `total_steps`."""

    def __init__(self, total_steps: int, global_batch_size: int, start_step: int):
        self.total_steps = total_steps
        self.batch = global_batch_size
        self._step, self._time = start_step, time.perf_counter()

    def report(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        dt = max(now - self._time, 1e-9)
        rate = (step - self._step) / dt
        self._step, self._time = step, now
        eta = (self.total_steps - step) / rate if rate > 0 else float("inf")
        return {"steps_per_sec": rate, "examples_per_sec": rate * self.batch, "eta_min": eta / 60}
