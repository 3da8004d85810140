"""SAM automatic mask generation, and OVSeg + SAM end to end: ovseg_jax against segment_anything's
SamAutomaticMaskGenerator (and the original Space's per-mask CLIP loop) on the same random weights.

    .venv/bin/python bench/sam.py                                        # ViT-B and ViT-L at 1024, 8x8 points
    .venv/bin/python bench/sam.py --models vit_b --size 512 --points-per-side 4 --rounds 1   # a smoke run
    .venv/bin/python bench/sam.py --points-per-side 32 --rounds 5        # the real setting, on an accelerator
    .venv/bin/python bench/sam.py --end-to-end --dtypes float32          # OVSeg+SAM images/s (the Space's demo)

Random weights (segment_anything's modules built as `build_sam` builds the released models, every
parameter redrawn so that nothing is zero, the masks sharpened as tests/test_sam_amg.py's), saved
with torch.save and loaded through `ovseg_jax.sam.load`. The thresholds are lowered (predicted IoU
0.5, stability 0.5) so that random weights produce masks at all; the work per image (encoder, one
decoder pass and a crop-size upsampling per candidate, NMS) does not depend on how many pass.
Implementations alternate in rounds (bench/common.interleaved). Prints per implementation:
compiling (first call, XLA compilations), images/s, candidate masks/s (3 per point prompt), masks
returned, ratio to torch.

`--end-to-end` times the Space's SAM demo per image instead (`--mode demo --proposals sam`,
granularity 1): ours is `Predictor(proposals="sam")` (masks padded to a budget, every masked crop
through the mask-prompted CLIP in one jitted program); torch is SamAutomaticMaskGenerator, then the
adapter's per-mask crop loop (bench/common.torch_region_logits) and one CLIP call on the stacked
crops, then the class selection. A random OpenAI-layout CLIP with 3 mask prompt depths (`--clip`:
OVSeg's ViT-L/14 or ViT-B/16 at 224) is shared; the class embeddings are computed once on both
sides. Memory: ViT-L/14 in float32 on both sides plus two SAMs; one dtype per run keeps it near 6 GB.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from common import interleaved, smooth_image, torch_clip, torch_region_logits  # bench/common.py (+ sys.path)

ARCHITECTURES = {  # segment_anything's build_sam_vit_{b,l,h}
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}
THRESHOLDS = dict(pred_iou_thresh=0.5, stability_score_thresh=0.5)
CLIPS = {  # tests/torch_clip_reference.OpenAIClip fields; heads = width / 64
    "vit_l14": dict(embed_dim=768, resolution=224, patch=14, vision_width=1024, vision_layers=24, mask_depth=3),
    "vit_b16": dict(embed_dim=512, resolution=224, patch=16, vision_width=768, vision_layers=12, mask_depth=3),
}
CLASS_NAMES = ["cat", "sofa", "wall", "floor", "window", "plant", "lamp", "rug"]


def torch_sam(name: str, size: int, path: Path):
    """A random released-architecture segment_anything Sam at input `size`, saved to `path`."""
    import torch

    from tests.sam_reference import tiny_sam

    model = tiny_sam(image_size=size, patch_size=16, window_size=14, prompt_embed_dim=256, mask_in_chans=16,
                     decoder_heads=8, decoder_mlp_dim=2048, **ARCHITECTURES[name])
    with torch.no_grad():  # sharper masks that differ between prompts, as tests/test_sam_amg.py's models
        for mlp in model.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(8.0)
        for conv in (model.mask_decoder.output_upscaling[0], model.mask_decoder.output_upscaling[3]):
            conv.weight.copy_(conv.weight[..., :1, :1].expand_as(conv.weight))
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
    parser.add_argument("--end-to-end", action="store_true",
                        help="OVSeg+SAM images/s (the Space's demo) instead of the AMG alone")
    parser.add_argument("--clip", choices=sorted(CLIPS), default="vit_l14", help="CLIP of --end-to-end")
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
            if args.end_to_end:
                end_to_end(args, name, reference, path, image, options, Path(tmp))
                continue
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
            print_amg_table(name, args.size, results, compiles, masks, candidates)


def print_amg_table(name, size, results, compiles, masks, candidates) -> None:
    print(f"\n{name} ({size} px):")
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


def torch_space_demo(generator, clip, bank, image: np.ndarray, size: int):
    """The Space's SAMVisualizationDemo on one image (granularity 1, no resize): masks, the adapter's
    crop loop + CLIP, softmax, each class's best mask, the sum of the kept rows, argmax -> (labels, N)."""
    import torch

    with torch.no_grad():
        masks = torch.from_numpy(np.stack([r["segmentation"] for r in generator.generate(image)]))
        logits, _ = torch_region_logits(clip, bank, image, masks, size)
        probs = logits.softmax(dim=-1)
        kept = torch.zeros(len(probs), dtype=torch.bool)
        kept[probs.argmax(dim=0)] = True
        scores = torch.einsum("qc,qhw->chw", probs * kept[:, None], masks.float())
        labels = scores.argmax(dim=0)
        labels[scores.amax(dim=0) == 0] = 255
    return labels, len(masks)


def end_to_end(args, name, reference, sam_path: Path, image: np.ndarray, options: dict, tmp: Path) -> None:
    """OVSeg + SAM per image: ours (Predictor, proposals "sam", demo mode) vs the torch Space pipeline."""
    import torch

    import ovseg_jax.clip as oclip
    import ovseg_jax.sam
    from ovseg_jax.inference.amg import AutomaticMaskGenerator
    from ovseg_jax.inference.ensemble import Predictor
    from ovseg_jax.inference.sam_proposals import SPACE_TEMPLATES, SamProposals
    from ovseg_jax.text import Tokenizer, write_word_vocab
    from ovseg_jax.utils.compilation import CompileTimer
    from tests.sam_reference import import_segment_anything

    sa = import_segment_anything()
    vocab = write_word_vocab([*SPACE_TEMPLATES, *CLASS_NAMES], tmp / "vocab")
    clip_path = tmp / "clip.pt"
    reference_clip = torch_clip(CLIPS[args.clip], Tokenizer.from_dir(vocab).vocab_size, clip_path)
    fns, compiles, masks = {}, {}, {}
    bank = None
    for dtype in args.dtypes.split(","):
        clip = oclip.load(clip_path, tokenizer=vocab, dtype=getattr(jnp, dtype))
        sam = ovseg_jax.sam.load(sam_path, dtype=getattr(jnp, dtype))
        predictor = Predictor(None, clip, proposals="sam", sam=SamProposals(AutomaticMaskGenerator(sam, **options)),
                              mode="demo", ensemble_weight=0.0, templates=SPACE_TEMPLATES)
        bank = torch.from_numpy(np.asarray(predictor.text_bank(CLASS_NAMES)))
        label = f"ovseg_jax {dtype}"
        fns[label] = lambda predictor=predictor: predictor.predict(image, CLASS_NAMES)
        with CompileTimer() as timer:
            fns[label]()  # compiles; the rounds start warm
        compiles[label] = (timer.count, timer.seconds)
        masks[label] = len(predictor.sam.masks(image))  # one more generator run, untimed
    if not args.no_torch:
        label = "Space pipeline (torch)"
        generator = sa.SamAutomaticMaskGenerator(reference, **options)

        size = CLIPS[args.clip]["resolution"]

        def space(generator=generator, label=label):
            labels, masks[label] = torch_space_demo(generator, reference_clip, bank, image, size)
            return labels

        fns = {label: space, **fns}
    results = interleaved(fns, args.rounds, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"\nOVSeg + SAM {name} with CLIP {args.clip}, {len(CLASS_NAMES)} classes, demo mode (end to end):")
    print(f"{'implementation':<28} {'compiles':>8} {'compile s':>9} {'images/s':>9} {'masks':>6} {'vs torch':>8}")
    reference_rate = None
    for label, (_, _, median) in results.items():
        rate = 1.0 / median
        reference_rate = rate if label.startswith("Space") else reference_rate
        count, seconds = compiles.get(label, ("-", None))
        seconds = "-" if seconds is None else f"{seconds:.1f}"
        ratio = f"{rate / reference_rate:7.2f}x" if reference_rate else "-"
        print(f"{label:<28} {count:>8} {seconds:>9} {rate:9.4f} {masks.get(label, '-'):>6} {ratio:>8}")


if __name__ == "__main__":
    main()
