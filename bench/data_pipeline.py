"""Input pipeline throughput: segmentation training examples/s at 640 crops (reference 3.1
augmentation, per-class mask targets) for 0/1/2 grain workers, next to a plain Python/PIL/numpy
restatement of detectron2's MaskFormer semantic mapper on the same images and core count; the
per-stage CPU cost of both; and the eval pipeline's images/s. The images are COCO-like 640x480
JPEGs with PNG label maps of ~10 of the 171 COCO-Stuff classes, written in COCO-Stuff's layout.

    .venv/bin/python bench/data_pipeline.py [--images 48 --warmup 12 --batches 8 --batch 4 --runs 2]
    .venv/bin/python bench/data_pipeline.py --baseline-commit 45cf172   # also the pipeline of that commit

Every throughput configuration runs `--runs` times, alternating ours and the reference, and all
runs are printed (this box's 2 cores are shared: single figures swing).

The last row is a dataset folder of your own (`ovseg_jax.data.custom`): the seconds to index a
generated folder of `--index-images` small images (20k 32-px PNG pairs) without and with the cached
index, and the first training batch after it (`--index-only` runs just that row).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ovseg_jax.data import pipeline, registry, transforms

ROOT = Path(__file__).resolve().parents[1]
SCALES = tuple(int(640 * x / 10) for x in range(5, 21))  # MaskFormer's MIN_SIZE_TRAIN


# --- the data --------------------------------------------------------------------------------

def write_coco_like(root: Path, num: int, seed: int = 0, hw: tuple[int, int] = (480, 640)) -> None:
    """`num` JPEG images (quality 90) and PNG labels (Voronoi regions of 12 classes out of the 171
    and ignore) under `root/coco/{train,val}2017` + `stuffthingmaps_detectron2`."""
    rng = np.random.default_rng(seed)
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w]
    for split in ("train", "val"):
        images, labels = root / "coco" / f"{split}2017", root / "coco" / "stuffthingmaps_detectron2" / f"{split}2017"
        images.mkdir(parents=True)
        labels.mkdir(parents=True)
        for i in range(num):
            centres = rng.uniform((0, 0), (h, w), (12, 2))
            classes = rng.choice(np.r_[np.arange(171), 255], 12)
            nearest = np.argmin((yy[..., None] - centres[:, 0]) ** 2 + (xx[..., None] - centres[:, 1]) ** 2, -1)
            label = classes[nearest].astype(np.uint8)
            image = rng.integers(0, 256, (256, 3))[label] + rng.normal(0, 12, (h, w, 3))
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(images / f"{i:012d}.jpg", quality=90)
            Image.fromarray(label).save(labels / f"{i:012d}.png")


# --- the reference: detectron2's MaskFormerSemanticDatasetMapper, restated -------------------

def _ref_color_aug(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """MaskFormer's ColorAugSSDTransform (cv2 in the original) as float32 numpy per pixel."""
    def convert(img, alpha=1.0, beta=0.0):
        return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def to_hsv(rgb):
        x = rgb.astype(np.float32)
        r, g, b = x[..., 0], x[..., 1], x[..., 2]
        v = np.maximum(np.maximum(r, g), b)
        diff = v - np.minimum(np.minimum(r, g), b)
        s = np.where(v > 0, diff * 255.0 / np.maximum(v, 1), 0.0)
        d = np.maximum(diff, 1e-6)
        h = np.where(v == r, 60.0 * (g - b) / d,
                     np.where(v == g, 120.0 + 60.0 * (b - r) / d, 240.0 + 60.0 * (r - g) / d))
        h = np.where(diff == 0, 0.0, np.mod(h, 360.0))
        return np.stack([np.mod(np.rint(h / 2.0), 180.0), np.rint(s), v], -1).astype(np.uint8)

    def to_rgb(hsv):
        h = hsv[..., 0].astype(np.float32) * 2.0 / 60.0
        s, v = hsv[..., 1].astype(np.float32) / 255.0, hsv[..., 2].astype(np.float32) / 255.0
        sector = np.floor(h)
        f = h - sector
        sector = sector.astype(np.int32) % 6
        p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
        rgb = np.stack([np.choose(sector, (v, q, p, p, t, v)), np.choose(sector, (t, v, v, q, p, p)),
                        np.choose(sector, (p, p, t, v, v, q))], -1)
        return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)

    if rng.integers(2):
        image = convert(image, beta=rng.uniform(-32, 32))

    def contrast(img):
        return convert(img, alpha=rng.uniform(0.5, 1.5)) if rng.integers(2) else img

    def saturation(img):
        if not rng.integers(2):
            return img
        hsv = to_hsv(img)
        hsv[..., 1] = convert(hsv[..., 1], alpha=rng.uniform(0.5, 1.5))
        return to_rgb(hsv)

    def hue(img):
        if not rng.integers(2):
            return img
        hsv = to_hsv(img)
        hsv[..., 0] = (hsv[..., 0].astype(np.int32) + rng.integers(-18, 19)) % 180
        return to_rgb(hsv)

    for op in ((contrast, saturation, hue) if rng.integers(2) else (saturation, hue, contrast)):
        image = op(image)
    return image


def _ref_crop(label: np.ndarray, crop: int, rng: np.random.Generator, max_area: float = 1.0,
              ignore: int = 255) -> tuple[int, int]:
    """RandomCrop_CategoryAreaConstraint("absolute", crop): up to 10 tries for a crop in which no
    single category covers more than `max_area` (1.0: the first crop)."""
    h, w = label.shape
    ch, cw = min(crop, h), min(crop, w)
    for _ in range(10):
        y0, x0 = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
        if max_area >= 1.0:
            return y0, x0
        _, counts = np.unique(label[y0:y0 + ch, x0:x0 + cw], return_counts=True)
        counts = counts[np.unique(label[y0:y0 + ch, x0:x0 + cw]) != ignore]
        if len(counts) > 1 and counts.max() / counts.sum() < max_area:
            return y0, x0
    return y0, x0


def reference_mapper(paths: tuple[str, str], seed: int, position: int, crop: int = 640, ignore: int = 255) -> dict:
    """One training example as MaskFormer's semantic mapper makes it: image CHW uint8 (pad 128),
    sem_seg [S,S] (pad ignore), one mask per class present (not padded to a fixed count)."""
    rng = np.random.default_rng([seed, position])
    with Image.open(paths[0]) as im:
        image = np.asarray(im.convert("RGB"))
    with Image.open(paths[1]) as im:
        label = np.asarray(im).astype(np.float64)  # the mapper reads labels as double
    h, w = label.shape
    short = SCALES[rng.integers(len(SCALES))]
    scale = short / min(h, w)
    if max(h, w) * scale > 2560:
        scale = 2560 / max(h, w)
    nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
    image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    rows, cols = np.floor(np.arange(nh) * (h / nh)).astype(int), np.floor(np.arange(nw) * (w / nw)).astype(int)
    label = label[np.minimum(rows, h - 1)[:, None], np.minimum(cols, w - 1)[None, :]]
    y0, x0 = _ref_crop(label, crop, rng)
    ch, cw = min(crop, nh), min(crop, nw)
    image, label = image[y0:y0 + ch, x0:x0 + cw], label[y0:y0 + ch, x0:x0 + cw]
    image = _ref_color_aug(image, rng)
    if rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    image = np.pad(np.ascontiguousarray(image.transpose(2, 0, 1)), ((0, 0), (0, crop - ch), (0, crop - cw)),
                   constant_values=128)
    label = np.pad(label.astype(np.int64), ((0, crop - ch), (0, crop - cw)), constant_values=ignore)
    classes = np.unique(label)
    classes = classes[classes != ignore]
    masks = np.stack([label == c for c in classes]) if len(classes) else np.zeros((0, crop, crop), bool)
    return {"image": image, "sem_seg": label, "gt_classes": classes, "gt_masks": masks}


def _reference_call(args):
    return reference_mapper(*args)


def reference_batches(files: list[tuple[str, str]], batch: int, workers: int, seed: int = 0):
    """Batches (lists of example dicts, detectron2's trivial collator) of the reference mapper,
    mapped in `workers` processes (results pickled back, as a plain multiprocessing pool does)."""
    jobs = ((files[i % len(files)], seed, i) for i in range(10**9))
    if workers:
        pool = multiprocessing.get_context("spawn").Pool(workers)
        results = pool.imap(_reference_call, jobs, chunksize=1)
    else:
        pool, results = None, map(_reference_call, jobs)
    try:
        while True:
            yield [next(results) for _ in range(batch)]
    finally:
        if pool is not None:
            pool.terminate()


# --- measuring -----------------------------------------------------------------------------------

def _rate(iterator, warmup: int, count: int, per_item: int) -> float:
    """Steady-state rate: `warmup` batches first (worker start-up, and enough to drain what the
    prefetch buffers filled meanwhile), then `count` timed batches."""
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(count):
        next(iterator)
    return count * per_item / (time.perf_counter() - start)


def _ours(train, args, workers: int) -> float:
    it = iter(pipeline.segmentation_loader(train, batch_size=args.batch, crop_size=args.crop,
                                           max_masks=args.max_masks, num_workers=workers,
                                           process_index=0, process_count=1))
    try:
        return _rate(it, args.warmup, args.batches, args.batch)
    finally:
        if hasattr(it, "close"):
            it.close()


def _reference(train, args, workers: int) -> float:
    files = list(zip(train.image_paths, train.label_paths))
    gen = reference_batches(files, args.batch, workers)
    try:
        return _rate(gen, args.warmup, args.batches, args.batch)
    finally:
        gen.close()


def _cpu_ms(fn, *args, **kwargs) -> tuple[object, float]:
    start = time.process_time()
    out = fn(*args, **kwargs)
    return out, 1000 * (time.process_time() - start)


def stage_costs(train, args, n: int = 12) -> None:
    """Median CPU ms per example of each stage, ours and the reference's (one thread)."""
    ours: dict[str, list[float]] = {}
    ref: dict[str, list[float]] = {}
    for i in range(n):
        rng = np.random.default_rng([0, i])
        example, t = _cpu_ms(train.__getitem__, i % len(train))
        ours.setdefault("decode (JPEG + PNG)", []).append(t)
        image, label = example["image"], example["label"]
        hw = transforms.resized_hw(*label.shape, int(transforms.TRAIN_SCALES[rng.integers(16)]), 2560)
        ch, cw = min(args.crop, hw[0]), min(args.crop, hw[1])
        window = (int(rng.integers(hw[0] - ch + 1)), int(rng.integers(hw[1] - cw + 1)), ch, cw)
        (image, label), t = _cpu_ms(transforms._resized_crop, image, label, hw, window)
        ours.setdefault("resize + crop", []).append(t)
        _, t = _cpu_ms(transforms.photometric_distort, image, np.random.default_rng(i))
        ours.setdefault("colour jitter", []).append(t)
        padded = np.full((args.crop, args.crop), 255, np.int32)
        padded[:ch, :cw] = label
        targets, t = _cpu_ms(transforms.class_targets, padded, args.max_masks, 255)
        ours.setdefault("class targets", []).append(t)
        whole, t = _cpu_ms(transforms.train_transform, train[i % len(train)], np.random.default_rng([0, i]),
                           crop_size=args.crop, max_masks=args.max_masks, masks=False)
        ours.setdefault("whole transform (worker)", []).append(t)
        batch = [whole] * args.batch
        stacked, t = _cpu_ms(lambda: {k: np.stack([b[k] for b in batch]) for k in whole})
        ours.setdefault(f"batch of {args.batch} (per example)", []).append(t / args.batch)
        _, t = _cpu_ms(transforms.masks_of, stacked["label"], stacked["classes"], stacked["valid"])
        ours.setdefault("masks after the workers (per example)", []).append(t / args.batch)
        # the reference, stage by stage
        paths = (train.image_paths[i % len(train)], train.label_paths[i % len(train)])
        _, t = _cpu_ms(reference_mapper, paths, 0, i, args.crop)
        ref.setdefault("whole mapper", []).append(t)
        image0 = train[i % len(train)]["image"]
        _, t = _cpu_ms(lambda: np.asarray(Image.fromarray(image0).resize((hw[1], hw[0]), Image.BILINEAR)))
        ref.setdefault("resize (whole image)", []).append(t)
        crop_image = np.ascontiguousarray(image)
        _, t = _cpu_ms(_ref_color_aug, crop_image, np.random.default_rng(i))
        ref.setdefault("colour jitter (per-pixel float32)", []).append(t)
    print(f"\nCPU ms per example (median of {n}, one thread):\n| stage | ovseg_jax | reference mapper |\n|---|---|---|")
    rows = [("decode (JPEG + PNG)", "decode (JPEG + PNG)"), ("resize + crop", "resize (whole image)"),
            ("colour jitter", "colour jitter (per-pixel float32)"), ("class targets", None),
            ("whole transform (worker)", "whole mapper"), (f"batch of {args.batch} (per example)", None),
            ("masks after the workers (per example)", None)]
    for ours_key, ref_key in rows:
        ref_value = f"{statistics.median(ref[ref_key]):.1f}" if ref_key in ref else ""
        print(f"| {ours_key} | {statistics.median(ours[ours_key]):.1f} | {ref_value} |")


def baseline(commit: str, argv: list[str]) -> str:
    """This bench's throughput lines for the pipeline of `commit` (its ovseg_jax, run in a subprocess)."""
    tmp = Path(tempfile.mkdtemp())
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "ovseg_jax"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive.stdout, check=True)
    env = {**os.environ, "PYTHONPATH": f"{tmp}{os.pathsep}{ROOT}"}
    proc = subprocess.run([sys.executable, __file__, *argv, "--only-ours", "--label", f"ovseg_jax {commit}"],
                          env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"the baseline run of {commit} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def index_latency(num: int, size: int = 32, batch: int = 8) -> None:
    """Indexing and first-batch seconds of a folder-layout dataset of `num` PNG pairs, cold (no
    index: the folders are listed) and with the index cached beside the data."""
    from ovseg_jax.data import index

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        for d in ("images/train", "labels/train"):
            (root / d).mkdir(parents=True)
        (root / "classes.txt").write_text("".join(f"class{i}\n" for i in range(20)))
        rng = np.random.default_rng(0)
        image, label = rng.integers(0, 256, (size, size, 3), dtype=np.uint8), rng.integers(0, 20, (size, size))
        Image.fromarray(image).save(root / "image.png")
        Image.fromarray(label.astype(np.uint8)).save(root / "label.png")
        for i in range(num):  # hard links: the files exist, the bench measures listing and reading
            os.link(root / "image.png", root / "images/train" / f"{i:06d}.png")
            os.link(root / "label.png", root / "labels/train" / f"{i:06d}.png")
        print(f"\nown-data folder: {num} {size}-px PNG pairs written in {time.perf_counter() - t0:.1f} s")
        print("| index | open + index s | first batch s |\n|---|---|---|")
        for label_ in ("cold (listed)", "cached (.ovseg_index.json)"):
            if label_.startswith("cold"):
                (root / index.INDEX_FILE).unlink(missing_ok=True)
            t0 = time.perf_counter()
            source = registry.get(str(root)).make_source(None, "train")
            opened = time.perf_counter() - t0
            it = iter(pipeline.segmentation_loader(source, batch_size=batch, crop_size=size, max_masks=4,
                                                   process_index=0, process_count=1))
            next(it)
            print(f"| {label_} | {opened:.3f} | {time.perf_counter() - t0 - opened:.3f} |", flush=True)
            assert len(source) == num


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--batches", type=int, default=8, help="timed batches per setting")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=12, help="batches drawn before timing")
    parser.add_argument("--crop", type=int, default=640)
    parser.add_argument("--max-masks", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--baseline-commit", help="also measure the pipeline of this git commit (subprocess)")
    parser.add_argument("--only-ours", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--label", default="ovseg_jax", help=argparse.SUPPRESS)
    parser.add_argument("--index-images", type=int, default=20000, help="own-data folder size for the index row")
    parser.add_argument("--index-only", action="store_true", help="only the own-data index row")
    args = parser.parse_args()
    if args.index_only:
        index_latency(args.index_images)
        return
    with tempfile.TemporaryDirectory() as tmp:
        write_coco_like(Path(tmp), args.images)
        spec = registry.get("coco_stuff_171")
        train, val = spec.make_source(tmp, "train"), spec.make_source(tmp, "val")
        if not args.only_ours:
            print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
                  f"{args.images} COCO-like 640x480 JPEGs; batch {args.batch}, {args.warmup} warm-up + "
                  f"{args.batches} timed batches")
            stage_costs(train, args)
            print(f"\nexamples/s, {args.crop} crops (runs: {args.runs}):\n| pipeline | workers | runs | median |\n|---|---|---|---|")
        for workers in args.workers:
            rates: dict[str, list[float]] = {args.label: []} if args.only_ours else {args.label: [], "reference mapper": []}
            for _ in range(args.runs):
                rates[args.label].append(_ours(train, args, workers))
                if not args.only_ours:
                    rates["reference mapper"].append(_reference(train, args, workers))
            for name, values in rates.items():
                print(f"| {name} | {workers} | {' / '.join(f'{v:.1f}' for v in values)} | "
                      f"{statistics.median(values):.1f} |", flush=True)
        if args.baseline_commit:
            same = ["--images", args.images, "--batches", args.batches, "--warmup", args.warmup, "--batch", args.batch, "--crop", args.crop,
                    "--max-masks", args.max_masks, "--runs", args.runs, "--workers", *args.workers]
            print(baseline(args.baseline_commit, [str(a) for a in same]), end="", flush=True)
        if not args.only_ours:
            it = iter(pipeline.eval_loader(val, process_index=0, process_count=1))
            rate = _rate(it, 1, min(args.images - 1, args.batches * args.batch), 1)
            print(f"\neval (short side 640, bucket 128), in process: {rate:.1f} images/s")
            index_latency(args.index_images)


if __name__ == "__main__":
    main()
