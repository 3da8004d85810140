"""Pair-mining throughput (ovseg_jax.mine_pairs): images/s of the whole loop (read, resize, segmenter
proposals, CLIP on every proposal's masked crop, selection, writing), random weights.

    .venv/bin/python bench/mining.py                              # tiny: the synthetic demo's models, 64-px scenes at 128
    .venv/bin/python bench/mining.py --preset large --images 2    # Swin-B + ViT-L/14, 640x853 images, 100 proposals

The first run over a fresh workdir compiles; the rate is of a second run over another workdir
(same shapes, compiled), best of `--repeats`. Every noun is kept (min_score 0) so writing is
included at its largest.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx
from PIL import Image

from ovseg_jax.clip import Clip
from ovseg_jax.data import synthetic
from ovseg_jax.mining import miner
from ovseg_jax.models.clip import CLIP, ClipConfig
from ovseg_jax.models.maskformer import Segmenter, SegmenterConfig
from ovseg_jax.text import Tokenizer, write_word_vocab


def _models(preset: str, tmp: Path):
    tokenizer = Tokenizer.from_dir(write_word_vocab(synthetic.TOKENIZER_WORDS, tmp / "tokenizer"))
    if preset == "tiny":
        import importlib.util  # noqa: PLC0415

        spec = importlib.util.spec_from_file_location("synthetic_config", Path(__file__).resolve().parents[1]
                                                      / "configs" / "synthetic.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        clip_config, seg_config = module.clip_config(), module.segmenter_config()
    else:
        clip_config = ClipConfig.vit_l14(vocab_size=tokenizer.vocab_size, eot_token_id=tokenizer.eot_token_id)
        seg_config = SegmenterConfig.swin_b(clip_dim=clip_config.embed_dim)
    clip = Clip(CLIP(clip_config, rngs=nnx.Rngs(0)),
                Tokenizer.from_dir(tmp / "tokenizer", context_length=clip_config.context_length))
    return Segmenter(seg_config, rngs=nnx.Rngs(1)), clip


def _world(tmp: Path, count: int, size: tuple[int, int]) -> Path:
    """`count` synthetic scenes resized to `size` (H, W) with their captions."""
    lines = []
    for i in range(count):
        image, _, names = synthetic.render(np.random.default_rng([0, i]), 64)
        Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR).save(tmp / f"{i:04d}.png")
        lines.append(json.dumps({"image": f"{i:04d}.png", "caption": synthetic.caption(names)}))
    (tmp / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return tmp / "captions.jsonl"


def _config(captions: Path, preset: str, batch: int) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.data = {"kind": "jsonl", "path": str(captions), "captions": "one"}
    c.nouns = {"extractor": "vocabulary", "vocabulary": "synthetic"}
    sizes = dict(short=128, max_size=512, bucket=32) if preset == "tiny" else dict(short=640, max_size=2560, bucket=128)
    c.model = {"segmenter": "-", "clip": "-", "templates": ("a {}",), "mask_threshold": 0.4, "batch_size": batch,
               **sizes}
    c.min_score = 0.0
    c.mask_format = "rle"
    return miner.check_config(c)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["tiny", "large"], default="tiny")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        models = _models(args.preset, tmp)
        size = (64, 64) if args.preset == "tiny" else (640, 853)
        captions = _world(tmp, args.images, size)
        config = _config(captions, args.preset, args.batch)
        t0 = time.perf_counter()
        report = miner.run(config, tmp / "run0", models=models)
        first = time.perf_counter() - t0
        best = float("inf")
        for r in range(args.repeats):
            t0 = time.perf_counter()
            miner.run(_config(captions, args.preset, args.batch), tmp / f"run{r + 1}", models=models)
            best = min(best, time.perf_counter() - t0)
    print(f"preset {args.preset}: {args.images} images of {size[0]}x{size[1]}, batch {args.batch}, "
          f"{jax.devices()[0].platform} x{len(jax.local_devices())}")
    print(f"first run (compiling) {first:.1f} s; then {args.images / best:.2f} images/s "
          f"({best / args.images * 1000:.0f} ms/image), {report['pairs']} pairs")


if __name__ == "__main__":
    main()
