"""The web app: segment images with any class names in the browser, or from a script (Gradio).

    python -m ovseg_jax.serve --checkpoint ovseg.pth [--tokenizer DIR] [--host 127.0.0.1 --port 7860]

Open http://127.0.0.1:7860: upload an image (or pick an example), type class names ("cat, sofa,
wall"), pick the mode, λ and the mask threshold; the segmentation appears beside the form. Scripts
call the same thing with `gradio_client` (`api_name="/segment"`). The page, the API and the limits
are `ovseg_jax.web.app`'s; this command loads the model, compiles it at start on a small image
(`--no-warmup` skips that) and serves. With `--sam-checkpoint` the page also offers SAM's automatic
masks as proposals (`--proposals` picks the starting choice). Needs the `web` extra
(`pip install 'ovseg_jax[web]'`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from typing import NoReturn

from ovseg_jax.inference.ensemble import MODES
from ovseg_jax.inference.inputs import InputError, parse_class_names, parse_templates
from ovseg_jax.inference.loading import load_predictor
from ovseg_jax.inference.sam_proposals import add_sam_arguments, parse_sam_options
from ovseg_jax.text import templates as resolve_templates
from ovseg_jax.utils.host_memory import keep_freed_memory

log = logging.getLogger("ovseg_jax.serve")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ovseg_jax.serve", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", help="OVSeg checkpoint (.pth) or what ovseg_jax.inference.loading.load_predictor "
                                        "accepts; without it the page says that no model is loaded")
    p.add_argument("--tokenizer", help="tokenizer directory or OpenAI BPE file, if not beside the checkpoint")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0: reachable from other machines")
    p.add_argument("--port", type=int, default=7860, help="0: the first free port from 7860")
    p.add_argument("--mode", choices=MODES, default="semantic", help="the mode the page starts in")
    add_sam_arguments(p, "the proposals the page starts with (sam, both: need --sam-checkpoint; with it the "
                      "page offers SAM's automatic masks as proposals, docs/sam.md)")
    p.add_argument("--granularity", type=float, default=1.0, help="demo mode with SAM proposals: each class keeps "
                   "every mask scoring above this fraction of its best (default 1: the best only)")
    p.add_argument("--short", type=int, help="uploads are resized to this short side (reference 1.1; default "
                                             "the backbone's: 640 Swin-B, 512 R101c; the demo's: 128)")
    p.add_argument("--max-size", type=int, help="... with the long side at most this (2560 / 2048; demo 512)")
    p.add_argument("--mask-threshold", type=float, help="the mode's default mask threshold (the page can change it)")
    p.add_argument("--ensemble-weight", type=float, help="the mode's default λ (the page can change it)")
    p.add_argument("--classes-from", metavar="DATASET", help="a dataset folder (docs/own-data.md) or registry "
                   "name whose class list a blank class field on the page means")
    p.add_argument("--templates", default="vild", help="prompt templates: 'vild' (14), 'single', or your own "
                                                        "with '{}', separated by ';' (the demo's: 'a {}')")
    p.add_argument("--concurrency", type=int, default=1, help="requests running on the model at once; the others "
                                                               "wait in the queue")
    p.add_argument("--cache-dir", help="JAX persistent compilation cache: later starts compile faster")
    p.add_argument("--no-warmup", action="store_true", help="skip compiling at start")
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    for noisy in ("httpx", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    def fail(message: str) -> NoReturn:
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)

    for name in ("short", "max_size", "concurrency"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive; got {getattr(args, name)}")
    try:
        templates = parse_templates(args.templates)
        resolve_templates(templates)
    except ValueError as e:
        fail(f"--templates: {e}")
    class_names = None
    try:
        sam_options = parse_sam_options(args.sam_option)
        if args.classes_from:
            class_names = parse_class_names(classes_from=args.classes_from)
    except InputError as e:
        fail(str(e))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported
    try:
        from ovseg_jax.web.app import build_app, launch  # noqa: PLC0415  (gradio: the `web` extra)
    except ImportError as e:
        fail(f"the web app needs Gradio ({e}): pip install 'ovseg_jax[web]'")
    predictor = None
    if args.checkpoint:
        if args.cache_dir:
            from ovseg_jax.utils.compilation import enable_cache  # noqa: PLC0415
            enable_cache(args.cache_dir)
        settings = {k: v for k, v in (("mask_threshold", args.mask_threshold),
                                      ("ensemble_weight", args.ensemble_weight)) if v is not None}
        try:
            predictor = load_predictor(args.checkpoint, args.tokenizer, templates=templates, mode=args.mode,
                                       proposals=args.proposals, granularity=args.granularity,
                                       sam_checkpoint=args.sam_checkpoint, sam_options=sam_options,
                                       sam_dtype=args.sam_dtype, **settings)
        except (OSError, ValueError) as e:
            fail(f"cannot load {args.checkpoint}: {str(e).splitlines()[0]}")
    app = build_app(predictor, checkpoint=args.checkpoint, short=args.short, max_size=args.max_size,
                    class_names=class_names, concurrency=args.concurrency)
    if not args.no_warmup:
        app.service.ready.clear()  # requests wait from now, not from when the thread starts
        threading.Thread(target=app.service.warm_up, name="warm-up", daemon=True).start()
    try:
        url = launch(app, args.host, args.port, block=False, quiet=True)
    except OSError as e:
        fail(f"cannot listen on {args.host}:{args.port}: {e} (another server there? pick --port)")
    log.info("serving on %s%s", url, "" if predictor else " (no checkpoint loaded)")
    try:
        app.block_thread()
    finally:
        app.close()


if __name__ == "__main__":
    main()
