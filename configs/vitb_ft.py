"""CLIP ViT-B/16 full fine-tuning (reference 4.2 with the ViT-B script; appendix D for R101c).

    python -m ovseg_jax.train --config configs/vitb_ft.py --workdir runs/vitb_ft

Same recipe as vitl_ft.py with OpenAI's ViT-B-16.pt and 4 GPUs x 128 = global batch 512
(863 steps/epoch, 5 epochs; the appendix's 1024 came from an 8-GPU run).
"""

from ovseg_jax import configs
from ovseg_jax.models.clip import ClipConfig


def get_config(arg=None):
    configs.check_variant(arg, config="configs/vitb_ft.py")
    c = configs.clip_finetune(ClipConfig.vit_b16(), lr=5e-6, total_steps=5 * 863, warmup_steps=100,
                              batch_size=512)
    c.init_from = "weights/ViT-B-16.pt"
    c.data = configs.clip_pairs_data("data/coco_proposal_1cap/coco_proposal_1cap.csv",
                                     tokenizer=configs.OPENAI_BPE)
    c.checkpoint.interval = 500
    return c
