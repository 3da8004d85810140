"""Input pipeline throughput: segmentation training examples/s (reference 3.1 augmentation, 640
crops, per-class mask targets) with 0/1/2 grain workers, and eval examples/s (short side 640,
bucketed padding), on synthetic COCO-Stuff-like images.

    .venv/bin/python bench/data_pipeline.py [--image-size 512 --images 32 --batches 6 --batch 4]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from ovseg_jax.data import pipeline, registry, synthetic


def _rate(iterator, count: int, per_item: int) -> float:
    next(iterator)  # warm-up: worker start, first decode
    start = time.perf_counter()
    for _ in range(count):
        next(iterator)
    return count * per_item / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=int, default=512, help="side of the generated square images")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batches", type=int, default=6, help="timed batches per setting")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--crop", type=int, default=640)
    parser.add_argument("--max-masks", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        synthetic.generate(tmp, num_train=args.images, num_val=args.images, image_size=args.image_size, seed=0)
        gen = time.perf_counter() - start
        spec = registry.get("synthetic")
        train, val = spec.make_source(tmp, "train"), spec.make_source(tmp, "val")
        print(f"machine: {os.cpu_count()} CPUs; generated {2 * args.images} images of {args.image_size} px "
              f"in {gen:.1f} s ({2 * args.images / gen:.0f} images/s)")
        print("| pipeline | workers | examples/s |\n|---|---|---|")
        for workers in args.workers:
            loader = pipeline.segmentation_loader(train, batch_size=args.batch, crop_size=args.crop,
                                                  max_masks=args.max_masks, num_workers=workers,
                                                  process_index=0, process_count=1)
            it = iter(loader)
            rate = _rate(it, args.batches, args.batch)
            it.close()
            print(f"| train {args.crop} crop + {args.max_masks} masks | {workers} | {rate:.1f} |", flush=True)
        it = iter(pipeline.eval_loader(val, process_index=0, process_count=1))
        rate = _rate(it, min(args.images - 1, args.batches * args.batch), 1)
        print(f"| eval short side 640, bucket 128 | 0 | {rate:.1f} |")


if __name__ == "__main__":
    main()
