"""Throughput of CLIP image encoding of masked crops: ovseg_jax vs transformers (torch), same weights.

    .venv/bin/python bench/clip_encode.py                      # ViT-B/16 @224, batch 32
    .venv/bin/python bench/clip_encode.py --model vit_l14 --batch 8 --dtype bfloat16

Random weights (a transformers CLIPModel with the preset's vision tower and a small text tower,
saved with save_pretrained and loaded through `ovseg_jax.clip.load`). Prints a table of compile
time and steady-state crops/s for ovseg_jax without and with mask prompts (depth 3) and for the
torch reference, with the ratio. Timings exclude the first (compiling) call.
"""

from __future__ import annotations

import argparse
import tempfile

import jax
import numpy as np

import ovseg_jax.clip as oclip
from ovseg_jax.models.clip import ClipConfig

from common import print_rate_table, timed  # bench/common.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["vit_b16", "vit_l14"], default="vit_b16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--no-torch", action="store_true", help="skip the transformers reference")
    args = parser.parse_args()

    import torch
    from transformers import CLIPConfig, CLIPModel

    preset: ClipConfig = getattr(ClipConfig, args.model)()
    hf_config = CLIPConfig(
        projection_dim=preset.embed_dim,
        vision_config=dict(image_size=preset.image_size, patch_size=preset.patch_size,
                           hidden_size=preset.vision_width, intermediate_size=4 * preset.vision_width,
                           num_hidden_layers=preset.vision_layers,
                           num_attention_heads=preset.vision_width // 64, hidden_act="quick_gelu"),
        text_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=1, num_attention_heads=1,
                         hidden_act="quick_gelu"))
    torch.manual_seed(0)
    torch_model = CLIPModel(hf_config).eval()
    rs = np.random.RandomState(0)
    size = preset.image_size
    images = rs.randn(args.batch, size, size, 3).astype(np.float32)
    masks = (rs.rand(args.batch, size, size) > 0.5).astype(np.float32)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        torch_model.save_pretrained(tmp)
        dtype = getattr(jax.numpy, args.dtype)
        plain = oclip.load(tmp, dtype=dtype)
        prompted = oclip.load(tmp, mask_prompt_depth=3, dtype=dtype)
    x, m = jax.numpy.asarray(images), jax.numpy.asarray(masks)
    for name, fn in [("ovseg_jax", lambda: plain.encode_image(x)),
                     ("ovseg_jax + mask prompts d=3", lambda: prompted.encode_image(x, m))]:
        first, step = timed(fn, args.iters)
        rows.append((name, args.dtype, first, args.batch / step))
    if not args.no_torch:
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        with torch.inference_mode():
            first, step = timed(lambda: torch_model.get_image_features(pixel_values=pixels), args.iters)
        rows.append((f"transformers torch {torch.__version__}", "float32", first, args.batch / step))

    device = jax.devices()[0]
    print(f"\nCLIP {args.model} image encoding, batch {args.batch} @ {size}px on {device.platform} "
          f"({device.device_kind}), torch threads {torch.get_num_threads()}")
    print_rate_table(rows, "crops/s", None if args.no_torch else rows[-1][3])


if __name__ == "__main__":
    main()
