"""Segmenter forward throughput: ovseg_jax vs transformers' torch MaskFormer, same weights.

    .venv/bin/python bench/segmenter.py                         # Swin-B, 640x640, batch 1, float32
    .venv/bin/python bench/segmenter.py --dtypes float32,bfloat16 --rounds 5
    .venv/bin/python bench/segmenter.py --batch 8 --dtypes bfloat16   # on an accelerator

Random weights: a transformers `MaskFormerForInstanceSegmentation` with OVSeg's Swin-B backbone
(embed 128, depths 2/2/18/2, heads 4/8/16/32, window 12) and decoder (6 layers, 100 queries,
hidden 256, FFN 2048), saved with save_pretrained and loaded through `ovseg_jax.segmenter.load`
(the open-vocabulary head, 768-d, against a bank of 171 classes; torch's head is a 172-way Linear).
Timed in interleaved rounds in one process (`bench/common.py`; every other round in reverse
order), the first (compiling) call apart; torch at its default thread count. Prints the first
call's seconds, images/s (median of the rounds), CPU seconds per image (process CPU time, all
threads) and the ratio to torch.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from common import environment_lines, interleaved, record  # bench/common.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (each implementation once per round)")
    parser.add_argument("--classes", type=int, default=171)
    parser.add_argument("--dtypes", type=lambda s: s.split(","), default=["float32"])
    parser.add_argument("--no-torch", action="store_true", help="skip the transformers reference")
    parser.add_argument("--record", help="append the comparisons as JSON lines here (make bench)")
    args = parser.parse_args()

    import torch
    from transformers import MaskFormerConfig, MaskFormerForInstanceSegmentation, SwinConfig

    from ovseg_jax.segmenter import load

    swin = SwinConfig(image_size=384, embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32],
                      window_size=12, drop_path_rate=0.3, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = MaskFormerConfig(backbone_config=swin, fpn_feature_size=256, mask_feature_size=256,
                              num_labels=args.classes, decoder_config=dict(
                                  model_type="detr", encoder_layers=0, d_model=256, decoder_layers=6,
                                  decoder_ffn_dim=2048, decoder_attention_heads=8, num_queries=100))
    torch.manual_seed(0)
    torch_model = MaskFormerForInstanceSegmentation(config).eval()
    rs = np.random.RandomState(0)
    images = rs.randn(args.batch, args.size, args.size, 3).astype(np.float32)
    bank = rs.randn(args.classes, 768).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=-1, keepdims=True)
    x, t = jnp.asarray(images), jnp.asarray(bank)
    fns = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch_model.save_pretrained(tmp)
        for dtype in args.dtypes:
            segmenter = load(tmp, clip_dim=768, dtype=getattr(jnp, dtype))
            graphdef, state = nnx.split(segmenter)

            @jax.jit
            def forward(state, x, t, graphdef=graphdef):
                out = nnx.merge(graphdef, state)(x, t)
                return out["pred_logits"], out["pred_masks"]

            fns[f"ovseg_jax | {dtype}"] = lambda f=forward, s=state: f(s, x, t)
    if not args.no_torch:
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()

        def torch_forward():
            with torch.inference_mode():
                return torch_model(pixel_values=pixels).masks_queries_logits

        fns["transformers MaskFormer (torch) | float32"] = torch_forward

    cpu: dict[str, float] = {}
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    times = interleaved(fns, args.rounds, log=log, cpu=cpu, alternate=True)
    print("\n".join(environment_lines()))
    print(f"\nSegmenter Swin-B forward, batch {args.batch} @ {args.size}x{args.size} on {jax.devices()[0].device_kind}, "
          f"{args.rounds} interleaved rounds")
    reference = times.get("transformers MaskFormer (torch) | float32", (0, 0, 0))[2]
    print(f"{'implementation':<36} {'dtype':<9} {'first call s':>12} {'images/s':>9} {'CPU s/image':>11} {'vs torch':>8}")
    for key, (first, _, median) in times.items():
        name, dtype = key.split(" | ")
        ratio = reference / median if reference else None
        print(f"{name:<36} {dtype:<9} {first:12.2f} {args.batch / median:9.3f} {cpu[key] / args.batch:11.2f} "
              + (f"{ratio:7.2f}x" if ratio else "       -"))
        if ratio and name == "ovseg_jax":
            record(args.record, f"Swin-B segmenter forward, {args.size}x{args.size}, batch {args.batch}, {dtype}",
                   f"{args.batch / median:.3f} images/s", f"transformers MaskFormer float32 {args.batch / reference:.3f} "
                   "images/s", ratio, unit="images/s", rounds=args.rounds)


if __name__ == "__main__":
    main()
