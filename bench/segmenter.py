"""Segmenter forward throughput: ovseg_jax vs transformers' torch MaskFormer, same weights.

    .venv/bin/python bench/segmenter.py                         # Swin-B, 640x640, batch 1
    .venv/bin/python bench/segmenter.py --batch 8 --dtype bfloat16   # on an accelerator

Random weights: a transformers `MaskFormerForInstanceSegmentation` with OVSeg's Swin-B backbone
(embed 128, depths 2/2/18/2, heads 4/8/16/32, window 12) and decoder (6 layers, 100 queries,
hidden 256, FFN 2048), saved with save_pretrained and loaded through `ovseg_jax.segmenter.load`
(the open-vocabulary head, 768-d, against a bank of 171 classes; torch's head is a 172-way Linear).
Prints compile time (first call) and steady-state images/s with the ratio to torch.
"""

from __future__ import annotations

import argparse
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from common import print_rate_table, timed  # bench/common.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--classes", type=int, default=171)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--no-torch", action="store_true", help="skip the transformers reference")
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
    with tempfile.TemporaryDirectory() as tmp:
        torch_model.save_pretrained(tmp)
        segmenter = load(tmp, clip_dim=768, dtype=getattr(jnp, args.dtype))

    rs = np.random.RandomState(0)
    images = rs.randn(args.batch, args.size, args.size, 3).astype(np.float32)
    bank = rs.randn(args.classes, 768).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=-1, keepdims=True)
    graphdef, state = nnx.split(segmenter)

    @jax.jit
    def forward(state, x, t):
        out = nnx.merge(graphdef, state)(x, t)
        return out["pred_logits"], out["pred_masks"]

    x, t = jnp.asarray(images), jnp.asarray(bank)
    rows = []
    first, step = timed(lambda: forward(state, x, t), args.iters)
    rows.append(("ovseg_jax", args.dtype, first, args.batch / step))
    if not args.no_torch:
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        with torch.inference_mode():
            first, step = timed(lambda: torch_model(pixel_values=pixels).masks_queries_logits, args.iters)
        rows.append((f"transformers torch {torch.__version__}", "float32", first, args.batch / step))

    device = jax.devices()[0]
    print(f"\nSegmenter Swin-B forward, batch {args.batch} @ {args.size}x{args.size} on {device.platform} "
          f"({device.device_kind}), torch threads {torch.get_num_threads()}, {args.iters} timed calls")
    print_rate_table(rows, "images/s", None if args.no_torch else rows[-1][3])


if __name__ == "__main__":
    main()
