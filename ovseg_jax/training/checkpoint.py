"""Training checkpoints with orbax: `<workdir>/checkpoints/<step>/{params, train, data, config}`.

- `params`: flat `{path: array}` model parameters (what a later stage's `init_from` reads).
- `train`: `{"step", "opt_state", "rng", ["model_state"]}`.
- `data`: the data iterator's `get_state()` (JSON), when the iterator has one.
- `config`: the run's config as JSON.

`stage_config` + `restore_params` are the one way from a workdir to a model: the public loaders
(`ovseg_jax.clip.load`, `ovseg_jax.segmenter.load`) build the model from the saved config and
copy the saved parameters into it.

Saves are asynchronous (`wait()` blocks) and atomic: orbax writes into a temporary directory and
renames it when complete, so a process killed during a save leaves the previous checkpoint as the
latest loadable one; unfinished temporaries are removed on the next start.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from ovseg_jax.convert.torch_io import CheckpointError


_ITEMS = ("params", "train", "data", "config")


def key_path_str(key_path) -> str:
    """A pytree key path of an `nnx.State` -> `"visual/transformer/resblocks/0/ln_1/scale"`."""
    parts = []
    for k in key_path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey) and k.name != "value":
            parts.append(k.name)
    return "/".join(parts)


class FlatTree:
    """Bijection between an `nnx.State` and a flat `{path: leaf}` dict (paths as `key_path_str`)."""

    def __init__(self, state: nnx.State):
        leaves, self.treedef = jax.tree_util.tree_flatten_with_path(state)
        self.paths = [key_path_str(p) for p, _ in leaves]
        if len(set(self.paths)) != len(self.paths):
            raise ValueError("parameter paths are not unique")

    def flatten(self, state: nnx.State) -> dict[str, Any]:
        return dict(zip(self.paths, jax.tree.leaves(state)))

    def unflatten(self, flat: Mapping[str, Any]) -> nnx.State:
        return jax.tree.unflatten(self.treedef, [flat[p] for p in self.paths])


def assign_params(model: nnx.Module, loaded: Mapping[str, np.ndarray], *, source: str,
                  allow_missing: Sequence[str] = (), variables: Any = nnx.Param) -> None:
    """Copy flat `{path: array}` parameters into `model` in place. Every model parameter must be
    in `loaded` with its shape unless its path matches a regex of `allow_missing` (it keeps its
    initialisation); extra entries in `loaded` are an error. `variables`: the nnx filter of what is
    assigned (default the parameters)."""
    graphdef, params, rest = nnx.split(model, variables, ...)
    tree = FlatTree(params)
    flat = tree.flatten(params)
    missing = [p for p in flat if p not in loaded and not any(re.search(r, p) for r in allow_missing)]
    extra = sorted(set(loaded) - set(flat))
    bad = [f"{p}: {tuple(loaded[p].shape)} vs model {tuple(flat[p].shape)}"
           for p in flat if p in loaded and tuple(loaded[p].shape) != tuple(flat[p].shape)]
    if missing or extra or bad:
        raise ValueError(f"{source}: parameters do not match the model: missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected {extra[:8]}"
                         f"{' ...' if len(extra) > 8 else ''}, wrong shape {bad[:8]}")
    new = {p: (jax.numpy.asarray(loaded[p], flat[p].dtype) if p in loaded else flat[p]) for p in flat}
    nnx.update(model, tree.unflatten(new))


class Checkpointer:
    """Save/restore of the train state under `directory` (one orbax step directory per save)."""

    def __init__(self, directory: str | Path, *, max_to_keep: int | None = 3, interval: int = 1000,
                 async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.interval = interval
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               save_interval_steps=1,
                                               enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def should_save(self, step: int) -> bool:
        return self.interval > 0 and step % self.interval == 0

    def save(self, step: int, params: Mapping[str, Any], train: Mapping[str, Any],
             data_state: Any = None, config: Mapping[str, Any] | None = None) -> None:
        """Start an asynchronous save of step `step` (returns once arrays are copied off device)."""
        items = dict(params=ocp.args.StandardSave(dict(params)), train=ocp.args.StandardSave(dict(train)),
                     data=ocp.args.JsonSave(data_state if data_state is not None else {}),
                     config=ocp.args.JsonSave(dict(config or {})))
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore(self, step: int, params_target: Mapping[str, Any], train_target: Mapping[str, Any]):
        """Restore step `step` into the shapes/dtypes/shardings of the targets (pytrees of
        `jax.ShapeDtypeStruct`) -> `(params, train, data_state)`."""
        args = ocp.args.Composite(params=ocp.args.StandardRestore(dict(params_target)),
                                  train=ocp.args.StandardRestore(dict(train_target)),
                                  data=ocp.args.JsonRestore())
        out = self.manager.restore(step, args=args)
        data = out.data if out.data else None
        return dict(out.params), dict(out.train), data

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def is_checkpoint_dir(path: str | Path) -> bool:
    """True for a trainer workdir or its `checkpoints/` directory with at least one saved step."""
    path = Path(path)
    for d in (path / "checkpoints", path):
        if d.is_dir() and any(p.is_dir() and p.name.isdigit() and (p / "params").is_dir() for p in d.iterdir()):
            return True
    return False


def _step_dir(path: str | Path, step: int | None) -> Path:
    """A trainer workdir / its `checkpoints/` / one step directory -> the step directory."""
    path = Path(path).absolute()
    if (path / "params").is_dir() and path.name.isdigit():
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit()
                   and (p / "params").is_dir()) if root.is_dir() else []
    if not steps:
        raise FileNotFoundError(f"{path}: no trainer checkpoint (expected <workdir>/checkpoints/<step>/params)")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"{path}: no checkpoint for step {step}; saved steps: {steps}")
    return root / str(step if step is not None else steps[-1])


def load_params(path: str | Path, step: int | None = None) -> dict[str, np.ndarray]:
    """Flat `{path: np.ndarray}` parameters of a trainer checkpoint (a workdir, its
    `checkpoints/` directory, or one step directory); the latest step unless `step` is given."""
    return _restore_numpy(_step_dir(path, step) / "params")


def load_model_state(path: str | Path, step: int | None = None) -> dict[str, np.ndarray]:
    """Flat `{path: np.ndarray}` non-parameter model state of a trainer checkpoint (`train/model_state`:
    e.g. R101c's frozen batch-norm statistics, the segmenter stage's text bank); {} when the run had
    none. Only that part of the `train` item is read (not the optimiser state)."""
    return _restore_numpy(_step_dir(path, step) / "train", "model_state")


def _restore_numpy(item_dir: Path, key: str | None = None) -> dict[str, np.ndarray]:
    """An orbax PyTree item (or its entry `key`, read alone) as flat numpy arrays."""
    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(item_dir)
        tree = dict(meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree)
        if key is not None:
            if key not in tree:
                return {}
            tree = {key: tree[key]}
        target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree)
        restored = ckptr.restore(item_dir, args=ocp.args.PyTreeRestore(
            item=target, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target),
            partial_restore=key is not None))
    restored = restored[key] if key is not None else restored
    return {k: np.asarray(v) for k, v in restored.items()}


def load_config(path: str | Path, step: int | None = None) -> dict:
    """The run config (as a dict) saved with a trainer checkpoint; paths as in `load_params`."""
    step_dir = _step_dir(path, step)
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
        return dict(ckptr.restore(step_dir / "config"))


def stage_config(path: str | Path, tasks: str | Sequence[str], step: int | None = None) -> dict:
    """The saved config of a trainer workdir (paths as in `load_params`), checked to be a run of
    one of `tasks` ("clip", "segmenter"); a run of another task is a `CheckpointError`."""
    tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    config = load_config(path, step)
    if config.get("task") not in tasks:
        raise CheckpointError(f"{path}: a trainer workdir of a {config.get('task')!r} run; expected a "
                              f"{' or '.join(repr(t) for t in tasks)} stage")
    return config


def restore_params(model: nnx.Module, path: str | Path, *, step: int | None = None, prefix: str = "",
                   drop: Sequence[str] = (), allow_missing: Sequence[str] = ()) -> None:
    """Copy a trainer checkpoint's parameters into `model` in place (see `assign_params`): saved
    paths lose `prefix` (e.g. "segmenter/" of the segmenter stage's wrapper); paths in `drop` are
    left out; a saved path outside `prefix` is an unexpected parameter. The model's other state
    (R101c's frozen batch-norm statistics, loaded from R-103.pkl when the run started) comes from the
    run's `train/model_state` where it has it."""
    step_dir = _step_dir(path, step)
    params = {k.removeprefix(prefix): v for k, v in load_params(step_dir).items()}
    params = {k: v for k, v in params.items() if k not in drop}
    assign_params(model, params, source=f"{path} (trainer checkpoint, step {step_dir.name})",
                  allow_missing=allow_missing)
    other_state = nnx.All(nnx.Not(nnx.Param), nnx.Not(nnx.RngState))
    if jax.tree.leaves(nnx.state(model, other_state)):
        saved = {k.removeprefix(prefix): v for k, v in load_model_state(step_dir).items() if k.startswith(prefix)}
        assign_params(model, saved, source=f"{path} (trainer checkpoint's model_state, step {step_dir.name})",
                      allow_missing=(".",), variables=other_state)  # what the run lacks keeps its initial value
