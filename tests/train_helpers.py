"""Tiny configs and in-memory batch iterators for the trainer tests (and their subprocesses)."""

from __future__ import annotations

import numpy as np

from ovseg_jax import configs
from ovseg_jax.models.clip import ClipConfig

TINY_CLIP = ClipConfig(embed_dim=16, image_size=32, patch_size=8, vision_width=32, vision_layers=2,
                       vision_heads=2, vision_mlp_dim=64, context_length=8, vocab_size=64, text_width=32,
                       text_layers=1, text_heads=2, text_mlp_dim=64, eot_token_id=63)


def assert_adam_runs_match(got: dict, expected: dict, *, lr: float, steps: int) -> None:
    """Two runs of Adam on the same batches that differ in float reduction order: every element
    within 2 * lr * steps, all but 0.1% of them within 1e-4 (`{path: array}` parameters).

    Adam divides each gradient by its own running RMS, so an element whose true gradient is ~0 (the
    attention key biases': softmax ignores a constant added to a query's logits) is moved by its
    rounding noise, up to `lr` per step in either direction whatever the noise's size: two reduction
    orders may move it apart by up to 2 * lr * steps (seen: 1.0e-4 after 3 steps at lr 1e-3)."""
    assert sorted(got) == sorted(expected)
    size = sum(np.size(v) for v in expected.values())
    for path, value in expected.items():
        np.testing.assert_allclose(got[path], value, rtol=1e-5, atol=2 * lr * steps, err_msg=path)
    loose = sum(int(np.sum(~np.isclose(got[p], v, rtol=1e-5, atol=1e-4))) for p, v in expected.items())
    assert loose <= 1e-3 * size, f"{loose} of {size} elements differ by over 1e-4"


def tiny_config(stage: str = "ft", *, total_steps: int = 6, batch_size: int = 8, lr: float = 1e-3):
    """A trainer config for the tiny CLIP: stage "pretrain", "ft" or "mpt"."""
    if stage == "mpt":
        c = configs.mask_prompt_tuning(TINY_CLIP, depth=2, lr=lr, total_steps=total_steps, warmup_steps=2,
                                       batch_size=batch_size)
    else:
        c = configs.clip_finetune(TINY_CLIP, lr=lr, total_steps=total_steps, warmup_steps=2, batch_size=batch_size)
        if stage == "pretrain":
            c.optim.freeze = []
    c.log_every = 1
    c.checkpoint.interval = 3
    c.checkpoint.max_to_keep = 2
    return c


class PairBatches:
    """Deterministic CLIP pair batches `{"image", "token_ids", "region_mask"}` with saveable position.

    `process_index`/`process_count` select this process's contiguous slice of each global batch.
    """

    def __init__(self, global_batch: int, *, seed: int = 0, process_index: int = 0, process_count: int = 1,
                 image_size: int = 32, context: int = 8, eot: int = 63):
        self.global_batch, self.seed = global_batch, seed
        self.lo = process_index * global_batch // process_count
        self.hi = (process_index + 1) * global_batch // process_count
        self.image_size, self.context, self.eot = image_size, context, eot
        self.position = 0

    def global_batch_at(self, position: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, position])
        b, s = self.global_batch, self.image_size
        ids = rng.integers(1, self.eot, (b, self.context)).astype(np.int32)
        lengths = rng.integers(2, self.context, b)
        ids[np.arange(b), lengths] = self.eot
        ids[np.arange(self.context)[None] > lengths[:, None]] = 0
        mask = np.zeros((b, s, s), np.float32)
        for i in range(b):
            y, x = rng.integers(0, s // 2, 2)
            mask[i, y:y + s // 2, x:x + s // 2] = 1
        return {"image": rng.standard_normal((b, s, s, 3)).astype(np.float32), "token_ids": ids,
                "region_mask": mask}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.global_batch_at(self.position)
        self.position += 1
        return {k: v[self.lo:self.hi] for k, v in batch.items()}

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: dict) -> None:
        self.position = int(state["position"])


def pair_batches(config) -> PairBatches:
    """`config.data.factory` for CLI tests: this process's slice of `config.batch_size` pairs."""
    import jax  # noqa: PLC0415

    return PairBatches(config.batch_size, seed=config.data.get("seed", 0), process_index=jax.process_index(),
                       process_count=jax.process_count())
