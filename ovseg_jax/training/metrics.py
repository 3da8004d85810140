"""On-device metric accumulation with `clu.metrics`: the trainer's loss terms, and a confusion
matrix for segmentation evaluation whose final numbers come from `evaluation.metrics.segmentation_metrics`
(the original evaluator's math).

    Metrics = train_collection(["loss", "loss_ce", ...])      # a clu Collection class
    update = Metrics.single_from_model_output(**step_metrics)  # inside or outside jit
    total = update if total is None else total.merge(update)
    total.compute()                                            # {"loss": mean over the steps, ...}

Under `jit` with global arrays the step's metrics already cover every device and host (XLA does
the reduction); in a `shard_map`/`pmap` body, `Collection.gather_from_model_output(axis_name=...)`
merges the shards.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics

from ovseg_jax.evaluation.metrics import segmentation_metrics

LAST_VALUE = ("learning_rate",)  # reported as the window's last value, not its mean


def train_collection(names: Iterable[str]) -> type[clu_metrics.Collection]:
    """A clu `Collection` class over the scalar step metrics `names`: `Average` of the per-step values
    (`LastValue` for the learning rate)."""
    fields = {n: (clu_metrics.LastValue if n in LAST_VALUE else clu_metrics.Average).from_output(n)
              for n in sorted(names)}
    return clu_metrics.Collection.create(**fields)


@flax.struct.dataclass
class ConfusionMatrix(clu_metrics.Metric):
    """`counts` `[C, C]`, rows = prediction, columns = ground truth; labels equal to `ignore_value`
    or outside `[0, C)` are not counted. Per update the counts are int32 on device; merged outside
    `jit` (e.g. over a dataset) they become numpy int64, so long evaluations do not overflow.

    Make the class for a dataset with `ConfusionMatrix.of(num_classes, ignore_value)`."""

    counts: jax.Array
    num_classes = 0
    ignore_value = 255

    @classmethod
    def of(cls, num_classes: int, ignore_value: int = 255) -> type[ConfusionMatrix]:
        attributes = {"num_classes": num_classes, "ignore_value": ignore_value}
        return flax.struct.dataclass(type(f"ConfusionMatrix{num_classes}", (cls,), attributes))

    @classmethod
    def empty(cls) -> ConfusionMatrix:
        return cls(counts=np.zeros((cls.num_classes, cls.num_classes), np.int64))

    @classmethod
    def from_model_output(cls, predictions: jax.Array, labels: jax.Array, **_) -> ConfusionMatrix:
        """predictions, labels: int `[..., H, W]` of equal shape (predictions in `[0, C)`)."""
        c = cls.num_classes
        if c <= 0:
            raise ValueError("ConfusionMatrix has no class count; use ConfusionMatrix.of(num_classes, ignore_value)")
        labels = labels.astype(jnp.int32)
        valid = (labels != cls.ignore_value) & (labels >= 0) & (labels < c)
        index = jnp.where(valid, predictions.astype(jnp.int32) * c + labels, 0).reshape(-1, labels.shape[-1])
        # One scatter-add per row, then a sum: a single scatter of the flattened pixels fails in
        # jax 0.10 when the batch axis is sharded (NamedSharding on a reshaped index).
        add = lambda i, v: jnp.zeros(c * c, jnp.int32).at[i].add(v)  # noqa: E731
        counts = jax.vmap(add)(index, valid.reshape(index.shape).astype(jnp.int32)).sum(axis=0)
        return cls(counts=counts.reshape(c, c))

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        if isinstance(self.counts, jax.core.Tracer) or isinstance(other.counts, jax.core.Tracer):
            return type(self)(counts=self.counts + other.counts)
        return type(self)(counts=np.asarray(self.counts, np.int64) + np.asarray(other.counts, np.int64))

    def reduce(self) -> ConfusionMatrix:
        """Sum over the leading (device) axis of a gathered metric."""
        return type(self)(counts=self.counts.sum(axis=0))

    def compute(self) -> dict[str, float]:
        """The scalars of `evaluation.metrics.segmentation_metrics` (mIoU, fwIoU, mACC, pACC, in percent);
        its per-class dicts are left out (writers take scalars)."""
        result = segmentation_metrics(np.asarray(jax.device_get(self.counts)))
        return {k: float(v) for k, v in result.items() if not isinstance(v, Mapping)}
