"""Mask prompt tuning of the fine-tuned CLIP ViT-B/16 (reference 4.3 with the ViT-B recipe).

    python -m ovseg_jax.train --config configs/vitb_mpt.py --workdir runs/vitb_mpt \
        --config.init_from=runs/vitb_ft

Prompts `visual.mask_embedding [3, 196, 768]`; global batch 512 as vitb_ft.py.
"""

from ovseg_jax import configs
from ovseg_jax.models.clip import ClipConfig


def get_config(arg=None):
    configs.check_variant(arg, config="configs/vitb_mpt.py")
    c = configs.mask_prompt_tuning(ClipConfig.vit_b16(), depth=3, lr=0.05, total_steps=5 * 863,
                                   warmup_steps=100, batch_size=512)
    c.init_from = "runs/vitb_ft"
    c.data = configs.clip_pairs_data("data/coco_proposal_1cap/coco_proposal_1cap.csv",
                                     tokenizer=configs.OPENAI_BPE)
    c.checkpoint.interval = 500
    return c
