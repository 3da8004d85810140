"""Training logs through clu's `metric_writers` interface: `create_writer(logdir)` ->
a `clu.metric_writers.MetricWriter` that writes to the log (clu's `LoggingWriter`) and to
TensorBoard event files (`TensorBoardWriter`).

clu 0.0.12's `metric_writers` package imports its TensorFlow `SummaryWriter` at import time, and
`periodic_actions` imports `metric_writers`. Without TensorFlow installed, `import_clu_writers()`
first registers a stand-in for that one module (its `SummaryWriter` raises, naming
`TensorBoardWriter`), so the rest of clu (interface, `LoggingWriter`, `MultiWriter`,
`AsyncWriter`, `periodic_actions`) imports and works. `TensorBoardWriter` writes the event files
with the `tensorboard` package's own event writer and summary protos, which need no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import logging
import sys
import time
import types
from pathlib import Path
from typing import Any, Iterable, Mapping

import jax
import numpy as np

log = logging.getLogger("ovseg_jax.train")


def import_clu_writers() -> types.ModuleType:
    """`clu.metric_writers`, importable with or without TensorFlow (see the module docstring)."""
    name = "clu.metric_writers.summary_writer"
    if name not in sys.modules and importlib.util.find_spec("tensorflow") is None:
        stand_in = types.ModuleType(name, "Stand-in: clu's SummaryWriter needs TensorFlow.")

        class SummaryWriter:  # noqa: D101  (what `clu.metric_writers.SummaryWriter` is without TensorFlow)
            def __init__(self, *args, **kwargs):
                raise ImportError("clu.metric_writers.SummaryWriter needs TensorFlow, which is not installed; "
                                  "use ovseg_jax.training.monitor.TensorBoardWriter (or create_writer) instead")

        stand_in.SummaryWriter = SummaryWriter
        sys.modules[name] = stand_in
    from clu import metric_writers  # noqa: PLC0415

    return metric_writers


metric_writers = import_clu_writers()
from clu import parameter_overview, periodic_actions  # noqa: E402  (periodic_actions imports metric_writers)


def _scalar(value: Any) -> float:
    return float(np.asarray(value))


class TensorBoardWriter(metric_writers.MetricWriter):
    """TensorBoard event files in `logdir` without TensorFlow (process 0 writes; others do nothing).

    Scalars, hparams (the HParams plugin's session summary), texts, histograms, images (PNG) and
    raw tensor summaries are written; videos and audios are not supported by this writer and only
    their shapes are logged (as clu's `LoggingWriter` does for videos)."""

    def __init__(self, logdir: str | Path):
        self._events = None
        if jax.process_index() == 0:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter  # noqa: PLC0415

            Path(logdir).mkdir(parents=True, exist_ok=True)
            self._events = EventFileWriter(str(logdir))

    def _write(self, step: int | None, values: list) -> None:
        if self._events is None or not values:
            return
        from tensorboard.compat.proto.event_pb2 import Event  # noqa: PLC0415
        from tensorboard.compat.proto.summary_pb2 import Summary  # noqa: PLC0415

        event = Event(wall_time=time.time(), summary=Summary(value=values))
        if step is not None:
            event.step = int(step)
        self._events.add_event(event)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary  # noqa: PLC0415

        self._write(step, [Summary.Value(tag=k, simple_value=_scalar(v)) for k, v in scalars.items()])

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        from tensorboard.plugins.hparams import summary_v2  # noqa: PLC0415

        clean = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in hparams.items()}
        self._write(None, list(summary_v2.hparams_pb(clean).value))

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        from tensorboard.plugins.text import summary_v2  # noqa: PLC0415

        self._write(step, [v for k, t in texts.items() for v in summary_v2.text_pb(k, t).value])

    def write_histograms(self, step: int, arrays: Mapping[str, Any],
                         num_buckets: Mapping[str, int] | None = None) -> None:
        from tensorboard.plugins.histogram import summary_v2  # noqa: PLC0415

        values = []
        for k, a in arrays.items():
            buckets = (num_buckets or {}).get(k, summary_v2.DEFAULT_BUCKET_COUNT)
            values += summary_v2.histogram_pb(k, np.asarray(a, np.float64), buckets=buckets).value
        self._write(step, values)

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        """`[N, H, W, C]` or `[H, W, C]`, uint8 or float in [0, 1]; C = 1 or 3."""
        from PIL import Image  # noqa: PLC0415
        from tensorboard.compat.proto.summary_pb2 import Summary  # noqa: PLC0415

        values = []
        for k, batch in images.items():
            batch = np.asarray(batch)
            batch = batch[None] if batch.ndim == 3 else batch
            if batch.dtype != np.uint8:
                batch = np.clip(np.rint(batch * 255.0), 0, 255).astype(np.uint8)
            for i, image in enumerate(batch):
                png = io.BytesIO()
                Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(png, format="PNG")
                encoded = Summary.Image(height=image.shape[0], width=image.shape[1], colorspace=image.shape[-1],
                                        encoded_image_string=png.getvalue())
                values.append(Summary.Value(tag=k if len(batch) == 1 else f"{k}/{i}", image=encoded))
        self._write(step, values)

    def write_summaries(self, step: int, values: Mapping[str, Any], metadata: Mapping[str, Any] | None = None) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata  # noqa: PLC0415
        from tensorboard.util import tensor_util  # noqa: PLC0415

        out = []
        for k, v in values.items():
            meta = (metadata or {}).get(k)
            if isinstance(meta, bytes):
                meta = SummaryMetadata.FromString(meta)
            out.append(Summary.Value(tag=k, tensor=tensor_util.make_tensor_proto(np.asarray(v)), metadata=meta))
        self._write(step, out)

    def write_videos(self, step: int, videos: Mapping[str, Any]) -> None:
        log.warning("[%d] videos are not written to TensorBoard (shapes: %s)", step,
                    {k: np.shape(v) for k, v in videos.items()})

    def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int) -> None:
        log.warning("[%d] audios are not written to TensorBoard (shapes: %s, %d Hz)", step,
                    {k: np.shape(v) for k, v in audios.items()}, sample_rate)

    def flush(self) -> None:
        if self._events is not None:
            self._events.flush()

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None


def create_writer(logdir: str | Path | None = None) -> metric_writers.MetricWriter:
    """The trainer's writer, as clu's `create_default_writer` but synchronous and TensorFlow-free:
    clu's `LoggingWriter` (absl INFO lines `[step] k=v, ...`) plus, on process 0 when `logdir` is
    given, TensorBoard events there."""
    writers = [metric_writers.LoggingWriter()]
    if logdir is not None and jax.process_index() == 0:
        writers.append(TensorBoardWriter(logdir))
    return metric_writers.MultiWriter(writers)


class DropInfoFrom(logging.Filter):
    """A logging filter that drops records below WARNING from modules whose path contains one of
    `parts` (orbax's per-save INFO lines), keeping everyone else's INFO (clu's progress notes), and
    from those modules also the known-harmless warnings in `HARMLESS`."""

    # orbax warns on every restore of a composite checkpoint's item, whose metadata lives one level up
    HARMLESS = ("Metadata file does not exist",)

    def __init__(self, *parts: str):
        super().__init__()
        self.parts = parts

    def filter(self, record: logging.LogRecord) -> bool:
        if not any(p in record.pathname for p in self.parts):
            return True
        if record.levelno < logging.WARNING:
            return False
        return record.levelno > logging.WARNING or not str(record.msg).startswith(self.HARMLESS)


@dataclasses.dataclass
class ParamRow:
    """One row of the parameter table."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    size: int
    train: str  # "trained" / "frozen"


def parameter_table(params: Mapping[str, Any], trained: Iterable[str]) -> str:
    """clu's parameter table of flat `{path: array}` with a column marking each tensor trained or
    frozen (by the optimiser's freeze rules), and the totals."""
    trained = set(trained)
    rows = [ParamRow(p, tuple(v.shape), str(v.dtype), int(np.prod(v.shape)), "trained" if p in trained else "frozen")
            for p, v in sorted(params.items())]
    total = sum(r.size for r in rows)
    learnt = sum(r.size for r in rows if r.train == "trained")
    return (parameter_overview.make_table(rows) +
            f"\nTotal: {total:,} parameters, {learnt:,} trained, {total - learnt:,} frozen")
