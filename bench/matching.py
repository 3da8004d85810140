"""Matching + loss time per batch: on-device JAX vs the original's host-side scipy matching.

    .venv/bin/python bench/matching.py                   # 8 images x 100 queries x 50 GT masks
    .venv/bin/python bench/matching.py --pred 40 --full 160   # smaller masks (quick CPU run)

Rows: `hungarian_match` alone (jitted, batched) vs `scipy.optimize.linear_sum_assignment` per
image on the same cost matrices; the full deep-supervised loss (6 decoder outputs: matching costs,
6 batched matchings, CE/focal/dice at the target resolution) jitted, vs transformers' torch
`MaskFormerLoss` (scipy matching per image and layer) on the same inputs.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from ovseg_jax.losses.mask_losses import maskformer_loss
from ovseg_jax.losses.matcher import hungarian_match


def timed(fn, iters: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(iters):
        jax.block_until_ready(fn())
    return first, (time.perf_counter() - t0) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--gts", type=int, default=50)
    parser.add_argument("--classes", type=int, default=171)
    parser.add_argument("--pred", type=int, default=160, help="predicted mask side (stride 4)")
    parser.add_argument("--full", type=int, default=640, help="target mask side")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()
    b, q, g = args.batch, args.queries, args.gts
    rs = np.random.RandomState(0)

    cost = rs.rand(b, q, g).astype(np.float32)
    valid = np.ones((b, g), bool)
    rows = []
    first, step = timed(lambda: hungarian_match(jnp.asarray(cost), jnp.asarray(valid)), args.iters)
    rows.append(("hungarian_match (JAX, batched)", first, step))
    t0 = time.perf_counter()
    for _ in range(args.iters):
        for image in cost:
            linear_sum_assignment(image)
    rows.append(("scipy linear_sum_assignment (host loop)", 0.0, (time.perf_counter() - t0) / args.iters))

    layers = [dict(pred_logits=rs.randn(b, q, args.classes + 1).astype(np.float32),
                   pred_masks=rs.randn(b, q, args.pred, args.pred).astype(np.float32)) for _ in range(6)]
    masks = (rs.rand(b, g, args.full, args.full) > 0.5).astype(np.uint8)
    classes = rs.randint(0, args.classes, (b, g)).astype(np.int32)
    outputs = {**{k: jnp.asarray(v) for k, v in layers[-1].items()},
               "aux": [{k: jnp.asarray(v) for k, v in layer.items()} for layer in layers[:-1]]}
    targets = {"masks": jnp.asarray(masks), "classes": jnp.asarray(classes), "valid": jnp.asarray(valid)}
    loss = jax.jit(lambda o, t: maskformer_loss(o, t)[0])
    first, step = timed(lambda: loss(outputs, targets), args.iters)
    rows.append(("maskformer_loss, 6 outputs (JAX, jit)", first, step))
    if not args.no_torch:
        import torch
        from transformers.models.maskformer.modeling_maskformer import MaskFormerHungarianMatcher, MaskFormerLoss

        criterion = MaskFormerLoss(args.classes, MaskFormerHungarianMatcher(1.0, 20.0, 1.0), eos_coef=0.1,
                                   weight_dict={"loss_cross_entropy": 1.0, "loss_mask": 20.0, "loss_dice": 1.0})
        aux = [{"masks_queries_logits": torch.from_numpy(layer["pred_masks"]),
                "class_queries_logits": torch.from_numpy(layer["pred_logits"])} for layer in layers[:-1]]
        t_masks = [torch.from_numpy(m).float() for m in masks]
        t_classes = [torch.from_numpy(c).long() for c in classes]

        def torch_loss():
            return criterion(torch.from_numpy(layers[-1]["pred_masks"]), torch.from_numpy(layers[-1]["pred_logits"]),
                             t_masks, t_classes, auxiliary_predictions=aux)

        with torch.no_grad():
            first, step = timed(torch_loss, args.iters)
        rows.append((f"transformers MaskFormerLoss (torch {torch.__version__})", first, step))

    device = jax.devices()[0]
    print(f"\n{b} images x {q} queries x {g} GT masks, masks {args.pred}->{args.full} px, "
          f"{args.classes}+1 classes, on {device.platform} ({device.device_kind})")
    print(f"{'what':<48} {'first call s':>12} {'ms / batch':>11}")
    for name, first, step in rows:
        print(f"{name:<48} {first:12.2f} {1000 * step:11.1f}")


if __name__ == "__main__":
    main()
