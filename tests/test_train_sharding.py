"""Mesh construction and the (regex -> PartitionSpec) parameter rules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

from ovseg_jax.training import sharding


def test_param_specs_rules_fsdp_and_replication():
    mesh = AbstractMesh((4, 2), ("data", "model"))
    shapes = {"visual/mlp/c_fc/kernel": (32, 64), "token_embedding/embedding": (1000, 48),
              "visual/ln/scale": (32,), "odd/kernel": (7, 9), "explicit/kernel": (8, 6)}
    rules = [(r"c_fc/kernel$", (None, "model")), (r"^explicit/", "fsdp")]
    specs = sharding.param_specs(shapes, rules, mesh, fsdp_min_size=1000)
    assert specs["visual/mlp/c_fc/kernel"] == P(None, "model")
    assert specs["token_embedding/embedding"] == P("data", None)  # largest dim divisible by 4
    assert specs["explicit/kernel"] == P("data", None)
    assert specs["visual/ln/scale"] == P()  # below fsdp_min_size
    assert specs["odd/kernel"] == P()  # nothing divisible by the data axis


def test_param_specs_reject_indivisible_rule():
    mesh = AbstractMesh((4, 2), ("data", "model"))
    with pytest.raises(ValueError, match="c_fc/kernel.*dimension 63 is not divisible"):
        sharding.param_specs({"c_fc/kernel": (32, 63)}, [(r"c_fc", (None, "model"))], mesh)


def test_make_mesh_sizes_and_errors():
    n = jax.device_count()
    mesh = sharding.make_mesh([("data", -1), ("model", 1)])
    assert dict(mesh.shape) == {"data": n, "model": 1}
    with pytest.raises(ValueError, match="needs"):
        sharding.make_mesh([("data", n + 1)])
    with pytest.raises(ValueError, match="'data' axis"):
        sharding.make_mesh([("batch", -1)])


def test_optimizer_moments_follow_their_parameter():
    mesh = sharding.make_mesh([("data", -1)])
    params = {"a/kernel": jnp.zeros((4, 2)), "b/bias": jnp.zeros(2)}
    shardings = {"a/kernel": NamedSharding(mesh, P("data")), "b/bias": NamedSharding(mesh, P())}
    state = jax.eval_shape(optax.adamw(1e-3).init, params)
    out = sharding.follow_params(state, shardings, mesh)
    mu = out[0].mu
    assert mu["a/kernel"] is shardings["a/kernel"] and out[0].nu["a/kernel"] is shardings["a/kernel"]
    assert out[0].count.spec == P()
