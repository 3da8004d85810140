"""Mask prompt tuning of the fine-tuned CLIP ViT-L/14 (reference 4.3; stage B).

    python -m ovseg_jax.train --config configs/vitl_mpt.py --workdir runs/vitl_mpt \
        --config.init_from=runs/vitl_ft

Starts from stage A's checkpoint (`init_from`: its workdir, or any CLIP checkpoint), adds
`visual.mask_embedding [3, 256, 1024]` ~ N(0, 0.02) and trains only it: AdamW lr 0.05, no weight
decay, warmup 100 + cosine over 5 epochs at global batch 128. The batches' region masks drive
the mask prompts. Tokenizer as vitl_ft.py (`weights/bpe_simple_vocab_16e6.txt.gz`).

Appendix variants (`--config configs/vitl_mpt.py:no_ft,depth6`, comma-separated; `ovseg_jax.ablate`):
`depth1` / `depth3` / `depth6` / `depth12` prompt depth (Table 3); `no_ft` starts from OpenAI's
weights instead of the FT run (Table 3's "w/o FT"; also MPT -> FT's first stage, workdir
runs/vitl_mpt_no_ft for `vitl_ft.py:after_mpt`); `vpt` trains deep visual prompts (50
tokens at the first 6 layers, the appendix's 50 per 256 patches) instead of mask prompts, with
the same optimiser and steps (Table 4 with `no_ft`).
"""

from ovseg_jax import configs
from ovseg_jax.experiments import ablation
from ovseg_jax.models.clip import ClipConfig


VARIANTS = ("no_ft", "depth1", "depth3", "depth6", "depth12", "vpt")


def get_config(arg=None):
    options = ablation.parse_variant(arg, VARIANTS, config="configs/vitl_mpt.py")
    c = configs.mask_prompt_tuning(ClipConfig.vit_l14(), depth=3, lr=0.05, total_steps=5 * 3454,
                                   warmup_steps=100, batch_size=128)
    c.init_from = "runs/vitl_ft"
    c.data = configs.clip_pairs_data("data/coco_proposal_1cap/coco_proposal_1cap.csv",
                                     tokenizer=configs.OPENAI_BPE)
    c.checkpoint.interval = 1000
    return ablation.mpt_recipe_variant(c, options, pretrained="weights/ViT-L-14.pt")
