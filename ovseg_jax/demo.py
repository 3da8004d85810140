"""The whole of OVSeg on the generated open-vocabulary world: `python -m ovseg_jax.demo --out outputs/demo`.

1. generates the synthetic world (`ovseg_jax.data.synthetic`: coloured shapes on textured stuff,
   35 classes of which 7 are unseen in training) into `OUT/world`;
2. trains every stage of `configs/synthetic.py` into `OUT/train`: CLIP pretraining on captions
   (the stand-in for OpenAI's web pretraining), the segmenter on the seen classes, CLIP full
   fine-tuning on the seen mask-category pairs, mask prompt tuning;
3. evaluates on the val split over all 35 classes (mIoU overall / seen / unseen) with the
   segmenter alone and with the ensemble of reference 1.7 using each CLIP stage;
4. writes `OUT/metrics.json` and the merged OVSeg checkpoint `OUT/ovseg_synthetic.pth`
   (segmenter + adapted CLIP with mask prompts, reference 4.4 / 6.1 layout).

`--quick` runs a few steps per stage (a smoke test). Models are tiny and trained for minutes,
so the numbers show the pipeline working end to end, not the paper's accuracy.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import time
from pathlib import Path


log = logging.getLogger("ovseg_jax.demo")

CONFIG_FILE = Path(__file__).resolve().parents[1] / "configs" / "synthetic.py"


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


def evaluate(train_dir: Path, config) -> list[dict]:
    """mIoU of the segmenter alone and of its ensemble with each CLIP stage on the val split."""
    from ovseg_jax.clip import Clip
    from ovseg_jax.data import pipeline, registry, synthetic
    from ovseg_jax.evaluate import evaluate_dataset
    from ovseg_jax.merge import clip_from_workdir
    from ovseg_jax.predict import Predictor
    from ovseg_jax.tasks.segmenter import load_trained
    from ovseg_jax.text import Tokenizer

    e = config.eval
    spec = registry.get(e.dataset)
    source = spec.make_source(e.root, e.split)
    names = list(source.class_names)
    segmenter = load_trained(train_dir / "segmenter")
    rows = []
    settings = [("segmenter only", "pretrain", None), ("+ pretrained CLIP", "pretrain", e.ensemble_weight),
                ("+ fine-tuned CLIP", "clip_ft", e.ensemble_weight),
                ("+ fine-tuned CLIP + mask prompts", "clip_mpt", e.ensemble_weight)]
    for label, stage, weight in settings:
        model = clip_from_workdir(train_dir / stage)
        clip = Clip(model, Tokenizer.from_dir(Path(e.root) / "tokenizer", context_length=model.config.context_length))
        predictor = Predictor(segmenter, clip, mask_threshold=e.mask_threshold, ensemble_weight=weight,
                              templates=list(e.templates))
        examples = pipeline.eval_loader(source, short=e.short, max_size=e.max_size, bucket=e.bucket)
        t0 = time.perf_counter()
        m = evaluate_dataset(predictor, examples, names, ignore_value=spec.ignore_value,
                             unseen=synthetic.UNSEEN, max_examples=e.max_examples, log_every=0)
        rows.append({"setting": label, "clip": stage if weight is not None else None, "images": m["images"],
                     "mIoU": m["mIoU"], "mIoU_seen": m["mIoU_seen"], "mIoU_unseen": m["mIoU_unseen"],
                     "pACC": m["pACC"], "seconds": round(time.perf_counter() - t0, 1)})
        log.info("%s: mIoU %.1f (seen %.1f, unseen %.1f)", label, m["mIoU"], m["mIoU_seen"], m["mIoU_unseen"])
    return rows


def run(out: Path, variant: str | None = None) -> dict:
    from ovseg_jax import segmenter as segmenter_api
    from ovseg_jax import train
    from ovseg_jax.merge import clip_from_workdir
    from ovseg_jax.tasks.segmenter import load_trained

    out.mkdir(parents=True, exist_ok=True)
    config = load_config(variant)
    _set_world(config, str(out / "world"))
    t0 = time.perf_counter()
    if train.run(config, out / "train") != "done":
        raise SystemExit("training was interrupted; run the demo again to resume")
    train_seconds = time.perf_counter() - t0
    rows = evaluate(out / "train", config)
    checkpoint = segmenter_api.export(load_trained(out / "train" / "segmenter"), out / "ovseg_synthetic.pth",
                                      clip=clip_from_workdir(out / "train" / "clip_mpt"))
    result = {"variant": variant or "default", "train_seconds": round(train_seconds, 1),
              "total_seconds": round(time.perf_counter() - t0, 1), "evaluation": rows,
              "checkpoint": str(checkpoint)}
    (out / "metrics.json").write_text(json.dumps(result, indent=2))

    header = f"{'val, 35 classes (7 unseen)':<36} {'mIoU':>6} {'seen':>6} {'unseen':>7} {'pACC':>6}"
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['setting']:<36} {r['mIoU']:6.1f} {r['mIoU_seen']:6.1f} {r['mIoU_unseen']:7.1f} {r['pACC']:6.1f}")
    print(f"\ntrained all stages in {train_seconds:.0f} s; wrote {out / 'metrics.json'} and {checkpoint}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output directory")
    parser.add_argument("--quick", action="store_true", help="a few steps per stage (smoke test)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's per-save chatter
    run(args.out, "quick" if args.quick else None)


if __name__ == "__main__":
    main()
