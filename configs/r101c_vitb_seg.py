"""Segmenter training, R101c + CLIP ViT-B/16 text bank, on COCO-Stuff-171 (reference 3.5).

    python -m ovseg_jax.train --config configs/r101c_vitb_seg.py --workdir runs/r101c_seg

Inputs: `datasets/coco/...` as for `swinb_vitl_seg.py`, `weights/R-103.pkl` (detectron2's
DeepLab ResNet-101 ImageNet weights), `weights/ViT-B-16.pt` (OpenAI CLIP) and
`weights/bpe_simple_vocab_16e6.txt.gz` (OpenAI's tokenizer, as for `swinb_vitl_seg.py`).
Solver: AdamW lr 2e-4, wd 1e-4, backbone lr x0.1, clipping 0.01, WarmupPolyLR, 120k iterations,
global batch 32, 512 crops.

Note on scales: the original's R101c yaml does not set `MIN_SIZE_TRAIN`, so detectron2's default
(short side 800, max 1333, no multi-scale) applied, contrary to the appendix's "as MaskFormer".
That looks like an omission; we follow the appendix: MaskFormer's 512-crop schedule, short side
drawn from 256..1024 (0.5x-2x of 512) with the long side capped at 2048.
"""

from ovseg_jax import configs
from ovseg_jax.data import registry
from ovseg_jax.models.maskformer import SegmenterConfig


def get_config(arg=None):
    configs.check_variant(arg, config="configs/r101c_vitb_seg.py")
    segmenter = SegmenterConfig.r101c(clip_dim=512)
    # R-101's block counts stated (not implied by depth) so that `--config...num_blocks='(...)'` can set them.
    segmenter = segmenter.replace(backbone_config=segmenter.backbone_config.replace(num_blocks=(3, 4, 23, 3)))
    c = configs.segmenter_training(
        segmenter.to_dict(), clip_init="weights/ViT-B-16.pt",
        class_names=list(registry.class_names("coco_stuff_171")), lr=2e-4, weight_decay=1e-4, backbone_lr_mult=0.1,
        total_steps=120_000, batch_size=32, warmup_steps=1500, tokenizer=configs.OPENAI_BPE)
    c.init_from = "weights/R-103.pkl"
    c.data = configs.segmentation_data("coco_stuff_171", "datasets", crop_size=512, short_sides=range(256, 1025, 32),
                                       max_size=2048)
    c.checkpoint.interval = 5000
    return c
