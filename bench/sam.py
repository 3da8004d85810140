"""SAM automatic mask generation: ovseg_jax's AutomaticMaskGenerator vs segment_anything's
SamAutomaticMaskGenerator on the same random weights.

    .venv/bin/python bench/sam.py                                        # ViT-B and ViT-L at 1024, 8x8 points
    .venv/bin/python bench/sam.py --models vit_b --size 512 --points-per-side 4 --rounds 1   # a smoke run
    .venv/bin/python bench/sam.py --points-per-side 32 --rounds 5        # the real setting, on an accelerator

Random weights (segment_anything's modules built as `build_sam` builds the released models, every
parameter redrawn so that nothing is zero), saved with torch.save and loaded through
`ovseg_jax.sam.load`. The thresholds are lowered (predicted IoU 0.5, stability 0.5) so that random
weights produce masks at all; the work per image (encoder, one decoder pass and a crop-size
upsampling per candidate, NMS) does not depend on how many pass. Implementations alternate in
rounds (bench/common.interleaved). Prints per implementation: compiling (first call, XLA
compilations), images/s, candidate masks/s (3 per point prompt), masks returned, ratio to torch.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from common import interleaved, smooth_image  # bench/common.py (puts the repository on sys.path)

ARCHITECTURES = {  # segment_anything's build_sam_vit_{b,l,h}
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}
THRESHOLDS = dict(pred_iou_thresh=0.5, stability_score_thresh=0.5)


def torch_sam(name: str, size: int, path: Path):
    """A random released-architecture segment_anything Sam at input `size`, saved to `path`."""
    import torch

    from tests.sam_reference import tiny_sam

    model = tiny_sam(image_size=size, patch_size=16, window_size=14, prompt_embed_dim=256, mask_in_chans=16,
                     decoder_heads=8, decoder_mlp_dim=2048, **ARCHITECTURES[name])
    torch.save(model.state_dict(), path)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit_b,vit_l", help="comma-separated: vit_b, vit_l, vit_h")
    parser.add_argument("--size", type=int, default=1024, help="model input size (released: 1024)")
    parser.add_argument("--image", default="768x1024", help="image HxW")
    parser.add_argument("--points-per-side", type=int, default=8)
    parser.add_argument("--points-per-batch", type=int, default=64)
    parser.add_argument("--crop-n-layers", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="our compute dtypes")
    parser.add_argument("--no-torch", action="store_true", help="skip segment_anything")
    args = parser.parse_args()

    import torch

    import ovseg_jax.sam
    from ovseg_jax.inference.amg import AutomaticMaskGenerator
    from ovseg_jax.utils.compilation import CompileTimer
    from tests.sam_reference import import_segment_anything

    sa = import_segment_anything()
    height, width = (int(v) for v in args.image.split("x"))
    image = smooth_image(height, width, np.random.RandomState(0))
    options = dict(points_per_side=args.points_per_side, points_per_batch=args.points_per_batch,
                   crop_n_layers=args.crop_n_layers, **THRESHOLDS)
    n_crops = sum(4**i for i in range(args.crop_n_layers + 1))
    candidates = 3 * args.points_per_side**2 * n_crops  # with the default downscale factor 1
    print(f"image {height}x{width}, input {args.size}, {args.points_per_side}^2 points, {n_crops} crop(s), "
          f"{candidates} candidate masks per image; torch {torch.get_num_threads()} threads", flush=True)
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"sam_{name}.pth"
            reference = torch_sam(name, args.size, path)
            fns, compiles, masks = {}, {}, {}

            def counted(generator, label, counts=masks):
                def generate():
                    counts[label] = len(generator.generate(image))
                return generate

            if not args.no_torch:
                label = "segment_anything (torch)"
                fns[label] = counted(sa.SamAutomaticMaskGenerator(reference, **options), label)
            for dtype in args.dtypes.split(","):
                sam = ovseg_jax.sam.load(path, dtype=getattr(jnp, dtype))
                generator = AutomaticMaskGenerator(sam, **options)
                label = f"ovseg_jax {dtype}"
                fns[label] = counted(generator, label)
                with CompileTimer() as timer:
                    fns[label]()  # compiles; the rounds start warm
                compiles[label] = (timer.count, timer.seconds)
            results = interleaved(fns, args.rounds, log=lambda line: print(line, file=sys.stderr, flush=True))
        print(f"\n{name} ({args.size} px):")
        print(f"{'implementation':<28} {'compiles':>8} {'compile s':>9} {'images/s':>9} {'cand./s':>9} "
              f"{'masks':>6} {'vs torch':>8}")
        reference_rate = None
        for label, (first, _, median) in results.items():
            rate = 1.0 / median
            if label.startswith("segment_anything"):
                reference_rate = rate
                count, seconds = "-", "-"
            else:
                count, seconds = compiles[label][0], f"{compiles[label][1]:.1f}"
            ratio = f"{rate / reference_rate:7.2f}x" if reference_rate else "-"
            print(f"{label:<28} {count:>8} {seconds:>9} {rate:9.3f} {rate * candidates:9.1f} {masks[label]:>6} "
                  f"{ratio:>8}")


if __name__ == "__main__":
    main()
