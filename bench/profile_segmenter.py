"""Where the segmenter training step's time goes: each component of the Swin-B MaskFormer step
(reference 3) timed forward and forward + backward, in float32 and bfloat16 side by side, then
the whole trainer step; optionally a `jax.profiler` trace of one step.

    .venv/bin/python bench/profile_segmenter.py                    # 128 px crops, batch 1
    .venv/bin/python bench/profile_segmenter.py --size 256 --batch 2 --trace /tmp/seg_trace

Components (random weights, the step's shapes): the Swin-B backbone (with stochastic depth), the
pixel decoder, the 6-layer transformer decoder, the heads (class MLP against the 171-class text
bank, mask MLP and the mask einsum), the Hungarian matching of the 6 outputs (costs, then the
on-device assignment) and the deep-supervised loss (matching included) w.r.t. the outputs.
Forward + backward is the gradient w.r.t. the component's parameters and inputs of a fixed
random projection of its outputs. Each timing is the median of `--iters` calls made in rounds
that alternate the dtypes, so a shared machine's load hits both alike (the full step: 2 calls
after an untimed one in each round, as in a training loop). The optimizer row is the
trainer's gradient clipping + AdamW update of the ~107M trained parameters; the full step is the
trainer's compiled step, as `bench/train_step.py --model swin_b` runs it.
`--trace DIR` writes a `jax.profiler` trace of one float32 and one bfloat16 step (open the
`.trace.json.gz` in https://ui.perfetto.dev or DIR in TensorBoard's profile plugin).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import train_step  # bench/train_step.py: the segmenter batch and the trainer step
from common import seconds  # bench/common.py
from ovseg_jax.losses.mask_losses import LossWeights, maskformer_loss
from ovseg_jax.losses.matcher import hungarian_match, matching_cost
from ovseg_jax.models.layers import einsum
from ovseg_jax.models.maskformer import Segmenter, SegmenterConfig, normalize_images, open_vocab_logits
from ovseg_jax.training.trainer import Trainer

DTYPES = ("float32", "bfloat16")
STEP = "full train step"


class Heads(nnx.Module):
    """The segmenter's prediction heads alone (their gradient is not the whole model's)."""

    def __init__(self, segmenter: Segmenter):
        self.class_embed, self.mask_embed = segmenter.class_embed, segmenter.mask_embed
        self.non_object_embedding = segmenter.non_object_embedding


def projection_loss(outputs, seed: int = 1) -> Callable:
    """A fixed random linear function of `outputs`' floating leaves (the cotangent of the backward)."""
    leaves = [x for x in jax.tree.leaves(outputs) if jnp.issubdtype(x.dtype, jnp.floating)]
    rs = np.random.RandomState(seed)
    weights = [jnp.asarray(rs.randn(*x.shape), jnp.float32) for x in leaves]

    def loss(out):
        floats = [x for x in jax.tree.leaves(out) if jnp.issubdtype(x.dtype, jnp.floating)]
        return sum(jnp.vdot(x.astype(jnp.float32), w) for x, w in zip(floats, weights))

    return loss


def component_fns(module: nnx.Module, call: Callable, inputs: tuple) -> tuple[Callable, Callable, object]:
    """(forward, forward + backward) of `call(module, *inputs)`, jitted and bound to their
    arguments, and the forward's outputs (the next component's inputs)."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def forward(params, *xs):
        return call(nnx.merge(graphdef, params, rest), *xs)

    outputs = jax.jit(forward)(params, *inputs)
    project = projection_loss(outputs)
    fwd = jax.jit(forward)
    bwd = jax.jit(jax.grad(lambda p, *xs: project(forward(p, *xs)), argnums=tuple(range(1 + len(inputs)))))
    return (lambda: fwd(params, *inputs)), (lambda: bwd(params, *inputs)), outputs


def segmenter_components(batch: dict, dtype: str) -> dict[str, Callable]:
    """{row name: no-argument function running that piece} for one dtype."""
    config = SegmenterConfig.swin_b()
    segmenter = Segmenter(config, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0))
    rs = np.random.RandomState(0)
    bank = rs.randn(train_step.SEG_CLASSES, config.clip_dim).astype(np.float32)
    bank = jnp.asarray(bank / np.linalg.norm(bank, axis=-1, keepdims=True))
    key = jax.random.key(0)
    images = normalize_images(jnp.asarray(batch["image"]))
    targets = {k: jnp.asarray(batch[k]) for k in ("masks", "classes", "valid")}
    fns = {}

    fns["backbone (Swin-B) fwd"], fns["backbone (Swin-B) fwd+bwd"], feats = component_fns(
        segmenter.backbone, lambda m, x: m(x, deterministic=False, rngs=nnx.Rngs(dropout=key)), (images,))
    feats = {k: feats[k] for k in segmenter.in_features}
    fns["pixel decoder fwd"], fns["pixel decoder fwd+bwd"], mask_features = component_fns(
        segmenter.pixel_decoder, lambda m, f: m(f), (feats,))
    fns["transformer decoder fwd"], fns["transformer decoder fwd+bwd"], hs = component_fns(
        segmenter.transformer_decoder, lambda m, x: m(x, deterministic=False, rngs=nnx.Rngs(dropout=key)),
        (feats[segmenter.in_features[-1]],))

    def heads(m, hs, mask_features):
        logits = open_vocab_logits(m.class_embed(hs), bank, m.non_object_embedding[...])
        return logits, einsum("lbqc,bhwc->lbqhw", m.mask_embed(hs), mask_features, out_dtype=jnp.float32)

    fns["heads (class, mask) fwd"], fns["heads (class, mask) fwd+bwd"], (logits, masks) = component_fns(
        Heads(segmenter), heads, (hs, mask_features))
    outputs = {"pred_logits": logits[-1], "pred_masks": masks[-1],
               "aux": [{"pred_logits": logits[i], "pred_masks": masks[i]} for i in range(len(hs) - 1)]}

    @jax.jit
    def match(outputs, targets):
        per_output = [outputs, *outputs["aux"]]
        cost = jnp.stack([matching_cost(o["pred_logits"], o["pred_masks"], targets) for o in per_output])
        layers, b, q, g = cost.shape
        return hungarian_match(cost.reshape(layers * b, q, g), jnp.tile(targets["valid"], (layers, 1)))

    # targets are arguments, not closed-over constants XLA would fold
    loss_fwd = jax.jit(lambda o, t: maskformer_loss(o, t, weights=LossWeights())[0])
    loss_bwd = jax.jit(jax.grad(lambda o, t: maskformer_loss(o, t, weights=LossWeights())[0]))
    fns["matching (costs + Hungarian, 6 outputs)"] = lambda: match(outputs, targets)
    fns["loss (matching, CE, focal, dice) fwd"] = lambda: loss_fwd(outputs, targets)
    fns["loss (matching, CE, focal, dice) fwd+bwd"] = lambda: loss_bwd(outputs, targets)
    with tempfile.TemporaryDirectory() as workdir:
        config = train_step.segmenter_config(len(batch["image"]), workdir)
        config.dtype = dtype
        trainer = Trainer(config)
    # copies: the step below donates the trainer's state
    trained = {p: jnp.copy(trainer.state["params"][p]) for p in trainer.trainable}
    opt_state = jax.tree.map(jnp.copy, trainer.state["opt_state"])
    grads = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), trained)
    update = jax.jit(trainer.tx.update)
    fns["optimizer (clipping + AdamW update)"] = lambda: update(grads, opt_state, trained)
    fns[STEP], _, _ = train_step.trainer_step(config, batch, dtype, trainer)
    return fns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128, help="square crop side, pixels (multiple of 32)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=5, help="timed rounds per row (median reported)")
    parser.add_argument("--trace", type=Path, help="write a jax.profiler trace of one step per dtype here")
    args = parser.parse_args()
    print(f"Swin-B segmenter step, {args.size}x{args.size} crops, batch {args.batch}, "
          f"{jax.device_count()} {jax.devices()[0].device_kind} device(s), jax {jax.__version__}", flush=True)
    batch = train_step.segmenter_batch(args.batch, args.size)
    fns = {}
    for dtype in DTYPES:
        t0 = time.perf_counter()
        fns[dtype] = segmenter_components(batch, dtype)
        for fn in fns[dtype].values():  # compile and warm up
            jax.block_until_ready(fn())
        print(f"  {dtype}: built and compiled in {time.perf_counter() - t0:.0f} s", flush=True)
    times = {dtype: {name: [] for name in fns[dtype]} for dtype in DTYPES}
    for r in range(args.iters):
        order = DTYPES if r % 2 == 0 else DTYPES[::-1]
        for name in fns[DTYPES[0]]:
            if name != STEP:
                for dtype in order:
                    times[dtype][name].append(seconds(fns[dtype][name]))
        # The step as a training loop runs it, several in a row: after other programs its first
        # call runs 1.5-2x slower (its large buffers are allocated and page-faulted afresh).
        for dtype in order:
            seconds(fns[dtype][STEP])
            times[dtype][STEP] += [seconds(fns[dtype][STEP]) for _ in range(2)]
    median = {d: {n: statistics.median(t) for n, t in times[d].items()} for d in DTYPES}
    step = STEP
    print("\n| component | float32 ms | bfloat16 ms | bf16 speed-up | share of the float32 step |")
    print("|---|---|---|---|---|")
    for name in fns[DTYPES[0]]:
        f32, bf16 = median["float32"][name], median["bfloat16"][name]
        share = "" if name == step or name.endswith(" fwd") else f"{100 * f32 / median['float32'][step]:.0f}%"
        print(f"| {name} | {1e3 * f32:.0f} | {1e3 * bf16:.0f} | {f32 / bf16:.2f}x | {share} |")
    print("(fwd+bwd rows include their forward; the step runs each fwd+bwd row and the optimizer once.)")
    if args.trace:
        for dtype in DTYPES:
            with jax.profiler.trace(str(args.trace / dtype), create_perfetto_trace=True):
                jax.block_until_ready(fns[dtype][step]())
        print(f"traces of one step per dtype under {args.trace}/<dtype> (perfetto: *.trace.json.gz)")


if __name__ == "__main__":
    main()
