"""The whole of OVSeg on the generated open-vocabulary world (`python -m ovseg_jax.demo` runs it).

1. generates the synthetic world (`ovseg_jax.data.synthetic`: coloured shapes on textured stuff,
   25 classes of which 6 are unseen in training, plus a "web" caption corpus) into `OUT/world`;
2. trains every stage of `configs/synthetic.py` into `OUT/train`: CLIP pretraining on the web
   captions (the stand-in for OpenAI's web pretraining), the segmenter on the seen classes, CLIP
   full fine-tuning on the seen mask-category pairs, mask prompt tuning;
3. evaluates on the val split over all 25 classes, as the paper's tables: mIoU overall / seen /
   unseen of the segmenter alone and of the ensemble of reference 1.7 with each CLIP stage, and
   each CLIP's zero-shot accuracy on masked ground-truth regions (`ovseg_jax.evaluation.zero_shot`);
4. writes `OUT/metrics.json` (the table, seconds and compile seconds per stage),
   `OUT/unseen_example.png` (a val image with unseen classes: input, ground truth, prediction,
   legend) and the merged OVSeg checkpoint `OUT/ovseg_synthetic.pth` (segmenter + adapted CLIP
   with mask prompts, reference 4.4 / 6.1 layout).

Compiled steps are cached in `OUT/jax_cache` (JAX's persistent compilation cache), so a second
run compiles little. `--quick` runs a few steps per stage (a smoke test).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from pathlib import Path

import numpy as np


log = logging.getLogger("ovseg_jax.demo")

CONFIG_FILE = Path(__file__).resolve().parents[2] / "configs" / "synthetic.py"


def load_config(variant: str | None):
    """`configs/synthetic.py:get_config(variant)`."""
    if not CONFIG_FILE.is_file():
        raise FileNotFoundError(f"{CONFIG_FILE}: the demo runs from a source checkout (configs/synthetic.py)")
    spec = importlib.util.spec_from_file_location("ovseg_synthetic_config", CONFIG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def _set_world(config, root: str) -> None:
    """Point every stage's data (and the evaluation) at the world under `root`."""
    old = config.eval.root
    for name in config.stages:
        if "eval" in config[name]:
            config[name].eval.root = root
        data = config[name].data
        for key in ("root", "path", "tokenizer"):
            if key in data:
                data[key] = data[key].replace(old, root)
        if "tokenizer" in config[name].model:
            config[name].model.tokenizer = config[name].model.tokenizer.replace(old, root)
    config.eval.root = root


# (row, the CLIP stage whose text tower embeds the names (all share the frozen pretrained one),
# whether its image tower classifies the proposals' masked crops)
ROWS = (("segmenter only", "pretrain", False), ("+ pretrained CLIP", "pretrain", True),
        ("+ fine-tuned CLIP", "clip_ft", True), ("+ fine-tuned CLIP + mask prompts", "clip_mpt", True))


def train_stages(config, train_dir: Path) -> dict[str, dict]:
    """Train each stage in turn (resuming finished ones is a no-op) -> {stage: {seconds, compile_seconds}}."""
    import ml_collections  # noqa: PLC0415

    from ovseg_jax.training import trainer  # noqa: PLC0415
    from ovseg_jax.utils.compilation import CompileTimer  # noqa: PLC0415

    timings = {}
    for name in config.stages:
        t0 = time.perf_counter()
        with CompileTimer() as timer:
            one = ml_collections.ConfigDict({"stages": [name], name: config[name]})
            if trainer.run(one, train_dir) != "done":
                raise SystemExit("training was interrupted; run the demo again to resume")
        timings[name] = {"seconds": round(time.perf_counter() - t0, 1), "compile_seconds": round(timer.seconds, 1)}
        log.info("stage %s: %.0f s (%.0f s compiling)", name, timings[name]["seconds"], timer.seconds)
    return timings


def evaluate_clip(segmenter, clip, config, *, ensemble: bool = True, crops=None) -> tuple[dict, object, object]:
    """One row of the table: mIoU all / seen / unseen (and pACC) on `config.eval` of `segmenter`
    ensembled with `clip` (reference 1.7; `ensemble=False`: the segmenter alone, `clip` only embeds
    the names), plus `clip`'s zero-shot accuracy on masked ground-truth regions when ensembled
    -> (metrics, the predictor, the ground-truth crops, to pass back in as `crops`)."""
    from ovseg_jax.data import pipeline, registry  # noqa: PLC0415
    from ovseg_jax.evaluation.evaluator import evaluate_dataset  # noqa: PLC0415
    from ovseg_jax.inference.ensemble import Predictor  # noqa: PLC0415
    from ovseg_jax.evaluation.zero_shot import crop_accuracy, ground_truth_crops  # noqa: PLC0415

    e = config.eval
    spec = registry.get(e.dataset)
    source = spec.make_source(e.root, e.split)
    names, unseen = list(source.class_names), list(e.unseen)
    predictor = Predictor(segmenter, clip, mask_threshold=e.mask_threshold,
                          ensemble_weight=e.ensemble_weight if ensemble else None, templates=list(e.templates))
    examples = pipeline.eval_loader(source, short=e.short, max_size=e.max_size, bucket=e.bucket)
    m = evaluate_dataset(predictor, examples, names, ignore_value=spec.ignore_value, unseen=unseen,
                         max_examples=e.max_examples, log_every=0)
    row = {k: m[k] for k in ("images", "mIoU", "mIoU_seen", "mIoU_unseen", "pACC")}
    if ensemble:
        if crops is None:
            crops = ground_truth_crops(source, image_size=clip.config.image_size, max_examples=e.max_examples)
        acc = crop_accuracy(clip, crops, names, templates=list(e.templates), unseen=unseen)
        row.update({k: acc[k] for k in ("crop_acc", "crop_acc_seen", "crop_acc_unseen")})
    return row, predictor, crops


def evaluate(train_dir: Path, config) -> tuple[list[dict], object]:
    """The paper-style table on the val split -> (rows, the predictor of the last row)."""
    import ovseg_jax.clip  # noqa: PLC0415
    import ovseg_jax.segmenter  # noqa: PLC0415

    segmenter = ovseg_jax.segmenter.load(train_dir / "segmenter")
    rows, predictor, crops = [], None, None
    for label, stage, ensemble in ROWS:
        t0 = time.perf_counter()
        clip = ovseg_jax.clip.load(train_dir / stage)  # with the tokenizer the stage trained with
        m, predictor, crops = evaluate_clip(segmenter, clip, config, ensemble=ensemble, crops=crops)
        rows.append({"setting": label, "clip": stage if ensemble else None, **m,
                     "seconds": round(time.perf_counter() - t0, 1)})
        log.info("%s: mIoU %.1f (seen %.1f, unseen %.1f)", label, m["mIoU"], m["mIoU_seen"], m["mIoU_unseen"])
    return rows, predictor


def draw_unseen_example(predictor, config, path: Path) -> Path:
    """Input | ground truth | prediction of the val image showing the most unseen classes (then the
    most unseen pixels), legend below."""
    from ovseg_jax.data import registry, transforms  # noqa: PLC0415
    from ovseg_jax.inference.visualize import colorize, palette, panel  # noqa: PLC0415

    e = config.eval
    source = registry.get(e.dataset).make_source(e.root, e.split)
    names = list(source.class_names)
    unseen_ids = [names.index(n) for n in e.unseen]
    count = min(len(source), e.max_examples or len(source))

    def unseen_content(i):
        ids, pixels = np.unique(source[i]["label"], return_counts=True)
        shown = np.isin(ids, unseen_ids) & (pixels >= 64)
        return int(shown.sum()), int(pixels[shown].sum()), -i

    best = max(range(count), key=unseen_content)
    example = source[best]
    resized = transforms.eval_transform(example, short=e.short, max_size=e.max_size, bucket=e.bucket)
    prediction = predictor.predict(resized["image"], names, resized_hw=tuple(resized["resized_size"]),
                                   original_hw=tuple(resized["orig_size"]))  # as evaluated
    colours = palette(len(names))
    shown = sorted(set(np.unique(example["label"]).tolist()) | set(np.unique(prediction).tolist()))
    legend = [(names[i] + (" (unseen)" if i in unseen_ids else ""), colours[i]) for i in shown if i < len(names)]
    picture = panel([("input", example["image"]), ("ground truth", colorize(example["label"], colours)),
                     ("prediction", colorize(prediction, colours))], legend, scale=4)
    picture.save(path)
    return path


def run(out: Path, variant: str | None = None) -> dict:
    from ovseg_jax import clip as clip_api, segmenter as segmenter_api  # noqa: PLC0415
    from ovseg_jax.utils.compilation import enable_cache  # noqa: PLC0415

    out.mkdir(parents=True, exist_ok=True)
    enable_cache(out / "jax_cache")
    config = load_config(variant)
    _set_world(config, str(out / "world"))
    t0 = time.perf_counter()
    stages = train_stages(config, out / "train")
    train_seconds = time.perf_counter() - t0
    rows, predictor = evaluate(out / "train", config)
    picture = draw_unseen_example(predictor, config, out / "unseen_example.png")
    checkpoint = segmenter_api.export(segmenter_api.load(out / "train" / "segmenter"), out / "ovseg_synthetic.pth",
                                      clip=clip_api.load(out / "train" / "clip_mpt"))
    result = {"variant": variant or "default", "train_seconds": round(train_seconds, 1), "stages": stages,
              "total_seconds": round(time.perf_counter() - t0, 1), "evaluation": rows,
              "checkpoint": str(checkpoint), "picture": str(picture)}
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    print("\n" + format_table(rows, len(config.eval.unseen)))
    print(f"\ntrained all stages in {train_seconds:.0f} s ("
          + ", ".join(f"{k} {v['seconds']:.0f} s incl. {v['compile_seconds']:.0f} s compiling" for k, v in stages.items())
          + f"); wrote {out / 'metrics.json'}, {picture} and {checkpoint}")
    return result


def format_table(rows: list[dict], num_unseen: int) -> str:
    """The evaluation rows as the paper's tables: mIoU all / seen / unseen, then CLIP's zero-shot
    accuracy on masked ground-truth regions."""
    header = (f"{'val (' + str(num_unseen) + ' unseen classes)':<34} {'mIoU':>6} {'seen':>6} {'unseen':>7}"
              f" | {'crop acc':>8} {'seen':>6} {'unseen':>7}")
    lines = [header, "-" * len(header)]
    for r in rows:
        crop = "".join(f" {r[k]:{w}.1f}" if k in r else f" {'-':>{w}}"
                       for k, w in (("crop_acc", 8), ("crop_acc_seen", 6), ("crop_acc_unseen", 7)))
        lines.append(f"{r['setting']:<34} {r['mIoU']:6.1f} {r['mIoU_seen']:6.1f} {r['mIoU_unseen']:7.1f} |{crop}")
    return "\n".join(lines)
