"""Device mesh, parameter sharding rules and multi-host start-up.

`config.mesh`: `[(axis_name, size)]`, one size may be -1 (all remaining devices), e.g.
`[("data", -1), ("model", 1)]`. Batches are sharded over the "data" axis.

`config.sharding.rules`: `[(regex, spec)]` matched (`re.search`, first match wins) against
parameter paths; `spec` is a tuple of mesh axis names / None per dimension (a PartitionSpec),
or the string "fsdp" (shard the largest dimension divisible by the data-axis size over "data").
Unmatched parameters with at least `config.sharding.fsdp_min_size` elements get "fsdp"; the
rest are replicated. Optimiser moments follow their parameter's sharding. A rule that matches no
parameter is an error (`ovseg_jax.configs.match_rules`).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ovseg_jax.configs import match_rules

log = logging.getLogger(__name__)

DATA_AXIS = "data"


def initialize_distributed() -> None:
    """`jax.distributed.initialize` when the environment describes a multi-process launch.

    - `OVSEG_COORDINATOR` (host:port), `OVSEG_NUM_PROCESSES`, `OVSEG_PROCESS_ID`: explicit
      (launch/local_multiprocess.sh); CPU processes use the gloo collectives.
    - `OVSEG_DISTRIBUTED=1`: JAX's auto-detection (Cloud TPU pods, SLURM; launch/tpu_pod.sh,
      launch/slurm_multigpu.sh).
    Otherwise (a single process) nothing happens.
    """
    env = os.environ
    if jax.distributed.is_initialized():
        return
    if "OVSEG_COORDINATOR" in env:
        try:
            num, pid = int(env["OVSEG_NUM_PROCESSES"]), int(env["OVSEG_PROCESS_ID"])
        except KeyError as e:
            raise RuntimeError(f"OVSEG_COORDINATOR is set but {e.args[0]} is not; set OVSEG_NUM_PROCESSES "
                               "and OVSEG_PROCESS_ID for every process") from None
        if env.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=env["OVSEG_COORDINATOR"], num_processes=num,
                                   process_id=pid)
    elif env.get("OVSEG_DISTRIBUTED", "0") not in ("", "0"):
        jax.distributed.initialize()
    else:
        return
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())


def make_mesh(axes: Sequence[Sequence[Any]], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """`[(name, size)]` with at most one -1 -> a `Mesh` over all (or the given) devices."""
    devices = list(jax.devices() if devices is None else devices)
    names = [str(a[0]) for a in axes]
    sizes = [int(a[1]) for a in axes]
    if DATA_AXIS not in names:
        raise ValueError(f"config.mesh must have a {DATA_AXIS!r} axis; got {names}")
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh: at most one axis may have size -1; got {list(zip(names, sizes))}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"config.mesh {list(zip(names, sizes))}: {len(devices)} devices are not "
                             f"divisible by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"config.mesh {list(zip(names, sizes))} needs {int(np.prod(sizes))} devices; "
                         f"{len(devices)} are available")
    return Mesh(np.asarray(devices).reshape(sizes), tuple(names))


def _fsdp_spec(shape: Sequence[int], data_size: int) -> P:
    dims = sorted(range(len(shape)), key=lambda d: -shape[d])
    for d in dims:
        if shape[d] % data_size == 0 and shape[d] >= data_size:
            spec = [None] * len(shape)
            spec[d] = DATA_AXIS
            return P(*spec)
    return P()


def param_specs(shapes: Mapping[str, Sequence[int]], rules: Sequence[Sequence[Any]], mesh: Mesh,
                fsdp_min_size: int | None = None, *, log_matches: bool = False) -> dict[str, P]:
    """`{path: shape}` -> `{path: PartitionSpec}` from the rule table (see the module docstring)."""
    data_size = mesh.shape[DATA_AXIS]
    matched = match_rules("sharding.rules", rules, shapes, None, log_matches=log_matches)
    out = {}
    for path, shape in shapes.items():
        spec = matched[path]
        if spec is None:
            big = fsdp_min_size and int(np.prod(shape)) >= fsdp_min_size
            spec = "fsdp" if big else ()
        if spec == "fsdp":
            out[path] = _fsdp_spec(shape, data_size)
            continue
        spec = tuple(spec)
        if len(spec) > len(shape):
            raise ValueError(f"config.sharding rule for {path!r}: spec {spec} has more entries than "
                             f"the parameter's {len(shape)} dimensions {tuple(shape)}")
        for dim, axis in zip(shape, spec):
            names = axis if isinstance(axis, (tuple, list)) else (axis,)
            size = int(np.prod([mesh.shape[a] for a in names if a is not None]))
            if dim % size:
                raise ValueError(f"config.sharding rule for {path!r}: dimension {dim} is not divisible "
                                 f"by mesh axes {axis} of size {size}")
        out[path] = P(*spec)
    return out


def follow_params(tree: Any, param_shardings: Mapping[str, NamedSharding], mesh: Mesh) -> Any:
    """Shardings for an optimiser-state pytree: a leaf under a dict key that is a parameter path
    and has that parameter's rank takes its sharding; everything else is replicated."""
    replicated = NamedSharding(mesh, P())

    def pick(path, leaf):
        for key in reversed(path):
            name = getattr(key, "key", None)
            if isinstance(name, str) and name in param_shardings:
                sharding = param_shardings[name]
                if len(sharding.spec) <= len(getattr(leaf, "shape", ())):
                    return sharding
                break
        return replicated

    return jax.tree_util.tree_map_with_path(pick, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over "data", the rest replicated."""
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_divisible(global_batch: int, mesh: Mesh) -> None:
    n = mesh.shape[DATA_AXIS]
    if global_batch % n:
        raise ValueError(f"global batch size {global_batch} is not divisible by the {n} devices of the "
                         f"{DATA_AXIS!r} mesh axis")
