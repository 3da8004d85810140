"""CLIP ViT-L/14 full fine-tuning on masked-crop/noun pairs (reference 4.2; stage A).

    python -m ovseg_jax.train --config configs/vitl_ft.py --workdir runs/vitl_ft

Needs OpenAI's ViT-L-14.pt (or a transformers `openai/clip-vit-large-patch14` directory), the
released `coco_proposal_1cap.csv` pairs with their crop images (OVSeg's
open_clip_training/README.md links them) and OpenAI's tokenizer `weights/bpe_simple_vocab_16e6.txt.gz`
(inside the open_clip_torch / openai-clip wheels; `--config.data.tokenizer=` with a transformers
directory, whose own tokenizer is then used). A missing input stops the run at start, all named. Released scripts: 4 GPUs x 32 = global batch 128,
5 epochs of 442,117 pairs (3,454 steps/epoch), lr 5e-6, warmup 100, cosine.

Appendix Table 2 variants (`ovseg_jax.ablate`): `after_mpt` is MPT -> FT's second stage: this
recipe from runs/vitl_mpt_no_ft (`vitl_mpt.py:no_ft`) with its mask prompts kept and frozen
(the appendix: "FT with fixed mask prompts"); `joint` trains the visual tower and fresh mask
prompts (depth as vitl_mpt.py) at once from OpenAI's weights, the prompts at MPT's lr 0.05 and
weight decay 0 through the optimiser's per-parameter multipliers.
"""

from ovseg_jax import configs
from ovseg_jax.experiments import ablation
from ovseg_jax.models.clip import ClipConfig


VARIANTS = ("after_mpt", "joint")


def get_config(arg=None):
    options = ablation.parse_variant(arg, VARIANTS, config="configs/vitl_ft.py")
    c = configs.clip_finetune(ClipConfig.vit_l14(), lr=5e-6, total_steps=5 * 3454, warmup_steps=100,
                              batch_size=128)
    c.init_from = "weights/ViT-L-14.pt"
    c.data = configs.clip_pairs_data("data/coco_proposal_1cap/coco_proposal_1cap.csv",
                                     tokenizer=configs.OPENAI_BPE)
    c.checkpoint.interval = 1000
    if not options:
        return c
    mpt = ablation.sibling_config(__file__, "vitl_mpt.py")
    return ablation.ft_recipe_variant(c, mpt, options, mpt_workdir="runs/vitl_mpt_no_ft")
