"""The embedded default: every OVSeg stage on the generated open-vocabulary world, tiny models.

    python -m ovseg_jax.train --config configs/synthetic.py --workdir outputs/synthetic
    python -m ovseg_jax.train --config configs/synthetic.py:quick --workdir /tmp/s   # a few steps each

No pretrained CLIP can be downloaded here, so the sequence starts by pretraining a tiny CLIP on the
world's captions (which mention every class, seen or unseen: the stand-in for web-scale
pretraining). Then, as in the paper: the segmenter on the seen classes with the frozen CLIP text
bank (reference 3), CLIP full fine-tuning on the seen mask-category pairs (4.2), and mask prompt
tuning (4.3). The world (`ovseg_jax.data.synthetic`) is generated into `data.root` on first use.
`python -m ovseg_jax.demo` runs this config, evaluates on the val split (seen + unseen classes)
and writes the merged OVSeg checkpoint.
"""


import ml_collections

from ovseg_jax import configs
from ovseg_jax.data import synthetic
from ovseg_jax.experiments import ablation
from ovseg_jax.models.clip import ClipConfig
from ovseg_jax.models.maskformer import SegmenterConfig
from ovseg_jax.models.swin import SwinConfig

WORLD = dict(num_train=1500, num_val=100, num_web=3000, image_size=64, seed=0)
QUICK_WORLD = dict(WORLD, num_train=64, num_val=8, num_web=64)
# The captions' phrasing ("a red circle", "a grass"); the 14 ViLD templates need words the world never shows.
TEMPLATES = ["a {}"]
VARIANTS = ("", "quick", "mined")
# The "mined" variant's CLIP stages read pairs mined from the captions (python -m ovseg_jax.mine_pairs
# --config configs/mine_synthetic.py:OUT --workdir OUT/world/mined) instead of the ground-truth pairs.
MINED_PAIRS = "mined/pairs.jsonl"


def clip_config() -> ClipConfig:
    return ClipConfig(embed_dim=64, image_size=32, patch_size=4, vision_width=96, vision_layers=3, vision_heads=3,
                      vision_mlp_dim=384, context_length=24, vocab_size=synthetic.tokenizer_size(),
                      text_width=64, text_layers=2, text_heads=2, text_mlp_dim=256,
                      eot_token_id=synthetic.tokenizer_size() - 1)


def segmenter_config() -> SegmenterConfig:
    # Dropout and drop-path off: the reference's 0.1 / 0.3 keep this tiny post-norm decoder over a
    # 2x2 feature map from fitting at all (38% vs 97% train mIoU when overfitting 8 images).
    swin = SwinConfig(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 4, 4, 8), window_size=4, drop_path_rate=0.0)
    return SegmenterConfig(backbone_config=swin, num_queries=16, hidden_dim=64, conv_dim=64, mask_dim=64,
                           dec_layers=3, nheads=4, dim_feedforward=256, class_hidden_dim=128,
                           clip_dim=clip_config().embed_dim, dropout=0.0)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Variants: "" (the demo, a few minutes on 2 CPU cores), "quick" (a handful of steps per stage) and
    "mined" (the demo with the CLIP stages on `world/mined/pairs.jsonl`, see `MINED_PAIRS`),
    optionally followed by ",<plan>": the appendix's CLIP adaptation plans of `ovseg_jax.ablate`
    (`ablation.PLAN_NAMES`: "mpt_ft", "joint", "vpt", "mpt_d1", "ft_mpt_d6", ...) in place of the
    clip_ft -> clip_mpt stages, e.g. `configs/synthetic.py:mpt_ft` or `configs/synthetic.py:quick,joint`."""
    arg, _, plan = (arg or "").partition(",")
    if arg in ablation.PLAN_NAMES:
        arg, plan = "", arg
    if plan:
        return ablation.with_plan(get_config(arg), plan)
    if (arg or "") not in VARIANTS:
        raise ValueError(f"configs/synthetic.py: unknown variant {arg!r}; expected one of {VARIANTS}")
    quick = arg == "quick"
    steps = dict(pretrain=4, segmenter=4, clip_ft=4, clip_mpt=4) if quick else \
        dict(pretrain=800, segmenter=1000, clip_ft=300, clip_mpt=150)
    root = "outputs/synthetic_world"
    tokenizer = f"{root}/tokenizer"
    clip = clip_config()
    generate = QUICK_WORLD if quick else WORLD
    max_examples = 8 if quick else 100

    def clip_data(kind: str, path: str):
        return ml_collections.ConfigDict({"kind": kind, "path": path, "tokenizer": tokenizer, "root": root,
                                          "generate": generate, "num_workers": 0})

    # Zero-shot accuracy of masked ground-truth regions of val over all 20 names (ovseg_jax.evaluation.zero_shot).
    clip_eval = ml_collections.ConfigDict({"dataset": "synthetic", "root": root, "split": "val",
                                           "max_examples": max_examples, "templates": TEMPLATES,
                                           "unseen": list(synthetic.UNSEEN)})

    pretrain = configs.clip_finetune(clip, lr=1e-3, total_steps=steps["pretrain"], warmup_steps=20, batch_size=64)
    pretrain.optim.freeze = []  # pretraining trains both towers
    pretrain.optim.weight_decay = 0.1
    pretrain.data = clip_data("captions", f"{root}/web/captions.jsonl")

    segmenter = configs.segmenter_training(
        segmenter_config().to_dict(), clip_init="{workdir}/pretrain", class_names=list(synthetic.SEEN),
        lr=6e-4, weight_decay=0.01, backbone_lr_mult=1.0, total_steps=steps["segmenter"], batch_size=8,
        warmup_steps=20, tokenizer=tokenizer, templates=TEMPLATES)
    segmenter.optim.grad_clip_norm = 1.0  # the reference's 0.01 is tuned for 120k steps at batch 32
    segmenter.eval_every = steps["segmenter"]  # mIoU of the segmenter alone on val, at the end
    segmenter.eval = ml_collections.ConfigDict({"dataset": "synthetic", "root": root, "split": "val", "short": 128,
                                                "max_size": 512, "bucket": 32, "mask_threshold": 0.4,
                                                "max_examples": max_examples})
    # The 64-pixel scenes are seen at twice their size (short side 128, jittered 112-160): at 64 the
    # decoder's stride-32 memory is 2x2 tokens, too coarse to tell the objects apart. No colour
    # jitter: its hue shift turns a "striped red" into an orange one, i.e. changes labels here.
    segmenter.data = ml_collections.ConfigDict({
        "dataset": "synthetic", "root": root, "generate": generate, "crop_size": 128, "max_masks": 8,
        "scales": [112, 128, 144, 160], "max_size": 512, "photometric": False, "flip": True, "num_workers": 0})

    clip_ft = configs.clip_finetune(clip, lr=2e-4, total_steps=steps["clip_ft"], warmup_steps=10, batch_size=64)
    clip_ft.init_from = "{workdir}/pretrain"
    clip_ft.data = clip_data("clip_pairs", f"{root}/pairs.jsonl")

    clip_mpt = configs.mask_prompt_tuning(clip, depth=2, lr=0.05, total_steps=steps["clip_mpt"], warmup_steps=10,
                                          batch_size=64)
    clip_mpt.init_from = "{workdir}/clip_ft"
    clip_mpt.data = clip_data("clip_pairs", f"{root}/pairs.jsonl")
    if arg == "mined":
        clip_ft.data.path = clip_mpt.data.path = f"{root}/{MINED_PAIRS}"

    c = ml_collections.ConfigDict()
    c.stages = ["pretrain", "segmenter", "clip_ft", "clip_mpt"]
    for name, stage in zip(c.stages, (pretrain, segmenter, clip_ft, clip_mpt)):
        stage.log_every = 2 if quick else 50
        stage.checkpoint.interval = 10_000  # the final step is always saved
        stage.checkpoint.max_to_keep = 1
        if name != "segmenter":
            stage.eval = clip_eval
            stage.eval_every = steps[name]
        c[name] = stage
    c.eval = ml_collections.ConfigDict({"dataset": "synthetic", "root": root, "split": "val", "short": 128,
                                        "max_size": 512, "bucket": 32, "mask_threshold": 0.4,
                                        "ensemble_weight": 0.7, "templates": TEMPLATES,
                                        "unseen": list(synthetic.UNSEEN), "max_examples": max_examples})
    return c
