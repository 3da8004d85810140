"""Segmenter training, Swin-B + CLIP ViT-L/14 text bank, on COCO-Stuff-171 (reference 3.1-3.4).

    python -m ovseg_jax.train --config configs/swinb_vitl_seg.py --workdir runs/swinb_seg

Inputs (the run stops at start, naming what is missing):
- `datasets/coco/{train2017, stuffthingmaps_detectron2/train2017}` from OVSeg's
  `datasets/prepare_coco_stuff_sem_seg.py` (`--config.data.root=` for another datasets root);
- `weights/swin_base_patch4_window12_384_22k.pth`: the official ImageNet-22k Swin-B (384) weights
  (backbone initialisation; the detectron2-converted `.pkl` works too);
- `weights/ViT-L-14.pt`: OpenAI CLIP, whose frozen text tower embeds the 171 class names;
- `weights/bpe_simple_vocab_16e6.txt.gz`: OpenAI's tokenizer, inside the open_clip_torch / openai-clip
  wheels (`pip download --no-deps open_clip_torch`, then unzip `open_clip/bpe_simple_vocab_16e6.txt.gz`).
Solver: AdamW lr 6e-5, wd 0.01 (0 for norms, queries, position tables), full-model clipping 0.01,
WarmupPolyLR (1500 warmup, 120k iterations), global batch 32, 640 crops.
"""

from ovseg_jax import configs
from ovseg_jax.data import registry
from ovseg_jax.models.maskformer import SegmenterConfig


def get_config(arg=None):
    configs.check_variant(arg, config="configs/swinb_vitl_seg.py")
    c = configs.segmenter_training(
        SegmenterConfig.swin_b(clip_dim=768).to_dict(), clip_init="weights/ViT-L-14.pt",
        class_names=list(registry.class_names("coco_stuff_171")), lr=6e-5, weight_decay=0.01, backbone_lr_mult=1.0,
        total_steps=120_000, batch_size=32, warmup_steps=1500, tokenizer=configs.OPENAI_BPE)
    c.init_from = "weights/swin_base_patch4_window12_384_22k.pth"
    c.data = configs.segmentation_data("coco_stuff_171", "datasets", crop_size=640, short_sides=range(320, 1281, 64),
                                       max_size=2560)
    c.checkpoint.interval = 5000
    return c
