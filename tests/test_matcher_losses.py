"""On-device Hungarian matching against scipy; matching costs and losses against transformers' torch
MaskFormer matcher and loss (which follow the original's reference 3.2-3.3 conventions)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from transformers.models.maskformer.modeling_maskformer import (MaskFormerHungarianMatcher, MaskFormerLoss,
                                                                 pair_wise_dice_loss, pair_wise_sigmoid_focal_loss)

from ovseg_jax.losses.mask_losses import maskformer_loss
from ovseg_jax.losses.matcher import LossWeights, hungarian_match, matching_cost

TOL = 1e-4


def random_costs(rs, batch, queries, gts, kind):
    if kind == "normal":
        return rs.randn(batch, queries, gts).astype(np.float32) * 10
    if kind == "scales":  # one magnitude per matrix, from 1e-3 to 1e4, plus a large offset on some
        scale = 10.0 ** rs.uniform(-3, 4, (batch, 1, 1))
        offset = np.where(rs.rand(batch, 1, 1) < 0.5, 0.0, 1e3)
        return (rs.randn(batch, queries, gts) * scale + offset).astype(np.float32)
    cost = rs.randint(0, 3, (batch, queries, gts)).astype(np.float32)  # many ties
    if kind == "duplicates":
        cost[:, 1] = cost[:, 0]  # identical queries
        cost[:, :, -1] = cost[:, :, 0]  # identical ground truth
    return cost


@pytest.mark.parametrize("queries,gts,kind", [(10, 4, "normal"), (7, 7, "ties"), (12, 7, "duplicates"),
                                              (30, 30, "normal"), (9, 1, "ties"), (16, 11, "scales")])
def test_hungarian_match_is_optimal(queries, gts, kind):
    rs = np.random.RandomState(queries * 100 + gts)
    batch = 250
    cost = random_costs(rs, batch, queries, gts, kind)
    valid = rs.rand(batch, gts) > 0.3
    valid[0] = True  # at least one fully valid and one empty image
    valid[1] = False
    index, out_valid = (np.asarray(a) for a in hungarian_match(jnp.asarray(cost), jnp.asarray(valid)))
    np.testing.assert_array_equal(out_valid, valid)
    for b in range(batch):
        assert len(set(index[b].tolist())) == gts, "queries must be distinct"
        cols = np.flatnonzero(valid[b])
        if len(cols) == 0:
            continue
        sub = cost[b][:, cols]
        rows, picked = linear_sum_assignment(sub)
        ours = cost[b][index[b, cols], cols].astype(np.float64).sum()
        assert ours == pytest.approx(sub[rows, picked].astype(np.float64).sum(), rel=1e-5, abs=1e-3)


def test_hungarian_match_survives_non_finite_costs():
    cost = np.full((2, 5, 3), np.nan, np.float32)
    cost[1, 0, 0] = np.inf
    index, _ = hungarian_match(jnp.asarray(cost), jnp.ones((2, 3), bool))
    assert all(len(set(row)) == 3 for row in np.asarray(index).tolist())


def test_hungarian_match_avoids_non_finite_pairs():
    """NaN and +-inf are a penalty (as in transformers' matcher): used only when nothing else is left."""
    rs = np.random.RandomState(1)
    cost = rs.rand(3, 6, 4).astype(np.float32)
    cost[0, 0, :] = -np.inf  # query 0 of image 0 is unusable
    cost[1, :, 0] = np.nan
    cost[1, 5, 0] = 0.5  # ground truth 0 of image 1 has one usable query
    cost[2, 2:, 1] = np.inf
    index = np.asarray(hungarian_match(jnp.asarray(cost), jnp.ones((3, 4), bool))[0])
    for b in range(3):
        finite = np.where(np.isfinite(cost[b]), cost[b], 1e6)
        rows, cols = linear_sum_assignment(finite)
        assert finite[index[b], np.arange(4)].sum() == pytest.approx(finite[rows, cols].sum(), abs=1e-5)
    assert 0 not in index[0] and index[1, 0] == 5 and index[2, 1] in (0, 1)


def test_hungarian_match_rejects_bad_shapes():
    with pytest.raises(ValueError, match="Q=2 < G=3"):
        hungarian_match(jnp.zeros((1, 2, 3)), jnp.ones((1, 3), bool))
    with pytest.raises(ValueError, match=r"gt_valid \[B, G\]"):
        hungarian_match(jnp.zeros((2, 5, 3)), jnp.ones((2, 5), bool))


def test_hungarian_match_solves_bfloat16_costs_in_float32():
    cost = np.random.RandomState(2).rand(4, 9, 6).astype(np.float32)
    cost16 = jnp.asarray(cost, jnp.bfloat16)
    index = np.asarray(hungarian_match(cost16, jnp.ones((4, 6), bool))[0])
    exact = np.asarray(cost16, np.float64)
    for b in range(4):
        rows, cols = linear_sum_assignment(exact[b])
        assert exact[b][index[b], np.arange(6)].sum() == pytest.approx(exact[b][rows, cols].sum(), abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Against transformers' MaskFormer matcher and loss

B, Q, C, G, PRED, FULL = 4, 8, 5, 4, 6, 24


@pytest.fixture(scope="module")
def problem():
    """Random predictions with aux outputs and padded ground truth (image 2 has no valid mask, image 3
    has gaps)."""
    rs = np.random.RandomState(0)
    layers = [dict(pred_logits=rs.randn(B, Q, C + 1).astype(np.float32) * 2,
                   pred_masks=rs.randn(B, Q, PRED, PRED).astype(np.float32) * 3) for _ in range(3)]
    masks = (rs.rand(B, G, FULL, FULL) > 0.6).astype(np.uint8)
    classes = rs.randint(0, C, (B, G)).astype(np.int32)
    valid = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 0, 1]], bool)
    masks[~valid] = 0
    classes[~valid] = 0
    outputs = {**{k: jnp.asarray(v) for k, v in layers[-1].items()},
               "aux": [{k: jnp.asarray(v) for k, v in layer.items()} for layer in layers[:-1]]}
    targets = {"masks": jnp.asarray(masks), "classes": jnp.asarray(classes), "valid": jnp.asarray(valid)}
    torch_targets = ([torch.from_numpy(masks[b][valid[b]]).float() for b in range(B)],
                     [torch.from_numpy(classes[b][valid[b]]).long() for b in range(B)])
    return layers, outputs, targets, torch_targets, valid


@pytest.mark.slow
def test_matching_cost_matches_transformers_terms(problem):
    layers, outputs, targets, (t_masks, t_classes), valid = problem
    weights = LossWeights(ce=1.0, mask=20.0, dice=1.0)
    got = np.asarray(matching_cost(outputs["pred_logits"], outputs["pred_masks"], targets, weights))
    for b in range(B):
        logits = torch.from_numpy(layers[-1]["pred_logits"][b])
        masks = torch.from_numpy(layers[-1]["pred_masks"][b]).flatten(1)
        tgt = torch.nn.functional.interpolate(t_masks[b][:, None], size=(PRED, PRED), mode="nearest")[:, 0].flatten(1)
        ref = (-logits.softmax(-1)[:, t_classes[b]] + 20 * pair_wise_sigmoid_focal_loss(masks, tgt)
               + pair_wise_dice_loss(masks, tgt))
        np.testing.assert_allclose(got[b][:, valid[b]], ref.numpy(), atol=TOL)


def test_matching_matches_transformers_matcher(problem):
    """Same assignment cost as transformers' matcher (scipy) for every decoder output; indices may
    differ only between equal-cost assignments."""
    layers, _, targets, (t_masks, t_classes), valid = problem
    matcher = MaskFormerHungarianMatcher(cost_class=1.0, cost_mask=20.0, cost_dice=1.0)
    for layer in layers:
        cost = matching_cost(jnp.asarray(layer["pred_logits"]), jnp.asarray(layer["pred_masks"]), targets)
        index, _ = hungarian_match(cost, targets["valid"])
        cost, index = np.asarray(cost, np.float64), np.asarray(index)
        ref = matcher(torch.from_numpy(layer["pred_masks"]), torch.from_numpy(layer["pred_logits"]), t_masks, t_classes)
        for b, (ref_queries, ref_gts) in enumerate(ref):
            cols = np.flatnonzero(valid[b])
            sub = cost[b][:, cols]
            assert sub[index[b, cols], np.arange(len(cols))].sum() == pytest.approx(
                sub[ref_queries.numpy(), ref_gts.numpy()].sum(), abs=1e-5)
            assert sorted(ref_gts.tolist()) == list(range(len(cols)))


@pytest.mark.slow
def test_losses_match_transformers(problem):
    layers, outputs, targets, (t_masks, t_classes), valid = problem
    matcher = MaskFormerHungarianMatcher(cost_class=1.0, cost_mask=20.0, cost_dice=1.0)
    criterion = MaskFormerLoss(num_labels=C, matcher=matcher, eos_coef=0.1,
                               weight_dict={"loss_cross_entropy": 1.0, "loss_mask": 20.0, "loss_dice": 1.0})
    aux = [{"masks_queries_logits": torch.from_numpy(layer["pred_masks"]),
            "class_queries_logits": torch.from_numpy(layer["pred_logits"])} for layer in layers[:-1]]
    ref = criterion(torch.from_numpy(layers[-1]["pred_masks"]), torch.from_numpy(layers[-1]["pred_logits"]),
                    t_masks, t_classes, auxiliary_predictions=aux)
    total, metrics = maskformer_loss(outputs, targets, weights=LossWeights(1.0, 20.0, 1.0), no_object_weight=0.1)
    expected_total = 0.0
    for suffix in ["", "_0", "_1"]:
        for ours, theirs, w in [("loss_ce", "loss_cross_entropy", 1.0), ("loss_mask", "loss_mask", 20.0),
                                ("loss_dice", "loss_dice", 1.0)]:
            np.testing.assert_allclose(metrics[ours + suffix], ref[theirs + suffix].item(), atol=TOL, rtol=TOL,
                                       err_msg=ours + suffix)
            expected_total += w * ref[theirs + suffix].item()
    assert float(total) == pytest.approx(expected_total, rel=1e-5)


def _transformers_loss_and_grads(layers, t_masks, t_classes, num_labels):
    """transformers' weighted total loss (1 CE + 20 focal + 1 dice per output) and its gradient
    w.r.t. every output's pred_logits / pred_masks (numpy, in `layers` order)."""
    matcher = MaskFormerHungarianMatcher(cost_class=1.0, cost_mask=20.0, cost_dice=1.0)
    criterion = MaskFormerLoss(num_labels=num_labels, matcher=matcher, eos_coef=0.1,
                               weight_dict={"loss_cross_entropy": 1.0, "loss_mask": 20.0, "loss_dice": 1.0})
    logits = [torch.tensor(layer["pred_logits"], requires_grad=True) for layer in layers]
    masks = [torch.tensor(layer["pred_masks"], requires_grad=True) for layer in layers]
    aux = [{"masks_queries_logits": m, "class_queries_logits": c} for m, c in zip(masks[:-1], logits[:-1])]
    losses = criterion(masks[-1], logits[-1], t_masks, t_classes, auxiliary_predictions=aux)
    weight = {"loss_cross_entropy": 1.0, "loss_mask": 20.0, "loss_dice": 1.0}
    total = sum(weight[k.rsplit("_", 1)[0] if k[-1].isdigit() else k] * v for k, v in losses.items())
    total.backward()
    return total.item(), [(c.grad.numpy(), m.grad.numpy()) for c, m in zip(logits, masks)]


@pytest.mark.parametrize("full", [24, 21], ids=["target_4x_prediction", "non_integer_ratio"])
def test_loss_value_and_gradient_match_transformers_with_many_padded_slots(full):
    """More ground-truth slots than one chunk of the full-resolution loop, valid ones scattered
    between padding; the target 4x the prediction (phase-wise upsample) or not a multiple of it
    (matrix resize). Loss and gradient w.r.t. every output equal transformers' (torch autograd)."""
    import jax

    rs = np.random.RandomState(full)
    batch, queries, gts = 3, 12, 9
    layers = [dict(pred_logits=rs.randn(batch, queries, C + 1).astype(np.float32) * 2,
                   pred_masks=rs.randn(batch, queries, PRED, PRED).astype(np.float32) * 3) for _ in range(2)]
    valid = np.zeros((batch, gts), bool)
    valid[0, [0, 3, 4, 8]] = True  # gaps and a valid last slot
    valid[1, :7] = True  # more valid slots than one chunk (MASK_CHUNK = 4)
    masks = (rs.rand(batch, gts, full, full) > 0.6).astype(np.uint8) * valid[..., None, None]
    classes = np.where(valid, rs.randint(0, C, (batch, gts)), 0).astype(np.int32)
    outputs = {**{k: jnp.asarray(v) for k, v in layers[-1].items()},
               "aux": [{k: jnp.asarray(v) for k, v in layers[0].items()}]}
    targets = {"masks": jnp.asarray(masks), "classes": jnp.asarray(classes), "valid": jnp.asarray(valid)}
    ref_total, ref_grads = _transformers_loss_and_grads(
        layers, [torch.from_numpy(masks[b][valid[b]]).float() for b in range(batch)],
        [torch.from_numpy(classes[b][valid[b]]).long() for b in range(batch)], C)
    total, grads = jax.jit(jax.value_and_grad(lambda o: maskformer_loss(o, targets)[0]))(outputs)
    assert float(total) == pytest.approx(ref_total, rel=1e-5)
    for got, (ref_logits, ref_masks) in zip([grads["aux"][0], grads], ref_grads):
        np.testing.assert_allclose(got["pred_logits"], ref_logits, atol=1e-6, rtol=1e-4)
        np.testing.assert_allclose(got["pred_masks"], ref_masks, atol=1e-6, rtol=1e-4)


@pytest.mark.slow
def test_loss_with_axis_name_equals_the_global_batch_loss(problem):
    """Split over a named data axis (vmap stands in for shard_map), the psum'd loss is the global one."""
    import jax

    _, outputs, targets, _, _ = problem
    total, metrics = maskformer_loss(outputs, targets)
    halves = jax.tree.map(lambda x: x.reshape(2, B // 2, *x.shape[1:]), (outputs, targets))
    split_total, split_metrics = jax.vmap(lambda o, t: maskformer_loss(o, t, axis_name="data"),
                                          axis_name="data")(*halves)
    np.testing.assert_allclose(split_total, [total, total], rtol=1e-6)
    for name, value in metrics.items():
        np.testing.assert_allclose(split_metrics[name], [value, value], rtol=1e-6, err_msg=name)


SHARDED_SCRIPT = """
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ovseg_jax.losses.mask_losses import maskformer_loss
rs = np.random.RandomState(0)
B, Q, C, G = 8, 10, 5, 4
layers = [dict(pred_logits=rs.randn(B, Q, C + 1).astype(np.float32),
               pred_masks=rs.randn(B, Q, 6, 6).astype(np.float32)) for _ in range(3)]
outputs = {**layers[-1], "aux": layers[:-1]}
valid = rs.rand(B, G) > 0.3
targets = {"masks": (rs.rand(B, G, 24, 24) > 0.5).astype(np.uint8) * valid[..., None, None],
           "classes": rs.randint(0, C, (B, G)).astype(np.int32), "valid": valid}
loss_and_grad = jax.jit(jax.value_and_grad(lambda o, t: maskformer_loss(o, t)[0]))
ref_loss, ref_grad = loss_and_grad(outputs, targets)
mesh = Mesh(np.array(jax.devices()), ("data",))
shard = lambda tree: jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P("data"))), tree)
loss, grad = loss_and_grad(shard(outputs), shard(targets))
np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8), grad, ref_grad)
assert grad["pred_masks"].sharding.spec == P("data")
in_shard_map = jax.jit(jax.shard_map(lambda o, t: maskformer_loss(o, t, axis_name="data")[0], mesh=mesh,
                                     in_specs=(P("data"), P("data")), out_specs=P()))
np.testing.assert_allclose(in_shard_map(outputs, targets), ref_loss, rtol=1e-6)
print("ok", jax.device_count())
"""


@pytest.mark.slow
def test_loss_on_batch_sharded_arrays_and_in_shard_map():
    """On 4 simulated devices: jit on batch-sharded global arrays and shard_map with axis_name both
    give the single-device loss (and gradient)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    # The session's XLA_FLAGS kept (tests/conftest.py); the scheduler flag as in the other simulated
    # multi-device runs (its collectives can deadlock when programs come from the compilation cache).
    flags = "--xla_force_host_platform_device_count=4 --xla_cpu_enable_concurrency_optimized_scheduler=false"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(root),
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}"}
    result = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], cwd=root, env=env, capture_output=True,
                            text=True, timeout=170)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["ok", "4"]


def test_loss_rejects_inputs_that_do_not_fit(problem):
    _, outputs, targets, _, _ = problem
    with pytest.raises(ValueError, match=r"targets lack \['valid'\]"):
        maskformer_loss(outputs, {k: v for k, v in targets.items() if k != "valid"})
    with pytest.raises(ValueError, match="with B = 4 from pred_logits"):
        maskformer_loss(outputs, {k: v[:3] for k, v in targets.items()})
    bad_aux = {**outputs, "aux": [{**outputs["aux"][0], "pred_masks": outputs["pred_masks"][:, :, :4]}]}
    with pytest.raises(ValueError, match=r"aux\[0\] has shapes"):
        maskformer_loss(bad_aux, targets)


@pytest.mark.slow
def test_loss_gradients_are_finite_and_reach_every_output(problem):
    import jax

    _, outputs, targets, _, _ = problem
    grads = jax.grad(lambda o: maskformer_loss(o, targets)[0])(outputs)
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
        assert np.isfinite(np.asarray(leaf)).all(), path
        assert np.abs(np.asarray(leaf)).sum() > 0, path
