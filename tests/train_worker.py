"""Subprocess entry for trainer tests: `python -m tests.train_worker MODE ...`.

fit OUT_NPZ [--workdir DIR] [--steps N] [--total N] [--batch B] [--sharding fsdp] [--mesh data,model]
    Train the tiny CLIP ("ft" stage) on `PairBatches`; process 0 writes the final params to OUT_NPZ.
    Multi-process runs read OVSEG_COORDINATOR / OVSEG_NUM_PROCESSES / OVSEG_PROCESS_ID.
    Prints "batch K" (flushed) as each batch is drawn, and the fit result at the end.
kill_during_save DIR
    Save a small checkpoint (step 1), start saving a large one (step 2) and SIGKILL itself.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys


def fit(args) -> None:
    import jax  # noqa: PLC0415

    if os.environ.get("OVSEG_COORDINATOR"):
        from ovseg_jax.training.sharding import initialize_distributed  # noqa: PLC0415

        initialize_distributed()
    import numpy as np  # noqa: PLC0415

    from ovseg_jax.training.trainer import Trainer  # noqa: PLC0415
    from tests.train_helpers import PairBatches, tiny_config  # noqa: PLC0415

    config = tiny_config("ft", total_steps=args.total, batch_size=args.batch)
    if args.mesh:
        data, model = (int(v) for v in args.mesh.split(","))
        config.mesh = [("data", data), ("model", model)]
    if args.sharding == "fsdp":
        config.sharding.fsdp_min_size = 256
        config.sharding.rules = [(r"mlp/c_fc/kernel$", (None, "model"))]

    class Announce(PairBatches):
        def __next__(self):
            print(f"batch {self.position}", flush=True)
            return super().__next__()

    batches = Announce(args.batch, process_index=jax.process_index(), process_count=jax.process_count())
    trainer = Trainer(config, workdir=args.workdir)
    result = trainer.fit(batches, num_steps=args.steps)
    from jax.experimental import multihost_utils  # noqa: PLC0415

    params = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True))
              for k, v in trainer.state["params"].items()}
    trainer.close()
    if jax.process_index() == 0:
        np.savez(args.out, **{k.replace("/", "|"): v for k, v in params.items()})
    print(f"result {result} step {int(trainer.state['step'])}", flush=True)


def kill_during_save(directory: str) -> None:
    import jax.numpy as jnp  # noqa: PLC0415

    from ovseg_jax.training.checkpoint import Checkpointer  # noqa: PLC0415

    ck = Checkpointer(directory, max_to_keep=3)
    ck.save(1, {"w": jnp.ones((4, 4))}, {"step": jnp.asarray(1)})
    ck.wait()
    ck.save(2, {"w": jnp.ones((4, 4)), "big": jnp.ones((64, 1024, 1024), jnp.float32)}, {"step": jnp.asarray(2)})
    print("saving", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["fit", "kill_during_save"])
    parser.add_argument("path")
    parser.add_argument("--workdir")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--total", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--sharding", default="")
    parser.add_argument("--mesh", default="")
    args = parser.parse_args()
    if args.mode == "fit":
        args.out = args.path
        fit(args)
    else:
        kill_during_save(args.path)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
