"""Interactive latency of the web app (`ovseg_jax.web.app`): the time from start to the first result,
and per-request p50 / p95 over 20 `/segment` calls from gradio_client with varying class lists and
image sizes, with compile counts, before and after class-list bucketing.

    .venv/bin/python bench/serve.py                                 # tiny preset, before and after
    .venv/bin/python bench/serve.py --preset r101c --variants after --requests 20

Presets, random weights built in JAX, the 14 ViLD templates, λ 0.7:
- tiny: the demo's models (configs/synthetic.py: Swin embed 32, 16 queries; CLIP ViT 32 px, patch 4,
  width 96, 3 layers, mask prompts depth 2), short side 128, threshold 0.4;
- r101c: OVSeg's R101c segmenter (`SegmenterConfig.r101c`, 100 queries) + CLIP ViT-B/16 @ 224 with
  mask prompts depth 3, short side 512 (reference 3.5), threshold 0.5.
Requests (the same for every variant; seed 0): 20 calls, each with 1-12 names drawn from 40 (so
later requests repeat some names), cycling through three image sizes (square, landscape, portrait:
three padded shapes; the warm-up compiles the square one).

Variants, each in a fresh process (empty jit caches, no persistent compilation cache):
- before: the previous commit's behaviour: one program per class count (`Predictor(class_bucket=1)`)
  and all new names' texts through the text tower at once, padded to a power of two
  (`ovseg_jax.clip._FEW_NAMES = 0`: a text program per power of two);
- after: class lists padded to 16 (`class_bucket=16`, one program per image shape) and new names
  encoded one name per call (one text program).
"Start -> first result": from the process's start (models built, app built, warm-up, served) to the
answer of the first request. Compiles are XLA compilations in the serving process
(`utils.compilation.CompileTimer`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

T_START = time.perf_counter()

ROOT = Path(__file__).resolve().parents[1]
VOCABULARY = ["sky", "tree", "grass", "road", "car", "person", "building", "wall", "floor", "ceiling", "window",
              "door", "table", "chair", "sofa", "bed", "lamp", "cat", "dog", "bird", "horse", "water", "sea",
              "mountain", "sand", "snow", "rock", "flower", "plant", "fence", "bridge", "boat", "bicycle", "sign",
              "cup", "bottle", "book", "screen", "cloud", "red car"]
PRESETS = {"tiny": dict(short=128, max_size=512, threshold=0.4, sizes=[(64, 64), (48, 72), (72, 48)]),
           "r101c": dict(short=512, max_size=2048, threshold=0.5, sizes=[(480, 480), (480, 640), (640, 480)])}


def request_plan(count: int, sizes: list[tuple[int, int]], seed: int = 0) -> list[tuple[tuple[int, int], list[str]]]:
    """(image size, class names) of each request."""
    rs = np.random.RandomState(seed)
    return [(sizes[i % len(sizes)], [VOCABULARY[j] for j in rs.choice(len(VOCABULARY), rs.randint(1, 13), False)])
            for i in range(count)]


def build_predictor(preset: str, directory: Path, class_bucket: int):
    """Random models of `preset` and a word tokenizer of the vocabulary -> Predictor."""
    from flax import nnx

    from ovseg_jax.clip import Clip
    from ovseg_jax.inference.ensemble import Predictor
    from ovseg_jax.models.clip import CLIP, ClipConfig
    from ovseg_jax.models.maskformer import Segmenter, SegmenterConfig
    from ovseg_jax.text import VILD_TEMPLATES, Tokenizer, write_word_vocab

    write_word_vocab(VOCABULARY + list(VILD_TEMPLATES), directory)
    if preset == "tiny":
        sys.path.insert(0, str(ROOT / "configs"))
        import synthetic  # configs/synthetic.py

        clip_config, seg_config = synthetic.clip_config(), synthetic.segmenter_config()
    else:
        clip_config, seg_config = ClipConfig.vit_b16(mask_prompt_depth=3), SegmenterConfig.r101c(clip_dim=512)
    tokenizer = Tokenizer.from_dir(directory, context_length=clip_config.context_length)
    clip_config = clip_config.replace(vocab_size=tokenizer.vocab_size, eot_token_id=tokenizer.eot_token_id)
    clip = Clip(CLIP(clip_config, rngs=nnx.Rngs(0)), tokenizer)
    return Predictor(Segmenter(seg_config, rngs=nnx.Rngs(1)), clip, mask_threshold=PRESETS[preset]["threshold"],
                     ensemble_weight=0.7, templates="vild", class_bucket=class_bucket)


def run_variant(preset: str, variant: str, count: int) -> dict:
    """One variant in this process -> its figures (see the module docstring)."""
    from PIL import Image
    from gradio_client import Client, handle_file

    import ovseg_jax.clip
    from common import smooth_image  # bench/common.py
    from ovseg_jax.utils.compilation import CompileTimer
    from ovseg_jax.web.app import build_app, launch

    settings = PRESETS[preset]
    if variant == "before":
        ovseg_jax.clip._FEW_NAMES = 0
    with tempfile.TemporaryDirectory() as tmp, CompileTimer() as all_compiles:
        tmp = Path(tmp)
        predictor = build_predictor(preset, tmp / "tokenizer", 1 if variant == "before" else 16)
        app = build_app(predictor, short=settings["short"], max_size=settings["max_size"])
        t0 = time.perf_counter()
        app.service.warm_up()
        warm_up = time.perf_counter() - t0
        client = Client(launch(app, port=None, block=False, quiet=True), verbose=False)
        rs = np.random.RandomState(1)
        seconds, compiles, first_result = [], [], None
        for i, ((h, w), names) in enumerate(request_plan(count, settings["sizes"])):
            path = tmp / f"request{i}.png"
            Image.fromarray(smooth_image(h, w, rs)).save(path)
            with CompileTimer() as timer:
                t0 = time.perf_counter()
                client.predict(handle_file(str(path)), ", ".join(names), "semantic", 0.7, settings["threshold"],
                               api_name="/segment")
                seconds.append(time.perf_counter() - t0)
            compiles.append(timer.count)
            first_result = first_result or time.perf_counter() - T_START
            print(f"  {variant} request {i}: {h}x{w}, {len(names)} names, {seconds[-1]:.2f} s, "
                  f"{timer.count} compiles", file=sys.stderr, flush=True)
        app.close()
    return {"preset": preset, "variant": variant, "first_result_s": first_result, "warm_up_s": warm_up,
            "p50_s": float(np.percentile(seconds, 50)), "p95_s": float(np.percentile(seconds, 95)),
            "max_s": max(seconds), "requests": len(seconds), "request_compiles": sum(compiles),
            "requests_compiling": sum(c > 0 for c in compiles), "total_compiles": all_compiles.count,
            "seconds": [round(s, 3) for s in seconds], "compiles": compiles}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--variants", nargs="+", choices=["before", "after"], default=["before", "after"])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--out", help="also write the figures here (JSON lines)")
    parser.add_argument("--child", choices=["before", "after"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_variant(args.preset, args.child, args.requests)))
        return
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env["GRADIO_ANALYTICS_ENABLED"] = "False"
    rows = []
    for variant in args.variants:
        run = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--requests", str(args.requests),
                              "--child", variant], env=env, stdout=subprocess.PIPE, text=True, check=True)
        rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
    print(f"\n{args.preset}: {args.requests} requests, 1-12 names of {len(VOCABULARY)}, sizes "
          f"{PRESETS[args.preset]['sizes']} (short side {PRESETS[args.preset]['short']})")
    print(f"{'variant':8} {'start->1st result':>18} {'warm-up':>8} {'p50':>7} {'p95':>7} {'max':>7} "
          f"{'compiles in requests':>21} {'requests compiling':>19}")
    for r in rows:
        print(f"{r['variant']:8} {r['first_result_s']:17.1f}s {r['warm_up_s']:7.1f}s {r['p50_s']:6.2f}s "
              f"{r['p95_s']:6.2f}s {r['max_s']:6.1f}s {r['request_compiles']:21d} "
              f"{r['requests_compiling']:>12d} of {r['requests']}")
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
