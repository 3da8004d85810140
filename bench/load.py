"""Time to load a full-size OVSeg checkpoint (Swin-B segmenter + CLIP ViT-L/14 in one file, the
layout of the released `ovseg_swinbase_vitL14_ft_mpt.pth`), each load in a fresh process.

    .venv/bin/python bench/load.py                        # writes /tmp/ovseg_load_bench/ (2.1 GB) once
    .venv/bin/python bench/load.py --dir DIR --rounds 3

The file holds random values (drawn with numpy into a model built by `convert.params.unfilled`,
so writing it costs no random initialisation either) and is written once as `.safetensors`. Each
round runs `ovseg_jax.segmenter.load(file)` then `ovseg_jax.clip.load(file)` in a new Python process
and prints the seconds of each (imports excluded; the file is in the page cache after the first
round). The loaders build their models with `unfilled` (no random initialisation) whenever the file
must fill every parameter; before that change they spent most of these seconds drawing random
weights that the file then replaced.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from common import ROOT, environment_lines  # bench/common.py

LOAD = r"""
import sys, time
import jax
from flax import nnx
from ovseg_jax import clip as clip_api, segmenter as segmenter_api
path = sys.argv[1]
t0 = time.perf_counter()
jax.block_until_ready(nnx.state(segmenter_api.load(path)))
t1 = time.perf_counter()
jax.block_until_ready(nnx.state(clip_api.load(path).model))
print(f"{t1 - t0:.2f} {time.perf_counter() - t1:.2f}")
"""


def write_checkpoint(path: Path) -> None:
    import numpy as np
    from flax import nnx

    from ovseg_jax import segmenter as segmenter_api
    from ovseg_jax.clip import Clip
    from ovseg_jax.convert.params import unfilled
    from ovseg_jax.models.clip import CLIP, ClipConfig
    from ovseg_jax.models.maskformer import Segmenter, SegmenterConfig

    rng = np.random.default_rng(0)

    def random(model):
        for _, variable in nnx.to_flat_state(nnx.state(model)):
            variable.set_value((0.02 * rng.standard_normal(variable.shape, np.float32)).astype(variable.dtype))
        return model

    segmenter = random(unfilled(lambda rngs: Segmenter(SegmenterConfig.swin_b(), rngs=rngs)))
    clip = random(unfilled(lambda rngs: CLIP(ClipConfig.vit_l14(), rngs=rngs)))
    segmenter_api.export(segmenter, path, clip=Clip(clip))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/ovseg_load_bench"))
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    path = args.dir / "ovseg_swinb_vitl14.safetensors"
    if not path.exists():
        args.dir.mkdir(parents=True, exist_ok=True)
        print(f"writing {path} (2.1 GB) ...", flush=True)
        write_checkpoint(path)
    print("\n".join(environment_lines()))
    print(f"\n{'round':>5} {'segmenter.load s':>17} {'clip.load s':>12}")
    for r in range(args.rounds):
        out = subprocess.run([sys.executable, "-c", LOAD, str(path)], cwd=ROOT, capture_output=True, text=True,
                             check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        seg, clip = out.stdout.split()[-2:]
        print(f"{r + 1:>5} {float(seg):>17.1f} {float(clip):>12.1f}", flush=True)


if __name__ == "__main__":
    main()
