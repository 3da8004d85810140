"""Mine mask-category pairs from the synthetic world's captions with the demo's trained models.

    python -m ovseg_jax.demo --out outputs/demo
    python -m ovseg_jax.mine_pairs --config configs/mine_synthetic.py:outputs/demo \
        --workdir outputs/demo/world/mined

The argument is the demo's output folder (default `outputs/demo`): its merged checkpoint gives
the segmenter, its pretrained CLIP (`train/pretrain`, before any adaptation, as the paper mines
with the pre-trained CLIP) scores the crops, its world gives the captions and, since the truth is
known there, the label agreement of the mined pairs. Nouns: the world's 20 class names (seen and
unseen; captions name every visible class). `configs/synthetic.py:mined` trains the CLIP stages
on `world/mined/pairs.jsonl`.
"""

import ml_collections

from ovseg_jax.mining import miner

TEMPLATES = ("a {}",)  # the world's caption phrasing, as configs/synthetic.py


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    demo = arg or "outputs/demo"
    world = f"{demo}/world"
    c = ml_collections.ConfigDict()
    c.data = {"kind": "jsonl", "path": f"{world}/captions.jsonl", "captions": "one"}
    c.nouns = {"extractor": "vocabulary", "vocabulary": "synthetic"}
    c.model = {"segmenter": f"{demo}/ovseg_synthetic.pth", "clip": f"{demo}/train/pretrain",
               "tokenizer": f"{world}/tokenizer", "templates": TEMPLATES, "mask_prompts": False,
               # the demo's evaluation sizes: 64-px scenes seen at 128 (configs/synthetic.py)
               "mask_threshold": 0.4, "short": 128, "max_size": 512, "bucket": 32, "batch_size": 16}
    c.score = "softmax"
    c.min_score = 0.5
    c.min_area = 0.0
    c.mask_format = "rle"
    c.agreement = f"synthetic:{world}"
    return miner.check_config(c)
