"""Inference time split (appendix I): the segmenter and CLIP on the masked crops, timed apart, in
float32 and bfloat16, next to the original's per-crop loop restated in torch on the same weights;
images/s for batches; and, on a trained model, how many proposals matter after the ensemble and what
the CLIP top-k filter (`Predictor(clip_top_k=k)`, `--clip-top-k`) keeps and saves.

    .venv/bin/python bench/inference.py --preset tiny --top-k 8,4        # a few minutes
    .venv/bin/python bench/inference.py --preset r101c_vitb --top-k 50,25,10 --batches 1,2 --rounds 1
    .venv/bin/python bench/inference.py --preset swinb_vitl --dtypes float32 --top-k 50,25,10 --batches "" \
        --rounds 0                                                     # 45 min on 2 CPU cores
    .venv/bin/python bench/inference.py --crop-stats --checkpoint outputs/demo/ovseg_synthetic.pth \
        --root outputs/demo/world --top-k 16,12,10,8,6,4,3,2,1 --rounds 1

Presets (random weights, one smooth random image of `size` x `size`, 150 class names, λ 0.7):
- tiny: the synthetic demo's sizes (Swin embed 32, 16 queries; CLIP ViT 32 px, patch 4, width 96,
  3 layers, mask prompts depth 2), 128 px, threshold 0.4;
- r101c_vitb: OVSeg's R101c segmenter (`SegmenterConfig.r101c`, as configs/r101c_vitb_seg.py, 100
  queries) and CLIP ViT-B/16 @ 224 with mask prompts depth 3, 640 px, threshold 0.5;
- swinb_vitl: OVSeg's Swin-B segmenter (as configs/swinb_vitl_seg.py) and CLIP ViT-L/14 @ 224 with
  mask prompts depth 3, 640 px, threshold 0.4.
CLIP: the OpenAI-layout torch CLIP of `tests/torch_clip_reference.py`, saved and loaded through
`ovseg_jax.clip.load`. Swin segmenters: a transformers MaskFormer, saved and loaded through
`ovseg_jax.segmenter.load` (so torch runs the same segmenter). R101c: our `Segmenter` with random
weights (no torch implementation of detectron2's DeepLab ResNet MaskFormer here: no torch row).

Timed (`bench/common.py`'s `interleaved`: a first, compiling call of each, then rounds calling every
implementation in turn, medians): segmenter = `Predictor.proposals` (forward, x4 upsampling,
sigmoid); CLIP crops = `Predictor.classify_crops` on the float32 segmenter's masks (crop
extraction + CLIP on all Q proposals, static shapes) and with `clip_top_k`; torch = transformers'
MaskFormer forward + upsampling (`torch_masks`) and the original adapter's loop over the valid masks
+ one CLIP call (`torch_region_logits`) on the same masks; batches = `Predictor.predict_batch`
(labels at the image size) of B different images. The first calls are reported with their tracing +
compile seconds; `--rounds 0` reports the first call less those (for runs too slow to repeat). The
logits of both CLIP paths are compared.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import (environment_lines, interleaved, record, smooth_image, torch_clip, torch_maskformer, torch_masks,
                    torch_region_logits)

SWIN_B = dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=12)
DECODER = dict(d_model=256, decoder_layers=6, decoder_ffn_dim=2048, decoder_attention_heads=8, num_queries=100)
PRESETS = {
    "tiny": dict(segmenter="swin", size=128, threshold=0.4, fpn=64,
                 swin=dict(embed_dim=32, depths=[2, 2, 2, 2], num_heads=[2, 4, 4, 8], window_size=4),
                 decoder=dict(d_model=64, decoder_layers=3, decoder_ffn_dim=256, decoder_attention_heads=4,
                              num_queries=16),
                 clip=dict(embed_dim=64, resolution=32, patch=4, vision_width=96, vision_layers=3, mask_depth=2)),
    "r101c_vitb": dict(segmenter="r101c", size=640, threshold=0.5,
                       clip=dict(embed_dim=512, resolution=224, patch=16, vision_width=768, vision_layers=12,
                                 mask_depth=3)),
    "swinb_vitl": dict(segmenter="swin", size=640, threshold=0.4, fpn=256, swin=SWIN_B, decoder=DECODER,
                       clip=dict(embed_dim=768, resolution=224, patch=14, vision_width=1024, vision_layers=24,
                                 mask_depth=3)),
}
ENSEMBLE_WEIGHT = 0.7


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


# ---------------------------------------------------------------------------------------------
# Timing on random weights


def build(preset: dict, names: list[str], directory: Path, dtypes: list[str], queries: int | None = None):
    """-> (torch segmenter or None, torch CLIP, {dtype: Predictor}); every dtype has the same weights.
    `queries`: the segmenter's number of queries (proposals) instead of the preset's."""
    import jax.numpy as jnp
    from flax import nnx

    import ovseg_jax.clip as oclip
    import ovseg_jax.segmenter as oseg
    from ovseg_jax.inference.ensemble import Predictor
    from ovseg_jax.models.maskformer import Segmenter, SegmenterConfig
    from ovseg_jax.text import Tokenizer, write_word_vocab

    write_word_vocab(["a"] + names, directory / "tokenizer")
    vocab = Tokenizer.from_dir(directory / "tokenizer", context_length=16).vocab_size
    t_clip = torch_clip(preset["clip"], vocab, directory / "clip.pt")
    clip_dim = preset["clip"]["embed_dim"]
    t_seg = None
    if preset["segmenter"] == "swin":
        decoder = preset["decoder"] | ({"num_queries": queries} if queries else {})
        t_seg = torch_maskformer(preset["swin"], decoder, preset["fpn"], len(names), directory / "segmenter")
        make = lambda dtype: oseg.load(directory / "segmenter", clip_dim=clip_dim, dtype=dtype)  # noqa: E731
    else:
        config = SegmenterConfig.r101c(clip_dim=clip_dim)
        config = config.replace(num_queries=queries) if queries else config
        make = lambda dtype: Segmenter(config, dtype=dtype, rngs=nnx.Rngs(0))  # noqa: E731
    reference = make(jnp.float32)
    predictors = {}
    for dtype in dtypes:
        segmenter = reference if dtype == "float32" else make(getattr(jnp, dtype))
        nnx.update(segmenter, nnx.state(reference))  # the same weights whatever the constructor drew
        clip = oclip.load(directory / "clip.pt", tokenizer=directory / "tokenizer", dtype=getattr(jnp, dtype))
        predictors[dtype] = Predictor(segmenter, clip, mask_threshold=preset["threshold"],
                                      ensemble_weight=ENSEMBLE_WEIGHT, templates=["a {}"])
    return t_seg, t_clip, predictors


def time_preset(args) -> None:
    import jax
    import torch

    from ovseg_jax.utils.compilation import CompileTimer
    from ovseg_jax.data import registry
    from ovseg_jax.inference.ensemble import Predictor

    preset = PRESETS[args.preset]
    size, threshold = args.size or preset["size"], preset["threshold"]
    names = list(registry.class_names("ade20k_150"))
    rs = np.random.RandomState(0)
    image = smooth_image(size, size, rs)
    batches = {b: np.stack([image] + [smooth_image(size, size, rs) for _ in range(b - 1)]) for b in args.batches}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        t_seg, t_clip, predictors = build(preset, names, Path(tmp), args.dtypes, args.queries)
        log(f"built and loaded the models in {time.perf_counter() - t0:.1f} s")
    base = predictors[args.dtypes[0]]
    with CompileTimer() as compiling:
        t0 = time.perf_counter()
        proposals = jax.block_until_ready(base.proposals(image, names))  # its first call: the table's
        base_first, base_compile = time.perf_counter() - t0, compiling.seconds
    masks, num_queries = proposals.mask_probs, proposals.mask_probs.shape[0]
    binary = torch.from_numpy(np.asarray(masks)) > threshold
    bank = torch.from_numpy(np.asarray(base.text_bank(names)))
    size_crop = preset["clip"]["resolution"]
    filtered = {(d, k): Predictor(p.segmenter, p.clip, mask_threshold=threshold, ensemble_weight=ENSEMBLE_WEIGHT,
                                  templates=["a {}"], clip_top_k=k)
                for d, p in predictors.items() for k in args.top_k if k < num_queries}

    def in_torch(fn):
        def run():
            with torch.inference_mode():
                return fn()
        return run

    last = {}  # the latest outputs of the CLIP paths, compared below (no extra slow calls)

    def remember(key, fn):
        def run():
            last[key] = fn()
            return last[key]
        return run

    fns = {}
    for dtype, p in predictors.items():
        fns[("segmenter", "ovseg_jax", dtype)] = lambda p=p: p.proposals(image, names)
    if t_seg is not None and not args.no_torch:
        fns[("segmenter", "torch (transformers)", "float32")] = in_torch(lambda: torch_masks(t_seg, image))
    for dtype, p in predictors.items():
        fns[("CLIP crops", f"ovseg_jax, all {num_queries}", dtype)] = \
            remember(dtype, lambda p=p: p.classify_crops(image, masks, names))
        for k in args.top_k:
            if (dtype, k) in filtered:
                fns[("CLIP crops", f"ovseg_jax, top-{k}", dtype)] = lambda f=filtered[(dtype, k)]: f.classify_crops(
                    image, masks, names, pred_logits=proposals.pred_logits)
    if not args.no_torch:
        fns[("CLIP crops", f"torch loop, {int(binary.flatten(1).any(1).sum())} valid", "float32")] = \
            remember("torch", in_torch(lambda: torch_region_logits(t_clip, bank, image, binary, size_crop)))
    for b, images in batches.items():
        for dtype, p in predictors.items():
            fns[(f"batch {b}", "ovseg_jax predict_batch", dtype)] = lambda p=p, x=images: p.predict_batch(x, names)

    log(f"preset {args.preset}: {len(fns)} timed functions, {args.rounds} rounds")
    results = interleaved({" | ".join(k): f for k, f in fns.items()}, args.rounds, log=log)
    results = {tuple(k.split(" | ")): v for k, v in results.items()}
    key = ("segmenter", "ovseg_jax", args.dtypes[0])
    results[key] = (base_first, base_compile, results[key][2])  # compiled above, for the masks

    agreement = {}
    if not args.no_torch:
        want, valid = last["torch"]
        for dtype in predictors:
            got, _ = last[dtype]
            agreement[dtype] = float(np.abs(np.asarray(got)[valid.numpy(), :-1] - want.numpy()).max())

    device = jax.devices()[0]
    print("\n".join(environment_lines()))
    print(f"\nInference time split, preset {args.preset} ({size}x{size} image, {num_queries} proposals, "
          f"{len(names)} classes, threshold {threshold}) on {device.platform} ({device.device_kind}), "
          f"torch threads {torch.get_num_threads()}, {args.rounds} round(s), machine shared with other jobs")
    print_split_table(results, args.rounds)
    record_comparisons(args, results, num_queries, size)
    for dtype, diff in agreement.items():
        print(f"CLIP logits, ovseg_jax {dtype} vs torch loop (valid crops): max |difference| {diff:.2e}")


def record_comparisons(args, results: dict, num_queries: int, size: int) -> None:
    """`--record`: CLIP on the crops vs the original's loop, the segmenter vs transformers, and
    `predict_batch` end to end vs the original's per-image inference (segmenter + loop), per dtype."""
    torch_s = {part: s for (part, impl, _), (_, _, s) in results.items() if impl.startswith("torch")}
    what = f"preset {args.preset}, {size}x{size}, {num_queries} proposals"
    for (part, impl, dtype), (_, _, median) in results.items():
        if impl.startswith("torch"):
            continue
        if part == "segmenter" and part in torch_s:
            record(args.record, f"segmenter `Predictor.proposals`, {what}, {dtype}", f"{median:.2f} s/image",
                   f"transformers MaskFormer {torch_s[part]:.2f} s/image", torch_s[part] / median, unit="s/image")
        elif part == "CLIP crops" and impl.startswith("ovseg_jax, all") and part in torch_s:
            record(args.record, f"CLIP on the masked crops `Predictor.classify_crops`, {what}, {dtype}",
                   f"{median:.2f} s/image", f"the original's crop loop in torch {torch_s[part]:.2f} s/image",
                   torch_s[part] / median, unit="s/image")
        elif part.startswith("batch") and len(torch_s) == 2:
            whole = sum(torch_s.values())
            rate = int(part.split()[1]) / median
            record(args.record, f"`Predictor.predict_batch` end to end, {what}, batch {part.split()[1]}, {dtype}",
                   f"{rate:.3f} images/s", f"the original's inference in torch {1 / whole:.3f} images/s",
                   rate * whole, unit="images/s")


def print_split_table(results: dict, rounds: int) -> None:
    """Rows (part, implementation, dtype) -> first-call s (its compile s), median s (images/s for
    batches), the ratio to torch's median of the same part (> 1: faster than torch)."""
    steady = "median s" if rounds else "run s"
    torch_s = {part: s for (part, impl, _), (_, _, s) in results.items() if impl.startswith("torch")}
    print(f"{'part':<11} {'implementation':<24} {'dtype':<9} {'first call s':>12} {'compile s':>9} {steady:>9} "
          f"{'vs torch':>8}")
    for (part, impl, dtype), (first, compiling, median) in results.items():
        if part.startswith("batch"):
            continue
        ratio = f"{torch_s[part] / median:7.2f}x" if part in torch_s else "-"
        print(f"{part:<11} {impl:<24} {dtype:<9} {first:12.2f} {compiling:9.2f} {median:9.3f} {ratio:>8}")
    totals = {}
    for (part, impl, dtype), (_, _, median) in results.items():
        if part == "segmenter" or (part == "CLIP crops" and ("all" in impl or impl.startswith("torch"))):
            key = "torch" if impl.startswith("torch") else dtype
            totals[key] = totals.get(key, 0.0) + median
    torch_whole = "torch" in totals and len(torch_s) == 2
    if totals:
        print(f"per image, segmenter + CLIP crops ({steady}): " + ", ".join(f"{k} {v:.3f}" for k, v in totals.items())
              + ("  (torch: CLIP crops only)" if "torch" in totals and not torch_whole else ""))
    rows = [(part, dtype, first, compiling, median) for (part, _, dtype), (first, compiling, median) in results.items()
            if part.startswith("batch")]
    if rows:
        torch_rate = 1.0 / totals["torch"] if torch_whole else None
        print(f"\n{'predict_batch':<13} {'dtype':<9} {'first call s':>12} {'compile s':>9} {'images/s':>9} "
              f"{'vs torch':>8}")
        for part, dtype, first, compiling, median in rows:
            rate = int(part.split()[1]) / median
            ratio = f"{rate / torch_rate:7.2f}x" if torch_rate else "-"
            print(f"{part:<13} {dtype:<9} {first:12.2f} {compiling:9.2f} {rate:9.3f} {ratio:>8}")
        if torch_rate:
            print(f"{'torch, per image loop':<23} {'float32':<9} {'':>9} {torch_rate:9.3f} {'1.00x':>8}")


# ---------------------------------------------------------------------------------------------
# Crop statistics and the top-k filter on a trained model (the synthetic world)

RANKINGS = {
    "confidence x area": lambda p_mf, p_no, area: p_mf.max(-1) * area,  # ensemble.proposal_ranking
    "confidence": lambda p_mf, p_no, area: p_mf.max(-1),
    "objectness (1 - p_no)": lambda p_mf, p_no, area: 1.0 - p_no,
    "objectness x area": lambda p_mf, p_no, area: (1.0 - p_no) * area,
}


def winner_map(class_probs: np.ndarray, mask_probs: np.ndarray) -> np.ndarray:
    """`[Q, C]` ensemble probabilities, `[Q, H, W]` masks -> `[H, W]` the proposal that wins each pixel:
    the one adding most to the winning class's score `Σ_q p[q, c] M[q]` there."""
    scores = np.einsum("qc,qhw->chw", class_probs, mask_probs)
    label = scores.argmax(0)  # [H, W]
    contribution = np.take_along_axis(class_probs.T[:, :, None, None] * mask_probs[None], label[None, None], 0)[0]
    return contribution.argmax(0)


def crop_stats(args) -> None:
    import jax

    from ovseg_jax import evaluate as ev
    from ovseg_jax.data import pipeline, registry
    from ovseg_jax.experiments.demo import load_config
    from ovseg_jax.inference.ensemble import ensemble_class_probs
    from ovseg_jax.inference.loading import load_predictor

    settings = load_config(None).eval
    root = Path(args.root)
    weight = settings.ensemble_weight
    predictor = load_predictor(args.checkpoint, root / "tokenizer", mask_threshold=settings.mask_threshold,
                               ensemble_weight=weight, templates=list(settings.templates))
    source = registry.get("synthetic").make_source(root, "val")
    names = list(source.class_names)
    q = predictor.segmenter.config.num_queries
    ks = sorted({min(k, q) for k in args.top_k}, reverse=True)
    per_image = []
    for example in pipeline.eval_loader(source, short=settings.short, max_size=settings.max_size,
                                        bucket=settings.bucket):
        hw = tuple(int(v) for v in example["resized_size"])
        proposals = predictor.proposals(example["image"], names, resized_hw=hw)
        logits, valid = predictor.classify_crops(example["image"], proposals.mask_probs, names)
        probs = np.asarray(ensemble_class_probs(proposals.pred_logits, logits, valid, weight))
        masks = np.asarray(proposals.mask_probs)[:, :hw[0], :hw[1]]
        softmax = np.asarray(jax.nn.softmax(proposals.pred_logits, axis=-1))
        valid = np.asarray(valid)
        won_map = winner_map(probs, masks)
        won = np.unique(won_map)
        won_valid = won[valid[won]]  # invalid proposals never go through CLIP
        needed, covered = {}, {}
        for name, rank in RANKINGS.items():
            score = np.where(valid, rank(softmax[:, :-1], softmax[:, -1], masks.sum((1, 2))), -np.inf)
            position = np.argsort(np.argsort(-score, kind="stable"), kind="stable")  # 0 = ranked first
            needed[name] = int(position[won_valid].max()) + 1 if len(won_valid) else 0
            pixel_position = np.where(valid[won_map], position[won_map], -1)  # -1: an invalid winner, no CLIP
            covered[name] = {k: float(np.mean(pixel_position < k)) for k in ks}
        per_image.append({"valid": int(valid.sum()), "winners": len(won), "invalid_winners": int((~valid[won]).sum()),
                          "needed": needed, "covered": covered})
    print(f"\nProposals after the ensemble, synthetic val ({len(per_image)} images), Q = {q}, λ {weight}, "
          f"mask threshold {settings.mask_threshold}")
    describe = lambda v: (f"min {np.min(v):g}, median {np.median(v):g}, mean {np.mean(v):.1f}, "  # noqa: E731
                          f"90th pct {np.percentile(v, 90):g}, max {np.max(v):g}")
    print(f"valid proposals per image: {describe([r['valid'] for r in per_image])}")
    print(f"proposals winning >= 1 pixel per image: {describe([r['winners'] for r in per_image])}")
    counts = np.bincount([r["winners"] for r in per_image], minlength=q + 1)
    print("  histogram (winners: images): " + ", ".join(f"{n}: {c}" for n, c in enumerate(counts) if c))
    print(f"  winners that are invalid (no pixel above the threshold): {sum(r['invalid_winners'] for r in per_image)}")
    print("k needed for the top-k of a ranking (among the valid proposals) to hold every valid winner:")
    print(f"  {'ranking':<24} {'median':>6} {'90th':>5} {'max':>4}  " + " ".join(f"{'k=' + str(k):>6}" for k in ks)
          + "   (share of images whose winners all fit)")
    for name in RANKINGS:
        need = np.array([r["needed"][name] for r in per_image])
        print(f"  {name:<24} {np.median(need):6g} {np.percentile(need, 90):5g} {need.max():4d}  "
              + " ".join(f"{np.mean(need <= k):6.2f}" for k in ks))
    print("share of pixels whose winner CLIP scores (or an invalid proposal, which needs no CLIP) with the top-k "
          "of a ranking, mean over images:")
    print(f"  {'ranking':<24} " + " ".join(f"{'k=' + str(k):>6}" for k in ks))
    for name in RANKINGS:
        print(f"  {name:<24} " + " ".join(f"{np.mean([r['covered'][name][k] for r in per_image]):6.3f}" for k in ks))

    print(f"\nmIoU with CLIP on the top-k proposals only (ranking: confidence x area), {args.rounds} round(s); "
          "the machine is shared")
    print(f"{'clip top-k':<11} {'mIoU':>6} {'seen':>6} {'unseen':>6} {'eval s':>7}")
    models = (predictor.segmenter, predictor.clip)
    runs = [None] + [k for k in ks if k < q]
    seconds = {k: [] for k in runs}
    reports = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds + 1):  # the first round compiles
            for k in runs:
                argv = ["--checkpoint", args.checkpoint, "--dataset", "synthetic", "--root", str(root), "--out", tmp,
                        "--no-progress", "--batch-size", "4"] + ([] if k is None else ["--clip-top-k", str(k)])
                t0 = time.perf_counter()
                reports[k] = _quiet(ev.run, argv, models)
                seconds[k].append(time.perf_counter() - t0)
    for k in runs:
        r = reports[k]
        print(f"{'all (' + str(q) + ')' if k is None else k:<11} {r['mIoU']:6.1f} {r['mIoU_seen']:6.1f} "
              f"{r['mIoU_unseen']:6.1f} {np.median(seconds[k][1:]):7.1f}")
    if args.json:
        summary = {"per_image": per_image, "miou": {str(k): reports[k]["mIoU"] for k in runs},
                   "seconds": {str(k): seconds[k] for k in runs}}
        Path(args.json).write_text(json.dumps(summary, indent=1))


def _quiet(fn, argv, models):
    """`evaluate.run` without its printed table."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return fn(argv, models=models)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--size", type=int, help="image side (default: the preset's)")
    parser.add_argument("--dtypes", type=lambda t: [v for v in t.split(",") if v], default=["float32", "bfloat16"])
    parser.add_argument("--batches", type=ints, default=[1, 2, 4], help="batch sizes of predict_batch ('' for none)")
    parser.add_argument("--top-k", type=ints, default=[], help="CLIP top-k values to time (or, with --crop-stats, "
                        "to evaluate)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after the first (compiling) call")
    parser.add_argument("--queries", type=int, help="the segmenter's number of queries (proposals) instead of the "
                        "preset's (a shorter run: CLIP's time is linear in it)")
    parser.add_argument("--record", help="append the comparisons as JSON lines here (make bench)")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--crop-stats", action="store_true", help="statistics and top-k mIoU of --checkpoint on the "
                        "synthetic world --root instead of timing a preset")
    parser.add_argument("--checkpoint")
    parser.add_argument("--root")
    parser.add_argument("--json", help="--crop-stats: write the per-image figures here")
    args = parser.parse_args()
    if args.crop_stats:
        if not (args.checkpoint and args.root):
            parser.error("--crop-stats needs --checkpoint and --root (the synthetic world)")
        crop_stats(args)
    else:
        time_preset(args)


if __name__ == "__main__":
    main()
