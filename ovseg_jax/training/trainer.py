"""The generic trainer: one `Trainer` for every stage (`python -m ovseg_jax.train` is its command).


Any config field can be overridden: `--config.optim.lr=1e-5 --config.total_steps=100`; a config
file may take a variant string: `--config configs/synthetic.py:clip_ft`. Compiled steps are kept in
JAX's persistent compilation cache (`--compile_cache`, default `~/.cache/ovseg_jax/jax_cache`;
`--compile_cache=none` turns it off), so a restarted or resumed run skips most of its compilation.
`config.scan_layers` / `config.remat` choose how the model's stacks of blocks run
(`ovseg_jax.models.layers.set_stack_options`); they change neither parameters nor checkpoints.

Train state (a dict, checkpointed by `ovseg_jax.training.checkpoint`): `params` (flat `{path: array}`,
float32), `opt_state` (optax state over the trained parameters only), `step` (int32), `rng`
(raw uint32 key data; the step's key is `fold_in(rng, step)`), and `model_state` (non-parameter
model variables, if the model has any). `train_step(state, batch) -> (state, metrics)` is pure and
compiled once with explicit in/out shardings, donating the old state. A step whose loss, gradient
norm or resulting parameters / optimizer state would not be finite changes nothing (metric
`nonfinite` = 1) and the loop raises `NonFiniteLossError` before any later checkpoint, so every
saved state is finite; a checkpoint that is not (saved by an older version) is refused on resume.

Several CPU devices in one process (`--xla_force_host_platform_device_count=N`) need XLA's
memory-minimising scheduler once the persistent compilation cache holds the steps
(`prepare_simulated_devices`, which the command calls; see `SIMULATED_DEVICES_XLA_FLAG`).

Configs are validated against their task's schema (`ovseg_jax.configs.validate`) before anything is
built; a workdir whose saved config differs (outside `configs.RESUMABLE`) is not resumed unless
`config.allow_config_change` is set.

Batches are dicts of numpy arrays holding this process's slice of the global batch (leading axis);
they become global arrays sharded over the mesh's "data" axis.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import signal
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, MutableMapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import NamedSharding, PartitionSpec as P

from ovseg_jax import configs
from ovseg_jax.configs import ConfigError
from ovseg_jax.models.layers import set_stack_options
from ovseg_jax.training import checkpoint, optim, sharding, tasks
from ovseg_jax.training.checkpoint import Checkpointer, FlatTree
from ovseg_jax.training.metrics import train_collection
from ovseg_jax.training.monitor import create_writer, metric_writers, parameter_table, periodic_actions

log = logging.getLogger("ovseg_jax.train")  # one logger name for the loop and its command

DTYPES = {name: jnp.dtype(name) for name in configs.DTYPES}
# The loop waits for the step this many steps back before dispatching another: it bounds the device
# memory held by queued batches and stays below XLA:CPU's in-flight limit per device (a loop of
# 2-device collective programs on a 2-core machine deadlocked when it waited every 40 steps, not
# every 24: queued launches hold the client's threads the oldest one needs).
MAX_STEPS_AHEAD = 8

# XLA:CPU runs a program's collectives on a thread pool of max(cores, devices) threads, each device's
# part blocking a thread in a rendezvous until every device has arrived. A program compiled in this
# process orders its collectives (they share one communicator resource in the thunk executor); the
# same program loaded from the persistent compilation cache does not in jaxlib 0.10 (each deserialised
# collective gets a resource of its own), so a step's independent all-gathers (the contrastive loss's
# image and text features) run at once, one device's waits take every thread, the other device never
# arrives, and the rendezvous aborts the process after 40 s ("Termination timeout for all gather").
# XLA's memory-minimising scheduler orders them again through the buffers they reuse; it is read
# when the backend starts, so `prepare_simulated_devices` must run before any JAX computation.
SIMULATED_DEVICES_XLA_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
_SCHEDULER_CHOSEN = re.compile(r"--xla_cpu_enable_concurrency_optimized_scheduler(=|\b)")
_SCHEDULER_OFF = re.compile(r"--xla_cpu_enable_concurrency_optimized_scheduler=(false|0)\b", re.I)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss, gradient or update."""


def prepare_simulated_devices(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Call before JAX's backend starts: when `XLA_FLAGS` simulates several CPU devices
    (`--xla_force_host_platform_device_count=N`, N > 1) and does not choose XLA:CPU's scheduler,
    add `SIMULATED_DEVICES_XLA_FLAG` -> whether it was added."""
    flags = environ.get("XLA_FLAGS", "")
    count = re.search(r"--xla_force_host_platform_device_count=(\d+)", flags)
    if count is None or int(count.group(1)) < 2 or _SCHEDULER_CHOSEN.search(flags):
        return False
    environ["XLA_FLAGS"] = f"{flags} {SIMULATED_DEVICES_XLA_FLAG}".strip()
    return True


def _guard_simulated_devices(mesh) -> None:
    """Several CPU devices of this process in `mesh`, the persistent compilation cache on and a
    backend started without `SIMULATED_DEVICES_XLA_FLAG`: programs loaded from the cache can
    deadlock, so the cache is turned off for this process (logged)."""
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    if len(local) < 2 or local[0].platform != "cpu" or _SCHEDULER_OFF.search(os.environ.get("XLA_FLAGS", "")):
        return
    if not (jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir):
        return
    log.warning("%d CPU devices in this process: the persistent compilation cache is turned off, since XLA:CPU "
                "programs loaded from it can deadlock in their collectives; to keep it, start the process with "
                "XLA_FLAGS='... %s' (python -m ovseg_jax.train adds it itself)", len(local), SIMULATED_DEVICES_XLA_FLAG)
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()


def all_finite(tree) -> jax.Array:
    """Whether every floating-point leaf of `tree` is finite (a bool scalar; one reduction per leaf)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves])) if leaves else jnp.bool_(True)


def check_resume(config, workdir: Path) -> None:
    """Refuse to resume `workdir` if its latest checkpoint was saved with a config that differs
    outside `configs.RESUMABLE` (model, task, batch size, lr, seed, ...), unless
    `config.allow_config_change`; then the differences are logged."""
    if not checkpoint.is_checkpoint_dir(workdir / "checkpoints"):
        return
    saved = checkpoint.load_config(workdir / "checkpoints")
    diff = configs.config_diff(saved, json.loads(config.to_json_best_effort()))
    if not diff:
        return
    listing = "\n  ".join(diff)
    if not config.allow_config_change:
        raise ConfigError(f"{workdir} holds a run saved with a different config (saved -> now):\n  {listing}\n"
                          "Use another --workdir, or pass --config.allow_config_change=true to resume it "
                          "with the new values.")
    log.warning("resuming %s with a changed config (allow_config_change; saved -> now):\n  %s", workdir, listing)


def _put_global(value: Any, target: NamedSharding) -> jax.Array:
    """A value identical on every process -> a global array with `target` sharding."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, target, lambda index: value[index])


def _abstract_global(value: Any, target: NamedSharding) -> jax.ShapeDtypeStruct:
    """The shape, dtype and `target` sharding `_put_global` would give, without the array."""
    return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=target)


def to_global(batch: Mapping[str, np.ndarray], target: NamedSharding) -> dict[str, jax.Array]:
    """Per-process batch slices (leading axis) -> global arrays sharded as `target`."""
    return {k: jax.make_array_from_process_local_data(target, np.asarray(v)) for k, v in batch.items()}


class Trainer:
    """Builds the model of `config.task`, the optimiser, the mesh and shardings; `fit` runs the loop.

    `workdir=None` trains without checkpoints or TensorBoard logs (tests, benchmarks). `model`
    replaces the task's `build_model(config)`; an abstract one (`nnx.eval_shape`) gives a Trainer
    whose `state` holds `jax.ShapeDtypeStruct`s with their shardings, so that
    `train_step.lower(trainer.state, batch).compile()` allocates nothing (bench/memory.py); such a
    Trainer cannot `fit`.
    """

    def __init__(self, config, workdir: str | Path | None = None, *, model: nnx.Module | None = None):
        configs.validate(config, data=bool(config.get("data")))  # as the command does; a data section if given
        self.config = config
        self.task = tasks.get(config.task)
        self.workdir = Path(workdir) if workdir is not None else None
        if self.workdir is not None:
            check_resume(config, self.workdir)
        self.mesh = sharding.make_mesh(config.mesh)
        _guard_simulated_devices(self.mesh)
        if model is None:
            model = self.task.build_model(config, dtype=DTYPES[config.dtype], rngs=nnx.Rngs(config.seed))
        set_stack_options(model, scan_layers=config.scan_layers, remat=config.remat)
        self.graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
        self.param_tree, self.state_tree = FlatTree(params), FlatTree(model_state)
        flat = self.param_tree.flatten(params)
        # The policy tables, each matched once over all parameters (the assignment is logged).
        self.trainable = optim.trainable_paths(flat, config.optim, log_matches=True)
        if not self.trainable:
            raise ConfigError("config.optim.trainable / freeze leave no parameter to train")
        groups = optim.param_groups(flat, config.optim, log_matches=True)
        groups = {p: groups[p] for p in self.trainable}
        log.info("parameter groups:\n%s", optim.describe(groups, len(flat) - len(self.trainable)))
        if jax.process_index() == 0:
            log.info("parameters:\n%s", parameter_table(flat, self.trainable))
        self.tx = optim.make_optimizer(config.optim, groups, config.total_steps)
        self.schedule = optim.make_schedule(config.optim, config.total_steps)

        mesh = self.mesh
        replicated = NamedSharding(mesh, P())
        specs = sharding.param_specs({p: v.shape for p, v in flat.items()}, config.sharding.rules,
                                     mesh, config.sharding.fsdp_min_size, log_matches=True)
        self.param_shardings = {p: NamedSharding(mesh, s) for p, s in specs.items()}
        opt_abstract = jax.eval_shape(self.tx.init, {p: flat[p] for p in self.trainable})
        train_shardings = {"step": replicated, "rng": replicated,
                           "opt_state": sharding.follow_params(opt_abstract, self.param_shardings, mesh)}
        flat_state = self.state_tree.flatten(model_state)
        if flat_state:
            train_shardings["model_state"] = {p: replicated for p in flat_state}
        self.state_shardings = {"params": self.param_shardings, **train_shardings}
        self.batch_sharding = sharding.batch_sharding(mesh)

        abstract = any(isinstance(v, jax.ShapeDtypeStruct) for v in flat.values())
        put = _abstract_global if abstract else _put_global
        params_g = {p: put(v, self.param_shardings[p]) for p, v in flat.items()}
        init_opt = jax.jit(self.tx.init, out_shardings=train_shardings["opt_state"])
        self.state = {
            "params": params_g,
            "step": put(np.int32(0), replicated),
            "rng": put(jax.random.key_data(jax.random.key(config.seed)), replicated),
            "opt_state": (jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), opt_abstract,
                                       train_shardings["opt_state"]) if abstract
                          else init_opt({p: params_g[p] for p in self.trainable})),
        }
        if flat_state:
            self.state["model_state"] = {p: put(v, replicated) for p, v in flat_state.items()}
        self.train_step = jax.jit(self._train_step, in_shardings=(self.state_shardings, self.batch_sharding),
                                  out_shardings=(self.state_shardings, replicated), donate_argnums=0)
        self.checkpointer = None
        if self.workdir is not None:
            ck = config.checkpoint
            self.checkpointer = Checkpointer(self.workdir / "checkpoints", max_to_keep=ck.max_to_keep,
                                             interval=ck.interval, async_save=ck.async_save)
        self._stop_signal: int | None = None
        self._collect = self._merge = None  # jitted clu metric update / merge, made at the first step

    # -- the step ---------------------------------------------------------------------------

    def model(self, params: Mapping[str, jax.Array], model_state: Mapping[str, jax.Array] | None = None):
        """An `nnx` model holding `params` (flat dict) and the model state."""
        state = self.state_tree.unflatten(model_state or {})
        return nnx.merge(self.graphdef, self.param_tree.unflatten(params), state)

    def _train_step(self, state: dict, batch: dict) -> tuple[dict, dict]:
        """One optimiser step on a global batch -> (new state, scalar metrics). If the loss, the
        gradient norm or the parameters the step would produce are not finite, the state is returned
        unchanged (step included) with metric `nonfinite` = 1."""
        step = state["step"]
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
        params = state["params"]
        frozen = {p: v for p, v in params.items() if p not in set(self.trainable)}
        trained = {p: params[p] for p in self.trainable}

        def loss_fn(trained):
            model = self.model({**frozen, **trained}, state.get("model_state"))
            return self.task.loss(model, batch, rng)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trained)
        grad_norm = optim.global_norm(grads)

        def apply(trained, opt_state):
            updates, opt_state = self.tx.update(grads, opt_state, trained, grad_norm=grad_norm)
            return self.task.post_update(optax.apply_updates(trained, updates)), opt_state

        # Finite gradients can still give non-finite parameters (a rate that overflows, an overflow in
        # bfloat16), so the parameters the step would produce decide too. (The new Adam moments are
        # averages of the old ones and of finite gradients and their squares, finite when the gradient
        # norm is.) They are computed twice: here only into one reduction per tensor (XLA fuses the
        # update into it: one read of parameters, gradients and moments, nothing stored), then under
        # the cond, in place. Selecting new or old per tensor after one computation made XLA keep
        # copies of the moments and pass over parameters and moments three more times: 336 ms vs 92 ms
        # for Swin-B's 103M parameters on 2 CPU cores.
        new_params, _ = apply(trained, state["opt_state"])
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(new_params)
        trained, opt_state = jax.lax.cond(ok, apply, lambda *unchanged: unchanged, trained, state["opt_state"])
        new_state = {**state, "params": {**frozen, **trained}, "opt_state": opt_state,
                     "step": jnp.where(ok, step + 1, step)}  # frozen parameters are never touched
        metrics = {**metrics, "loss": loss, "grad_norm": grad_norm, "learning_rate": self.schedule(step),
                   "nonfinite": 1.0 - ok.astype(jnp.float32)}
        return new_state, metrics

    # -- checkpoints ------------------------------------------------------------------------

    def _train_part(self) -> dict:
        return {k: v for k, v in self.state.items() if k != "params"}

    def save(self, data_iter: Any = None) -> None:
        """Start an asynchronous checkpoint of the current state (and iterator position)."""
        step = int(self.state["step"])
        data_state = data_iter.get_state() if hasattr(data_iter, "get_state") else None
        self.checkpointer.save(step, self.state["params"], self._train_part(), data_state,
                               json.loads(self.config.to_json_best_effort()))

    def restore(self, data_iter: Any = None) -> int:
        """Resume from the latest checkpoint in the workdir, if any -> the step to continue at."""
        if self.checkpointer is None or self.checkpointer.latest_step() is None:
            return int(self.state["step"])
        step = self.checkpointer.latest_step()
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state)
        params, train, data_state = self.checkpointer.restore(
            step, abstract["params"], {k: v for k, v in abstract.items() if k != "params"})
        if not jax.jit(all_finite)((params, train["opt_state"])):
            raise NonFiniteLossError(
                f"checkpoint step {step} in {self.checkpointer.directory} holds non-finite parameters or optimizer "
                f"state (written before the trainer checked updates, or damaged); delete "
                f"{self.checkpointer.directory / str(step)} to resume from an earlier step")
        self.state = {"params": params, **train}
        if hasattr(data_iter, "set_state"):
            if data_state is not None:
                data_iter.set_state(data_state)
        elif data_iter is not None:
            log.warning("the data iterator (%s) has no get_state/set_state: resuming at step %d, the data "
                        "restarts from its beginning (examples of steps 1-%d are seen again)",
                        type(data_iter).__name__, step, step)
        log.info("resumed from %s at step %d", self.checkpointer.directory, step)
        return step

    # -- the loop ---------------------------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:
        del frame
        self._stop_signal = signum

    def _stop_requested(self, step: int) -> bool:
        flag = self._stop_signal is not None
        if jax.process_count() > 1:
            # Every process must agree on the step at which to stop and save.
            if step % self.config.log_every:
                return False
            flag = bool(multihost_utils.process_allgather(np.int32(flag)).max())
        return flag

    def _check(self, pending: list[tuple[int, dict]]) -> dict[str, float]:
        """Fetch pending metrics; raise NonFiniteLossError on a step that was not finite (nothing
        after it has been saved) -> the last step's metrics."""
        fetched = jax.device_get(pending)
        for step, metrics in fetched:
            if metrics["nonfinite"] or not np.isfinite(metrics["loss"]):
                what = (f"loss is {metrics['loss']}" if not np.isfinite(metrics["loss"]) else
                        f"gradient norm is {metrics['grad_norm']}" if not np.isfinite(metrics["grad_norm"]) else
                        f"the update (learning rate {metrics['learning_rate']:g}) would make parameters or "
                        "optimizer state non-finite")
                latest = self.checkpointer.latest_step() if self.checkpointer else None
                where = (f"the last good checkpoint is step {latest} in {self.checkpointer.directory}"
                         if latest is not None else "no checkpoint was saved")
                raise NonFiniteLossError(
                    f"{what} at step {step}; the step was not applied and training stopped ({where}). "
                    "Lower config.optim.lr (resuming this workdir with a changed config needs "
                    "--config.allow_config_change=true) or check the data.")
        pending.clear()
        return {k: float(v) for k, v in fetched[-1][1].items()} if fetched else {}

    def _hooks(self, start: int, end: int, writer) -> list[periodic_actions.PeriodicAction]:
        """clu's `ReportProgress` (steps/s and ETA in the log every `log_every` steps, `steps_per_sec`
        and `uptime` to the writer) and, with `config.profile_steps > 0` and a workdir, `Profile`: a
        jax.profiler trace of that many steps from the third step of this run, in `workdir/profile`."""
        hooks = [periodic_actions.ReportProgress(num_train_steps=end, writer=writer,
                                                 every_steps=self.config.log_every, every_secs=None)]
        profile_steps = int(self.config.profile_steps)
        if profile_steps > 0 and self.workdir is not None and jax.process_index() == 0:
            hooks.append(periodic_actions.Profile(logdir=self.workdir / "profile", num_profile_steps=profile_steps,
                                                  profile_duration_ms=0, first_profile=start + 2,
                                                  every_steps=None, every_secs=None))
        return hooks

    def fit(self, data_iter: Iterator[Mapping[str, np.ndarray]], *, num_steps: int | None = None,
            writer: metric_writers.MetricWriter | None = None,
            evaluate: Callable[[Any, int], Mapping[str, float]] | None = None) -> str:
        """Train until `config.total_steps` (or `num_steps` more steps) -> "done" or "preempted".

        Resumes from the workdir's latest checkpoint first. On SIGTERM/SIGINT the current state is
        checkpointed and "preempted" returned. The step metrics accumulate on device in a
        `clu.metrics` collection (`ovseg_jax.training.metrics.train_collection`) and every `log_every` steps
        their means over the steps since the last report go to `writer` (default: the log).
        `evaluate(model, step)` runs every `config.eval_every` steps (and at the end) and its
        scalars are logged.
        """
        cfg = self.config
        start = self.restore(data_iter)
        end = cfg.total_steps if num_steps is None else min(cfg.total_steps, start + num_steps)
        writer = writer or create_writer(None)
        hooks = self._hooks(start, end, writer)
        local_batch = None
        summed = None  # the clu collection since the last report
        pending: list[tuple[int, dict]] = []
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        saved_step = start
        try:
            step = start
            while step < end:
                if self._stop_requested(step):
                    self._check(pending)
                    if self.checkpointer is not None and saved_step != step:
                        self.save(data_iter)
                    log.warning("signal %s: saved step %d, stopping", self._stop_signal, step)
                    return "preempted"
                batch = next(data_iter)
                if local_batch is None:
                    local_batch = len(next(iter(batch.values())))
                    if local_batch * jax.process_count() != cfg.batch_size:
                        raise ValueError(f"batches hold {local_batch} examples x {jax.process_count()} "
                                         f"processes; config.batch_size (global) is {cfg.batch_size}")
                    sharding.check_batch_divisible(cfg.batch_size, self.mesh)
                if len(pending) >= MAX_STEPS_AHEAD:
                    jax.block_until_ready(pending[-MAX_STEPS_AHEAD][1])
                self.state, metrics = self.train_step(self.state, to_global(batch, self.batch_sharding))
                step += 1
                pending.append((step, metrics))
                summed = self._accumulate(summed, metrics)
                save_now = self.checkpointer is not None and (self.checkpointer.should_save(step) or step == end)
                if step % cfg.log_every == 0 or save_now or step == end:
                    self._check(pending)
                    if step % cfg.log_every == 0 or step == end:
                        writer.write_scalars(step, {k: float(v) for k, v in jax.device_get(summed.compute()).items()})
                        summed = None
                for hook in hooks:
                    hook(step)
                if save_now:
                    self.save(data_iter)
                    saved_step = step
                if evaluate is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == end):
                    if self.checkpointer is not None and saved_step != step:  # an evaluation failure loses nothing
                        self._check(pending)
                        self.save(data_iter)
                        saved_step = step
                    with hooks[0].timed("eval"):
                        writer.write_scalars(step, self._evaluate(evaluate, step))
            self._check(pending)
            return "done"
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if self.checkpointer is not None:
                self.checkpointer.wait()
            writer.flush()

    def _accumulate(self, summed, metrics: dict):
        """Merge one step's scalar metrics into the clu collection (on device, no host sync)."""
        if self._collect is None:
            collection = train_collection(metrics)
            self._collect = jax.jit(collection.single_from_model_output)
            self._merge = jax.jit(lambda a, b: a.merge(b))
        update = self._collect(**metrics)
        return update if summed is None else self._merge(summed, update)

    def _evaluate(self, evaluate: Callable[[Any, int], Mapping[str, float]], step: int) -> dict[str, float]:
        try:
            return dict(evaluate(self.model(self.state["params"], self.state.get("model_state")), step))
        except Exception:
            saved = (f"the state of step {step} is saved in {self.checkpointer.directory}; a rerun resumes there"
                     if self.checkpointer is not None else "no workdir, nothing saved")
            log.error("evaluation at step %d failed (%s)", step, saved)
            raise

    def close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.close()



def make_data(config, task) -> Iterator[Mapping[str, np.ndarray]]:
    """This process's training batches: `config.data.kind == "python"` calls
    `config.data.factory` ("module:function", called with the config); other kinds are the task's.
    The config is validated first (`configs.validate`, which fills the data section's defaults)."""
    configs.validate(config)
    data = config.data
    if data.get("kind") == "python":
        module, _, name = data.factory.partition(":")
        factory = getattr(importlib.import_module(module), name, None)
        if factory is None:
            raise ValueError(f"config.data.factory={data.factory!r}: no function {name!r} in {module}")
        return iter(factory(config))
    if not hasattr(task, "make_data"):
        raise ValueError(f"config.data.kind={data.get('kind')!r} has no reader in task {config.task!r}; "
                         "use kind='python' with factory='module:function'")
    return task.make_data(config)


def _substitute_workdir(config, workdir: Path) -> None:
    """Replace "{workdir}" in every string field of `config` (recursively) by `workdir`."""
    for key, value in config.items():
        if isinstance(value, str) and "{workdir}" in value:
            config[key] = value.replace("{workdir}", str(workdir))
        elif hasattr(value, "items"):
            _substitute_workdir(value, workdir)


def _hparams(config) -> dict[str, Any]:
    """The config as flat `{"a.b": value}` scalars (other values as strings), for `write_hparams`."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node) -> None:
        for key, value in node.items():
            if hasattr(value, "items"):
                walk(f"{prefix}{key}.", value)
            else:
                flat[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)

    walk("", config)
    return flat


def run(config, workdir: str | Path) -> str:
    """Train one stage (or, for a config with `stages`, each stage in turn in `workdir/<stage>`,
    with "{workdir}" in a stage's string fields (e.g. `init_from`) replaced by `workdir`)
    -> "done" / "preempted". A `config.data.generate` dict generates the synthetic world into
    `config.data.root` when it is missing."""
    workdir = Path(workdir)
    configs.validate(config)
    if "stages" in config:
        for name in config.stages:
            stage = config[name]
            with stage.unlocked():
                _substitute_workdir(stage, workdir)
            log.info("stage %s -> %s", name, workdir / name)
            if run(stage, workdir / name) != "done":
                return "preempted"
        return "done"
    task = tasks.get(config.task)
    if config.get("data") and config.data.get("generate"):
        from ovseg_jax.data import synthetic  # noqa: PLC0415

        synthetic.ensure(config.data.root, **config.data.generate.to_dict())
    task.check_inputs(config)
    trainer = Trainer(config, workdir)  # refuses a workdir of another config before anything is written
    try:
        data = make_data(config, task)
        evaluate = task.make_evaluator(config) if hasattr(task, "make_evaluator") else None
        writer = create_writer(workdir / "tensorboard")
        if jax.process_index() == 0:
            writer.write_hparams(_hparams(config))
        try:
            return trainer.fit(data, writer=writer, evaluate=evaluate)
        finally:
            writer.close()
    finally:
        trainer.close()
