"""CLIP training stages: loss, schedules and AdamW against torch; what each stage may change."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ovseg_jax.losses.contrastive import clip_contrastive_loss
from ovseg_jax.training import optim
from ovseg_jax.training.trainer import Trainer
from tests.train_helpers import PairBatches, tiny_config


def test_contrastive_loss_matches_torch_symmetric_infonce():
    rng = np.random.default_rng(0)
    img, txt = rng.standard_normal((2, 6, 5)).astype(np.float32)
    scale = np.float32(2.3)
    loss, metrics = clip_contrastive_loss(jnp.asarray(img), jnp.asarray(txt), jnp.asarray(scale))
    ti = torch.nn.functional.normalize(torch.from_numpy(img), dim=-1)
    tt = torch.nn.functional.normalize(torch.from_numpy(txt), dim=-1)
    logits = math.exp(scale) * ti @ tt.T
    labels = torch.arange(6)
    ce = torch.nn.functional.cross_entropy
    expected = (ce(logits, labels) + ce(logits.T, labels)) / 2
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["acc_i2t"]), float((logits.argmax(1) == labels).float().mean()))


def _detectron2_poly(it, base=6e-5, warmup=1500, total=120000, factor=1e-6, power=0.9):
    w = 1.0 if it >= warmup else factor * (1 - it / warmup) + it / warmup
    return base * w * (1 - it / total) ** power


def _open_clip_cosine(step, base=5e-6, warmup=100, steps=17300):
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * (1 + np.cos(np.pi * (step - warmup) / (steps - warmup))) * base


@pytest.mark.parametrize("step", [0, 1, 749, 1499, 1500, 60000, 119999])
def test_warmup_poly_is_detectron2_warmup_poly_lr(step):
    schedule = optim.warmup_poly(6e-5, 1500, 120000)
    np.testing.assert_allclose(float(schedule(step)), _detectron2_poly(step), rtol=1e-5)


@pytest.mark.parametrize("step", [0, 50, 99, 100, 101, 9000, 17299])
def test_warmup_cosine_is_open_clip_cosine_lr(step):
    schedule = optim.warmup_cosine(5e-6, 100, 17300)
    np.testing.assert_allclose(float(schedule(step)), _open_clip_cosine(step), rtol=1e-5, atol=1e-14)


@pytest.mark.slow
@pytest.mark.parametrize("norm_given", [False, True], ids=["norm_computed", "norm_given"])
def test_adamw_groups_clipping_and_freezing_match_torch(norm_given):
    """lr multiplier, weight-decay exclusion, freezing and full-model clipping vs torch.optim.AdamW,
    with the clipping norm computed by the transform or given by the caller (as the trainer does)."""
    import ml_collections

    cfg = ml_collections.ConfigDict({
        "lr": 0.05, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 0.1,
        "schedule": {"kind": "warmup_poly", "warmup_steps": 3},
        "grad_clip_norm": 0.5, "lr_mults": [(r"^backbone/", 0.1)], "wd_mults": [(r"(norm|bias)", 0.0)],
        "freeze": [r"^frozen/"], "trainable": None,
    })
    rng = np.random.default_rng(1)
    init = {"backbone/w": rng.standard_normal((4, 3)), "head/w": rng.standard_normal((3, 2)),
            "head/bias": rng.standard_normal(2), "head/norm/scale": rng.standard_normal(2),
            "frozen/w": rng.standard_normal((2, 2))}
    init = {k: v.astype(np.float32) for k, v in init.items()}
    x = rng.standard_normal((5, 4)).astype(np.float32)

    def loss_fn(p, xp):
        h = xp.tanh(xp.asarray(x) @ p["backbone/w"]) @ p["head/w"] + p["head/bias"]
        return ((h * p["head/norm/scale"]) @ p["frozen/w"]).sum() ** 2

    names = optim.trainable_paths(init, cfg)
    assert "frozen/w" not in names
    tx = optim.make_optimizer(cfg, optim.param_groups(names, cfg), total_steps=20)
    params = {k: jnp.asarray(v) for k, v in init.items()}
    opt_state = tx.init({k: params[k] for k in names})
    for _ in range(6):
        train = {k: params[k] for k in names}
        grads = jax.grad(lambda t: loss_fn({**params, **t}, jnp))(train)
        extra = {"grad_norm": optim.global_norm(grads)} if norm_given else {}
        updates, opt_state = tx.update(grads, opt_state, train, **extra)
        params = {**params, **{k: train[k] + updates[k] for k in names}}

    tp = {k: torch.tensor(v, requires_grad=k != "frozen/w") for k, v in init.items()}
    groups = [{"params": [tp["backbone/w"]], "lr": 0.005, "weight_decay": 0.1},
              {"params": [tp["head/w"]], "lr": 0.05, "weight_decay": 0.1},
              {"params": [tp["head/bias"], tp["head/norm/scale"]], "lr": 0.05, "weight_decay": 0.0}]
    topt = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(
        topt, lambda it: _detectron2_poly(it, base=1.0, warmup=3, total=20))
    trained = [tp[k] for k in names]
    for _ in range(6):
        topt.zero_grad()
        loss_fn(tp, torch).backward()
        torch.nn.utils.clip_grad_norm_(trained, 0.5)
        topt.step()
        sched.step()
    for k in init:
        np.testing.assert_allclose(np.asarray(params[k]), tp[k].detach().numpy(), rtol=2e-5, atol=1e-6, err_msg=k)
    np.testing.assert_array_equal(np.asarray(params["frozen/w"]), init["frozen/w"])


def test_clipping_uses_the_norm_it_is_given():
    """The trainer's norm is the one that scales: 4.0 given, max 1.0 -> every update x 0.25."""
    grads = {"w": jnp.array([3.0, 4.0])}  # its own norm is 5
    clip = optim.clip_by_global_norm_torch(1.0)
    given, _ = clip.update(grads, clip.init(grads), grad_norm=jnp.float32(4.0))
    computed, _ = clip.update(grads, clip.init(grads))
    np.testing.assert_allclose(given["w"], [0.75, 1.0], rtol=1e-5)
    np.testing.assert_allclose(computed["w"], [0.6, 0.8], rtol=1e-5)


def _train(stage, steps, **kw):
    trainer = Trainer(tiny_config(stage, **kw))
    if stage == "ft":  # start at the clamp, as OpenAI's weights do
        ls = trainer.state["params"]["logit_scale"]
        trainer.state["params"]["logit_scale"] = jax.device_put(jnp.float32(math.log(100)), ls.sharding)
    before = jax.device_get(trainer.state["params"])
    trainer.fit(PairBatches(8), num_steps=steps)
    return before, jax.device_get(trainer.state["params"]), trainer


@pytest.mark.slow
def test_mask_prompt_tuning_changes_only_the_mask_embedding():
    before, after, _ = _train("mpt", 3, lr=0.05)
    assert not np.array_equal(before["visual/mask_embedding"], after["visual/mask_embedding"])
    for path in before:
        if path != "visual/mask_embedding":
            assert before[path].tobytes() == after[path].tobytes(), path


@pytest.mark.slow
def test_finetune_freezes_the_text_tower_and_clamps_logit_scale():
    before, after, trainer = _train("ft", 3, lr=0.05)
    assert "visual/mask_embedding" not in before
    text = [p for p in before if not p.startswith("visual/") and p != "logit_scale"]
    visual = [p for p in before if p.startswith("visual/")]
    assert text and visual
    for path in text:
        assert before[path].tobytes() == after[path].tobytes(), path
    assert all(not np.array_equal(before[p], after[p]) for p in visual)
    assert float(after["logit_scale"]) <= math.log(100)
    assert set(trainer.trainable) == set(visual) | {"logit_scale"}


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params_and_tracks_float32_loss():
    c32, c16 = tiny_config("pretrain"), tiny_config("pretrain")
    c16.dtype = "bfloat16"
    batch = {k: jnp.asarray(v) for k, v in PairBatches(8).global_batch_at(0).items()}
    t32, t16 = Trainer(c32), Trainer(c16)
    _, m32 = t32.train_step(t32.state, batch)
    state16, m16 = t16.train_step(t16.state, batch)
    assert all(v.dtype == jnp.float32 for v in state16["params"].values())
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(state16["opt_state"]) if v.ndim)
    np.testing.assert_allclose(float(m16["loss"]), float(m32["loss"]), rtol=3e-2)
