"""Mask prompt tuning of the fine-tuned CLIP ViT-B/16 (reference 4.3 with the ViT-B recipe).

    python -m ovseg_jax.train --config configs/vitb_mpt.py --workdir runs/vitb_mpt \
        --config.init_from=runs/vitb_ft

Prompts `visual.mask_embedding [3, 196, 768]`; global batch 512 as vitb_ft.py.

Appendix variants (`--config configs/vitb_mpt.py:no_ft,depth6`, comma-separated; `ovseg_jax.ablate`):
`depth1` / `depth3` / `depth6` / `depth12` prompt depth (Table 3); `no_ft` starts from OpenAI's
weights instead of the FT run (Table 3's "w/o FT"; also MPT -> FT's first stage, workdir
runs/vitb_mpt_no_ft for `vitb_ft.py:after_mpt`); `vpt` trains deep visual prompts (38
tokens at the first 6 layers, the appendix's 50 per 256 patches) instead of mask prompts, with
the same optimiser and steps (Table 4 with `no_ft`).
"""

from ovseg_jax import configs
from ovseg_jax.experiments import ablation
from ovseg_jax.models.clip import ClipConfig


VARIANTS = ("no_ft", "depth1", "depth3", "depth6", "depth12", "vpt")


def get_config(arg=None):
    options = ablation.parse_variant(arg, VARIANTS, config="configs/vitb_mpt.py")
    c = configs.mask_prompt_tuning(ClipConfig.vit_b16(), depth=3, lr=0.05, total_steps=5 * 863,
                                   warmup_steps=100, batch_size=512)
    c.init_from = "runs/vitb_ft"
    c.data = configs.clip_pairs_data("data/coco_proposal_1cap/coco_proposal_1cap.csv",
                                     tokenizer=configs.OPENAI_BPE)
    c.checkpoint.interval = 500
    return ablation.mpt_recipe_variant(c, options, pretrained="weights/ViT-B-16.pt")
