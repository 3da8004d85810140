"""Throughput of CLIP image encoding of masked crops: ovseg_jax vs transformers (torch), same weights.

    .venv/bin/python bench/clip_encode.py                       # ViT-B/16 @ 224, batch 32, 5 rounds
    .venv/bin/python bench/clip_encode.py --model vit_l14 --batch 8
    .venv/bin/python bench/clip_encode.py --batch 16 --rounds 7 --dtypes float32

Random weights: a transformers `CLIPModel` with the preset's vision tower and a small text tower,
saved with `save_pretrained` and loaded through `ovseg_jax.clip.load` (plainly, and with mask
prompts of depth 3). Random crops and random 0/1 region masks. Timed in interleaved rounds in one
process (`bench/common.py`; every other round in reverse order), each implementation's first,
compiling call apart: ovseg_jax's `Clip.encode_image` in each `--dtypes` without and with mask
prompts, and transformers' `get_image_features` in float32 at torch's default thread count (the
reference of every ratio; transformers has no mask prompts, whose extra work is a few selects).

Prints crops/s (median of the rounds), CPU seconds per crop (process CPU time, all threads; a
loaded machine stretches wall time far more than it changes this), the ratio to torch, and how far
the outputs are apart: ovseg_jax float32 vs transformers (max |difference| of the L2-normalised
embeddings) and bfloat16 vs float32 (largest 1 - cosine over the crops).
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

import ovseg_jax.clip as oclip
from ovseg_jax.models.clip import ClipConfig

from common import environment_lines, interleaved, record  # bench/common.py


def hf_clip(preset: ClipConfig):
    """A random transformers CLIPModel with `preset`'s image tower and a one-layer text tower."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        projection_dim=preset.embed_dim,
        vision_config=dict(image_size=preset.image_size, patch_size=preset.patch_size,
                           hidden_size=preset.vision_width, intermediate_size=preset.vision_mlp_dim,
                           num_hidden_layers=preset.vision_layers, num_attention_heads=preset.vision_heads,
                           hidden_act="quick_gelu"),
        text_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=1, num_attention_heads=1,
                         hidden_act="quick_gelu"))
    torch.manual_seed(0)
    return CLIPModel(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["vit_b16", "vit_l14"], default="vit_b16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (each implementation once per round)")
    parser.add_argument("--dtypes", type=lambda s: s.split(","), default=["float32", "bfloat16"])
    parser.add_argument("--no-mask-prompts", action="store_true", help="time only the plain image tower")
    parser.add_argument("--no-torch", action="store_true", help="skip the transformers reference")
    parser.add_argument("--record", help="append the comparisons as JSON lines here (make bench)")
    args = parser.parse_args()

    import torch

    preset: ClipConfig = getattr(ClipConfig, args.model)()
    torch_model = hf_clip(preset)
    rs = np.random.RandomState(0)
    size = preset.image_size
    images = rs.randn(args.batch, size, size, 3).astype(np.float32)
    masks = (rs.rand(args.batch, size, size) > 0.5).astype(np.float32)
    x, m = jnp.asarray(images), jnp.asarray(masks)

    fns, outputs = {}, {}

    def keep(key, fn):  # the last output of each, for the agreement figures
        def run():
            outputs[key] = fn()
            return outputs[key]
        return run

    with tempfile.TemporaryDirectory() as tmp:
        torch_model.save_pretrained(tmp)
        for dtype in args.dtypes:
            plain = oclip.load(tmp, dtype=getattr(jnp, dtype))
            fns[("ovseg_jax", dtype)] = keep(dtype, lambda c=plain: c.encode_image(x))
            if not args.no_mask_prompts:
                prompted = oclip.load(tmp, mask_prompt_depth=3, dtype=getattr(jnp, dtype))
                fns[("ovseg_jax + mask prompts (depth 3)", dtype)] = lambda c=prompted: c.encode_image(x, m)
    if not args.no_torch:
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()

        def torch_encode():
            with torch.inference_mode():
                out = torch_model.get_image_features(pixel_values=pixels)
            return getattr(out, "pooler_output", out)

        fns[("transformers (torch)", "float32")] = keep("torch", torch_encode)

    cpu: dict[str, float] = {}
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    times = interleaved({" | ".join(k): f for k, f in fns.items()}, args.rounds, log=log, cpu=cpu, alternate=True)

    print("\n".join(environment_lines()))
    print(f"\nCLIP {args.model} image tower, batch {args.batch} @ {size}px, {args.rounds} interleaved rounds "
          f"on {jax.devices()[0].device_kind}")
    reference = times.get("transformers (torch) | float32", (0, 0, 0))[2]
    print(f"{'implementation':<36} {'dtype':<9} {'first call s':>12} {'crops/s':>8} {'CPU s/crop':>10} {'vs torch':>8}")
    for key, (first, _, median) in times.items():
        name, dtype = key.split(" | ")
        ratio = reference / median if reference else None
        print(f"{name:<36} {dtype:<9} {first:12.2f} {args.batch / median:8.2f} {cpu[key] / args.batch:10.3f} "
              + (f"{ratio:7.2f}x" if ratio else "       -"))
        if ratio and not name.startswith("transformers"):
            prompts = " with mask prompts (depth 3)" if "mask prompts" in name else ""
            record(args.record, f"CLIP {args.model} image tower{prompts}, batch {args.batch} @ {size}, {dtype}",
                   f"{args.batch / median:.2f} crops/s", f"transformers float32 {args.batch / reference:.2f} crops/s",
                   ratio, unit="crops/s", rounds=args.rounds)
    if "torch" in outputs and "float32" in outputs:
        ours = np.asarray(outputs["float32"])
        theirs = outputs["torch"].numpy()
        theirs = theirs / np.linalg.norm(theirs, axis=-1, keepdims=True)
        print(f"ovseg_jax float32 vs transformers: max |difference| of the normalised embeddings "
              f"{np.abs(ours - theirs).max():.2e}")
    for dtype in args.dtypes:
        if dtype != "float32" and "float32" in outputs:
            cosine = np.sum(np.asarray(outputs[dtype]) * np.asarray(outputs["float32"]), axis=-1)
            print(f"ovseg_jax {dtype} vs float32: largest 1 - cosine over the crops {np.max(1 - cosine):.2e}")


if __name__ == "__main__":
    main()
