"""CLIP ViT-L/14 full fine-tuning on masked-crop/noun pairs (reference 4.2; stage A).

    python -m ovseg_jax.train --config configs/vitl_ft.py --workdir runs/vitl_ft

Needs OpenAI's ViT-L-14.pt (or a transformers `openai/clip-vit-large-patch14` directory) and the
released `coco_proposal_1cap.csv` pairs with their crop images (OVSeg's
open_clip_training/README.md links them). Released scripts: 4 GPUs x 32 = global batch 128,
5 epochs of 442,117 pairs (3,454 steps/epoch), lr 5e-6, warmup 100, cosine.
"""

from ovseg_jax import configs
from ovseg_jax.models.clip import ClipConfig


def get_config(arg=None):
    del arg
    c = configs.clip_finetune(ClipConfig.vit_l14(), lr=5e-6, total_steps=5 * 3454, warmup_steps=100,
                              batch_size=128)
    c.init_from = "weights/ViT-L-14.pt"
    c.data = configs.clip_pairs_data("data/coco_proposal_1cap/coco_proposal_1cap.csv")
    c.checkpoint.interval = 1000
    return c
