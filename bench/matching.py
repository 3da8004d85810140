"""Matching + loss time per batch: on-device JAX vs the original's host-side scipy matching.

    .venv/bin/python bench/matching.py                        # 8 images x 100 queries x 50 GT masks, 160->640 px
    .venv/bin/python bench/matching.py --pred 40 --full 160 --torch-backward   # smaller masks, quick

Inputs: 6 decoder outputs (random logits over 171+1 classes, random mask logits at `--pred` px)
and `--gts` random ground-truth masks per image at `--full` px. Rows:
- the matching costs of the 6 outputs and their batched `hungarian_match` (jitted), and the
  `hungarian_match` call alone on those cost matrices;
- `scipy.optimize.linear_sum_assignment` per image and output on the same cost matrices (host);
- the full deep-supervised `maskformer_loss` (matching + CE/focal/dice at the target resolution),
  jitted, forward and forward+backward;
- transformers' torch `MaskFormerLoss` (scipy matching per image and output) on the same inputs,
  forward (and forward+backward with `--torch-backward`).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from ovseg_jax.losses.mask_losses import maskformer_loss
from ovseg_jax.losses.matcher import hungarian_match, matching_cost

from common import timed  # bench/common.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--gts", type=int, default=50)
    parser.add_argument("--classes", type=int, default=171)
    parser.add_argument("--outputs", type=int, default=6, help="decoder outputs (final + aux)")
    parser.add_argument("--pred", type=int, default=160, help="predicted mask side (stride 4)")
    parser.add_argument("--full", type=int, default=640, help="target mask side")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--torch-backward", action="store_true",
                        help="also time transformers' loss backward (at 640 px it needs more than 24 GB of memory)")
    args = parser.parse_args()
    b, q, g = args.batch, args.queries, args.gts
    rs = np.random.RandomState(0)
    layers = [dict(pred_logits=rs.randn(b, q, args.classes + 1).astype(np.float32) * 3,
                   pred_masks=rs.randn(b, q, args.pred, args.pred).astype(np.float32) * 3)
              for _ in range(args.outputs)]
    masks = (rs.rand(b, g, args.full, args.full) > 0.5).astype(np.uint8)
    classes = rs.randint(0, args.classes, (b, g)).astype(np.int32)
    valid = np.ones((b, g), bool)
    outputs = {**{k: jnp.asarray(v) for k, v in layers[-1].items()},
               "aux": [{k: jnp.asarray(v) for k, v in layer.items()} for layer in layers[:-1]]}
    targets = {"masks": jnp.asarray(masks), "classes": jnp.asarray(classes), "valid": jnp.asarray(valid)}
    device = jax.devices()[0]
    print(f"\n{b} images x {q} queries x {g} GT masks x {args.outputs} decoder outputs, masks "
          f"{args.pred}->{args.full} px, {args.classes}+1 classes; JAX on {device.platform} "
          f"({device.device_kind}), {args.iters} timed calls after the first")
    print(f"{'what':<52} {'first call s':>12} {'ms / batch':>11}", flush=True)

    def report(name: str, first: float, step: float) -> None:
        print(f"{name:<52} {first:12.2f} {1000 * step:11.1f}", flush=True)

    @jax.jit
    def costs_fn(outputs, targets):
        return jnp.stack([matching_cost(o["pred_logits"], o["pred_masks"], targets)
                          for o in [outputs, *outputs["aux"]]]).reshape(-1, q, g)

    @jax.jit
    def match_all(outputs, targets):
        cost = costs_fn(outputs, targets)
        return hungarian_match(cost, jnp.ones(cost.shape[::2], bool))[0]

    n = args.outputs * b
    first, step = timed(lambda: match_all(outputs, targets), args.iters)
    report(f"costs + hungarian_match, {n} matrices (JAX jit)", first, step)
    cost = costs_fn(outputs, targets)
    cost_valid = jnp.ones((n, g), bool)
    first, step = timed(lambda: hungarian_match(cost, cost_valid), args.iters)
    report(f"hungarian_match alone, {n} matrices (JAX jit)", first, step)
    host_cost = np.asarray(cost)
    first, step = timed(lambda: [linear_sum_assignment(c) for c in host_cost], args.iters)
    report(f"scipy linear_sum_assignment, {n} matrices (host)", first, step)

    loss = jax.jit(lambda o, t: maskformer_loss(o, t)[0])
    first, step = timed(lambda: loss(outputs, targets), args.iters)
    report(f"maskformer_loss, {args.outputs} outputs (JAX jit)", first, step)
    loss_grad = jax.jit(jax.value_and_grad(lambda o, t: maskformer_loss(o, t)[0]))
    first, step = timed(lambda: loss_grad(outputs, targets), args.iters)
    report("  + gradient (value_and_grad)", first, step)

    if not args.no_torch:
        import torch
        from transformers.models.maskformer.modeling_maskformer import MaskFormerHungarianMatcher, MaskFormerLoss

        weight_dict = {"loss_cross_entropy": 1.0, "loss_mask": 20.0, "loss_dice": 1.0}
        criterion = MaskFormerLoss(args.classes, MaskFormerHungarianMatcher(1.0, 20.0, 1.0), eos_coef=0.1,
                                   weight_dict=weight_dict)
        t_layers = [{k: torch.from_numpy(v).requires_grad_() for k, v in layer.items()} for layer in layers]
        aux = [{"masks_queries_logits": layer["pred_masks"], "class_queries_logits": layer["pred_logits"]}
               for layer in t_layers[:-1]]
        t_masks = [torch.from_numpy(m).float() for m in masks]
        t_classes = [torch.from_numpy(c).long() for c in classes]

        def torch_loss():
            terms = criterion(t_layers[-1]["pred_masks"], t_layers[-1]["pred_logits"], t_masks, t_classes,
                              auxiliary_predictions=aux)
            return sum(weight_dict[k.rstrip("_0123456789")] * v for k, v in terms.items())

        def torch_loss_backward():
            torch_loss().backward()

        with torch.no_grad():
            first, step = timed(torch_loss, args.iters)
        report(f"transformers MaskFormerLoss (torch {torch.__version__})", first, step)
        if args.torch_backward:
            first, step = timed(torch_loss_backward, args.iters)
            report("  + backward", first, step)



if __name__ == "__main__":
    main()
