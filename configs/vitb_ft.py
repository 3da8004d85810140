"""CLIP ViT-B/16 full fine-tuning (reference 4.2 with the ViT-B script; appendix D for R101c).

    python -m ovseg_jax.train --config configs/vitb_ft.py --workdir runs/vitb_ft

Same recipe as vitl_ft.py with OpenAI's ViT-B-16.pt and 4 GPUs x 128 = global batch 512
(863 steps/epoch, 5 epochs; the appendix's 1024 came from an 8-GPU run).

Appendix Table 2 variants (`ovseg_jax.ablate`): `after_mpt` is MPT -> FT's second stage: this
recipe from runs/vitb_mpt_no_ft (`vitb_mpt.py:no_ft`) with its mask prompts kept and frozen
(the appendix: "FT with fixed mask prompts"); `joint` trains the visual tower and fresh mask
prompts (depth as vitb_mpt.py) at once from OpenAI's weights, the prompts at MPT's lr 0.05 and
weight decay 0 through the optimiser's per-parameter multipliers.
"""

from ovseg_jax import configs
from ovseg_jax.experiments import ablation
from ovseg_jax.models.clip import ClipConfig


VARIANTS = ("after_mpt", "joint")


def get_config(arg=None):
    options = ablation.parse_variant(arg, VARIANTS, config="configs/vitb_ft.py")
    c = configs.clip_finetune(ClipConfig.vit_b16(), lr=5e-6, total_steps=5 * 863, warmup_steps=100,
                              batch_size=512)
    c.init_from = "weights/ViT-B-16.pt"
    c.data = configs.clip_pairs_data("data/coco_proposal_1cap/coco_proposal_1cap.csv",
                                     tokenizer=configs.OPENAI_BPE)
    c.checkpoint.interval = 500
    if not options:
        return c
    mpt = ablation.sibling_config(__file__, "vitb_mpt.py")
    return ablation.ft_recipe_variant(c, mpt, options, mpt_workdir="runs/vitb_mpt_no_ft")
