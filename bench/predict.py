"""`python -m ovseg_jax.predict` throughput on a folder of mixed-size images, next to the original
demo's inference restated in torch (per-mask crop loop), same weights, demo mode (λ 0, threshold 0.35).

    .venv/bin/python bench/predict.py                                  # tiny preset, 20 images
    .venv/bin/python bench/predict.py --preset full --images 2         # Swin-B + ViT-L/14 at 640

Presets (random weights; the torch models are the source of ours):
- tiny: the demo's architecture sizes (Swin embed 32, depths 2/2/2/2, window 4, 16 queries, hidden 64;
  CLIP ViT 32 px, patch 4, width 96, 3 layers, mask prompts depth 2), input short side 128;
- full: OVSeg's Swin-B segmenter (100 queries) and CLIP ViT-L/14 @ 224 with mask prompts depth 3,
  short side 640 (reference 1.1).
Segmenter: a transformers `MaskFormerForInstanceSegmentation` with a Swin backbone, saved and loaded
through `ovseg_jax.segmenter.load`. CLIP: the OpenAI-layout torch CLIP with mask prompts of
`tests/torch_clip_reference.py`, saved and loaded through `ovseg_jax.clip.load`.

ovseg_jax: `ovseg_jax.predict.predict_files` (read, resize, bucket, batched device calls, write
overlay / labels / json), a first pass (compiling) and steady passes. torch: for each image, read,
resize (the same PIL code), MaskFormer forward on the 32-padded image, then the original adapter's
loop over the valid masks (box, crop, mean fill, normalise, bicubic 224), one CLIP call on the valid
crops (`bench/common.py`'s `torch_masks` and `torch_region_logits`, shared with `bench/inference.py`),
the demo's per-class best proposal over hard masks, bilinear resize to the original size.
Prints images/s, compiles, and the share of pixels whose label agrees (exact only with --bucket 32).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from common import smooth_image, torch_clip, torch_maskformer, torch_masks, torch_region_logits  # bench/common.py

NAMES = ["grass", "sky", "sand", "snow", "red car", "green tree", "blue water", "yellow flower", "person", "dog",
         "cat", "building", "road", "wall", "cloud", "boat", "bird", "horse", "chair", "table"]
PRESETS = {
    "tiny": dict(short=128, max_size=512, swin=dict(embed_dim=32, depths=[2, 2, 2, 2], num_heads=[2, 4, 4, 8],
                                                    window_size=4),
                 decoder=dict(d_model=64, decoder_layers=3, decoder_ffn_dim=256, decoder_attention_heads=4,
                              num_queries=16), fpn=64,
                 clip=dict(embed_dim=64, resolution=32, patch=4, vision_width=96, vision_layers=3, mask_depth=2),
                 sizes=[(64, 64), (48, 64), (64, 48), (60, 80), (96, 128), (128, 96), (72, 128), (100, 150)]),
    "full": dict(short=640, max_size=2560, swin=dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32],
                                                     window_size=12),
                 decoder=dict(d_model=256, decoder_layers=6, decoder_ffn_dim=2048, decoder_attention_heads=8,
                              num_queries=100), fpn=256,
                 clip=dict(embed_dim=768, resolution=224, patch=14, vision_width=1024, vision_layers=24, mask_depth=3),
                 sizes=[(480, 640), (640, 480), (427, 640), (375, 500), (512, 683), (768, 1024), (600, 800),
                        (1080, 1920)]),
}
THRESHOLD = 0.35


def build_models(preset: dict, directory: Path):
    """Random torch MaskFormer + OpenAI-layout CLIP, saved into `directory` -> (torch segmenter, torch
    CLIP, tokenizer dir, segmenter dir, CLIP file)."""
    from ovseg_jax.text import Tokenizer, write_word_vocab

    write_word_vocab(["a"] + [w for n in NAMES for w in n.split()], directory / "tokenizer")
    tok = Tokenizer.from_dir(directory / "tokenizer", context_length=16)
    segmenter = torch_maskformer(preset["swin"], preset["decoder"], preset["fpn"], len(NAMES), directory / "segmenter")
    clip = torch_clip(preset["clip"], tok.vocab_size, directory / "clip.pt")
    return segmenter, clip, directory / "tokenizer", directory / "segmenter", directory / "clip.pt"


def write_images(directory: Path, sizes: list[tuple[int, int]], count: int) -> list[Path]:
    """`count` smooth random RGB images cycling through `sizes` (upsampled noise, so masks form regions)."""
    rs = np.random.RandomState(0)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        paths.append(directory / f"img{i:03d}.png")
        Image.fromarray(smooth_image(*sizes[i % len(sizes)], rs)).save(paths[-1])
    return paths


def torch_demo(segmenter, clip, bank, image: np.ndarray, original_hw: tuple[int, int], size: int) -> np.ndarray:
    """The original demo on one resized uint8 `[h, w, 3]` image -> int `[H0, W0]` labels (-1 unlabeled);
    CLIP sees `size` x `size` crops."""
    import torch
    import torch.nn.functional as F

    h, w = image.shape[:2]
    binary = torch_masks(segmenter, image) > THRESHOLD
    logits, valid = torch_region_logits(clip, bank, image, binary, size)
    c = bank.shape[0]
    scores = torch.zeros(c, h, w)
    if len(valid):
        probs = F.softmax(logits, dim=-1)  # [n_valid, C]
        select = torch.zeros_like(probs)
        for k in range(c):
            best = probs[:, k].argmax()
            select[best] = probs[best]
        scores = torch.einsum("qc,qhw->chw", select, binary[valid].float())
    full = F.interpolate(scores[None], original_hw, mode="bilinear", align_corners=False)[0]
    best, labels = full.max(0)
    return torch.where(best > 0, labels, -1).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--bucket", type=int, default=128)
    parser.add_argument("--passes", type=int, default=3, help="steady passes of each implementation, alternated")
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()

    import jax
    import torch

    import ovseg_jax.clip as oclip
    import ovseg_jax.segmenter as oseg
    from ovseg_jax.data.sources import read_image
    from ovseg_jax.data.transforms import resize_image, resized_hw
    from ovseg_jax.utils.compilation import CompileTimer
    from ovseg_jax.inference.ensemble import Predictor
    from ovseg_jax.inference.files import predict_files

    preset = PRESETS[args.preset]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t_seg, t_clip, tok_dir, seg_dir, clip_file = build_models(preset, tmp)
        with CompileTimer() as load_compiles:
            t0 = time.perf_counter()
            clip = oclip.load(clip_file, tokenizer=tok_dir)
            segmenter = oseg.load(seg_dir, clip_dim=clip.config.embed_dim)
            load_seconds = time.perf_counter() - t0
        predictor = Predictor(segmenter, clip, mode="demo", ensemble_weight=0.0, mask_threshold=THRESHOLD,
                              templates=["a {}"])
        paths = write_images(tmp / "images", preset["sizes"], args.images)
        kw = dict(short=preset["short"], max_size=preset["max_size"], bucket=args.bucket, batch_size=args.batch_size,
                  progress=False)
        first = predict_files(predictor, paths, NAMES, tmp / "out", **kw)
        bank = torch.from_numpy(np.asarray(predictor.text_bank(NAMES)))

        def torch_pass():
            out = {}
            with torch.inference_mode():
                for p in paths:
                    image = read_image(p)
                    resized = resize_image(image, resized_hw(*image.shape[:2], preset["short"], preset["max_size"]))
                    out[p.stem] = torch_demo(t_seg, t_clip, bank, resized, image.shape[:2], preset["clip"]["resolution"])
            return out

        jax_rates, torch_rates, torch_labels = [], [], None
        for _ in range(args.passes):
            jax_rates.append(predict_files(predictor, paths, NAMES, tmp / "out", **kw)["images_per_second"])
            if not args.no_torch:
                t0 = time.perf_counter()
                torch_labels = torch_pass()
                torch_rates.append(len(paths) / (time.perf_counter() - t0))
        agree = None
        if torch_labels is not None:
            ours = {p.stem: np.asarray(Image.open(tmp / "out" / f"{p.stem}.labels.png")).astype(np.int64) for p in paths}
            ours = {k: np.where(v == 255, -1, v) for k, v in ours.items()}
            agree = np.mean(np.concatenate([(ours[k] == torch_labels[k]).ravel() for k in ours]))

    device = jax.devices()[0]
    print(f"\npredict, demo mode, preset {args.preset} ({len(paths)} images of {len(set(preset['sizes'][:len(paths)]))} "
          f"sizes, short side {preset['short']}, {len(first['padded_shapes'])} padded shapes, batch {args.batch_size}) "
          f"on {device.platform} ({device.device_kind}), torch threads {torch.get_num_threads()}")
    print(f"loading: {load_seconds:.1f} s ({load_compiles.count} compilations); first pass: {first['seconds']:.1f} s "
          f"with {first['compiles']} compilations ({first['compile_seconds']:.1f} s)")
    print(f"{'implementation':<40} {'images/s (median)':>18} {'passes':>7} {'vs torch':>9}")
    jax_rate = statistics.median(jax_rates)
    ratio = "-"
    if torch_rates:
        ratios = [j / t for j, t in zip(jax_rates, torch_rates)]
        ratio = f"{statistics.median(ratios):.2f}x"
    print(f"{'ovseg_jax predict (files -> outputs)':<40} {jax_rate:18.3f} {len(jax_rates):7d} {ratio:>9}")
    if torch_rates:
        print(f"{'torch original demo loop ' + torch.__version__:<40} {statistics.median(torch_rates):18.3f} "
              f"{len(torch_rates):7d} {'1.00x':>9}")
        print(f"labels agreeing with torch: {100 * agree:.2f}% of pixels"
              + (" (bucket padding differs from torch's 32: the segmenter sees more zeros)" if args.bucket != 32 else ""))


if __name__ == "__main__":
    main()
