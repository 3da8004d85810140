"""Segmenter training on your own dataset folder (docs/own-data.md), fine-tuning an OVSeg checkpoint.

    python -m ovseg_jax.train --workdir runs/my_data --config \\
      configs/custom_seg.py:path/to/my_data,init=ovseg_swinbase_vitL14_ft_mpt.pth,tokenizer=bpe_simple_vocab_16e6.txt.gz
    python -m ovseg_jax.train --workdir runs/my_data_scratch --config configs/custom_seg.py:path/to/my_data,\\
      init=weights/swin_base_patch4_window12_384_22k.pth,clip=weights/ViT-L-14.pt,tokenizer=...
    python -m ovseg_jax.evaluate --checkpoint runs/my_data --dataset path/to/my_data

The variant is the dataset folder, then `key=value` options separated by commas:
- `init` (required): where the segmenter starts: an OVSeg checkpoint (a released `.pth`, our merged
  file, a segmenter training workdir) to fine-tune, or backbone weights (ImageNet Swin, detectron2
  ResNet) to train the rest from scratch. The architecture is read from it.
- `clip`: the frozen CLIP whose text tower embeds the class names (reference 3.2); default `init`'s
  own (an OVSeg `.pth` holds its CLIP; a segmenter workdir names the one it trained against). It is
  never trained, as in the paper: the run trains the segmenter only, and evaluating the workdir
  pairs it with this CLIP.
- `tokenizer`: default the one beside `init` (`inference.loading.find_tokenizer`), else the CLIP's.
- `size` (640): the short side images are seen at: crops of `size`, random short sides 0.5-2x
  `size` (MaskFormer's schedule at 640), evaluation at `size`.
- `steps` (2000), `batch` (8), `lr` (6e-5: the reference's rate, for fine-tuning and from scratch).
- `templates` ("vild"): the prompt templates of the class names: a set name, or templates with `{}`
  separated by ";".
The class list is the dataset's (`classes.txt`, COCO categories, Cityscapes' 19); training reads
split `train`, and `val` (when there is one) is evaluated at the end (the segmenter alone, as the
trainer's evaluation; `python -m ovseg_jax.evaluate` gives the ensemble). Any other field:
`--config.x=y` (e.g. `--config.data.photometric=False` where colour names classes,
`--config.optim.grad_clip_norm=1.0`).
"""

import ml_collections

from ovseg_jax import configs
from ovseg_jax.data import custom

OPTIONS = ("init", "clip", "tokenizer", "size", "steps", "batch", "lr", "templates")


def parse_variant(arg: str | None) -> tuple[str, dict[str, str]]:
    """"PATH,key=value,..." -> (PATH, {key: value}); ConfigError naming a bad part."""
    path, *parts = (arg or "").split(",")
    if not path:
        raise configs.ConfigError("configs/custom_seg.py needs the dataset folder: "
                                  "configs/custom_seg.py:PATH,init=CKPT")
    options = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in OPTIONS:
            raise configs.ConfigError(f"configs/custom_seg.py: option {part!r}: expected key=value with key one of "
                                      f"{OPTIONS}")
        options[key.strip()] = value.strip()
    if "init" not in options:
        raise configs.ConfigError("configs/custom_seg.py: init=CKPT is required (an OVSeg checkpoint to fine-tune, "
                                  "or backbone weights)")
    return path, options


def segmenter_architecture(init: str, clip: str | None, tokenizer: str) -> dict:
    """`SegmenterConfig.to_dict()` of the checkpoint `init` (loaded once to read it). With a separate
    `clip` (backbone-only `init`), a head it lacks gets that CLIP's embedding width."""
    import ovseg_jax.clip  # noqa: PLC0415  (loading: only when the config is built)
    import ovseg_jax.segmenter  # noqa: PLC0415

    if clip is None:
        return ovseg_jax.segmenter.load(init).config.to_dict()
    width = ovseg_jax.clip.load(clip, mask_prompt_depth=0, tokenizer=tokenizer or None).config.embed_dim
    return ovseg_jax.segmenter.load(init, clip_dim=width).config.to_dict()


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    from ovseg_jax.inference.loading import find_tokenizer  # noqa: PLC0415

    path, o = parse_variant(arg)
    dataset = custom.open_dataset(path)
    init = o["init"]
    tokenizer = o.get("tokenizer") or str(find_tokenizer(init) or "")
    size, steps, batch = int(o.get("size", 640)), int(o.get("steps", 2000)), int(o.get("batch", 8))
    templates = o.get("templates", "vild")
    templates = [t.strip() for t in templates.split(";") if t.strip()] if ";" in templates else templates
    c = configs.segmenter_training(
        segmenter_architecture(init, o.get("clip"), tokenizer), clip_init=o.get("clip", init),
        class_names=list(dataset.class_names),
        lr=float(o.get("lr", 6e-5)), weight_decay=0.01, backbone_lr_mult=1.0, total_steps=steps, batch_size=batch,
        warmup_steps=min(100, steps // 10), tokenizer=tokenizer, templates=templates)
    c.init_from = init
    c.data = configs.segmentation_data(path, path, crop_size=size, short_sides=[size * x // 10 for x in range(5, 21)],
                                       max_size=4 * size, max_masks=32, num_workers=0)
    if "val" in dataset.splits:
        c.eval = ml_collections.ConfigDict({"dataset": path, "root": path, "split": "val", "short": size,
                                            "max_size": 4 * size, "bucket": 32, "mask_threshold": 0.4,
                                            "max_examples": None})
        c.eval_every = steps
    c.checkpoint.interval = max(steps // 4, 1)
    c.checkpoint.max_to_keep = 2
    return c
