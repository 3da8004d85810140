"""Mine mask-category pairs from COCO Captions (the paper's caption pairs, reference 4.1).

    python -m ovseg_jax.mine_pairs --config configs/mine_coco.py --workdir outputs/mined_coco
    python -m ovseg_jax.mine_pairs --config configs/mine_coco.py:tfds --workdir outputs/mined_coco
    python -m ovseg_jax.mine_pairs --config configs/mine_coco.py:both --workdir outputs/mined_coco_gt

Variants: "" (COCO 2017 layout: `datasets/coco/annotations/captions_train2017.json` +
`datasets/coco/train2017/`), "tfds" (TFDS `coco_captions` train split, Karpathy's; needs
`tfds build coco_captions --file_format=array_record` once), "both" (caption pairs plus the
COCO-Stuff 171 ground-truth pairs, the appendix's Table 5). Nouns: the offline vocabulary
(COCO-Stuff 171 in caption wording plus synonyms, `ovseg_jax.mining.nouns.coco_vocabulary`);
`--config.nouns.extractor=nltk` for NLTK's tagger. One caption per image (the released
`coco_proposal_1cap`); `--config.data.captions=all` for every caption. The segmenter and the
pre-trained CLIP ViT-L/14 (mask prompts off: the adaptation is what the pairs are for) are
the released OVSeg checkpoint and OpenAI's weights.
"""

import ml_collections

from ovseg_jax import configs
from ovseg_jax.mining import miner

VARIANTS = ("tfds", "both")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = configs.check_variant(arg, VARIANTS, config="configs/mine_coco.py")
    c = ml_collections.ConfigDict()
    c.data = {"kind": "coco", "path": "datasets/coco", "split": "train2017", "captions": "one"}
    if arg == "tfds":
        c.data = {"kind": "tfds", "split": "train", "data_dir": "", "captions": "one"}
    c.nouns = {"extractor": "vocabulary", "vocabulary": "coco"}
    c.model = {"segmenter": "weights/ovseg_swinbase_vitL14_ft_mpt.pth", "clip": "weights/ViT-L-14.pt",
               "tokenizer": configs.OPENAI_BPE, "templates": "vild", "mask_prompts": False,
               "mask_threshold": 0.4, "short": 640, "max_size": 2560, "bucket": 128, "batch_size": 4}
    c.score = "softmax"
    c.min_score = 0.5
    c.min_area = 0.001  # proposals under 0.1% of the image are mostly fragments
    c.mask_format = "png"
    if arg == "both":
        c.sources = "both"
        c.gt = {"dataset": "coco_stuff_171", "root": "datasets", "split": "train", "min_pixels": 64}
    return miner.check_config(c)
