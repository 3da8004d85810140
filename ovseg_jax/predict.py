"""Segment your own images with any class names: `python -m ovseg_jax.predict`.

    python -m ovseg_jax.predict --checkpoint ovseg_swinbase_vitL14_ft_mpt.pth \\
        --tokenizer bpe_simple_vocab_16e6.txt.gz --classes "sky,tree,red car" --input photos/ --output out/

Per input image it writes `<stem>.overlay.png` (class colours blended over the image, a legend of
the classes present with their pixel share), `<stem>.labels.png` (class indices into the class list
at the image's size: uint8 for fewer than 255 classes, else uint16; pixels no class claims, demo
mode only, are 255 / 65535) and `<stem>.json` (`summarize`: class list, per-class pixel share and
mean confidence, unlabeled share, settings).

Images are read as the original demo does (PIL, EXIF rotation applied, RGB), resized with the short
side to `short` (long side <= `max_size`, PIL bilinear, reference 1.1) and zero-padded to a
multiple of `bucket` per side, so a folder of mixed sizes compiles once per padded shape; images of
one padded shape go to the device together, `--batch-size` at a time.

Modes (reference 1.7 / 1.10): "semantic" labels every pixel with the ensemble of the segmenter's and
CLIP's class probabilities (λ 0.7, mask threshold 0.4: the evaluation setting); "demo" is the
original web demo (λ 0: CLIP only, threshold 0.35; for each class its best proposal; pixels no
kept proposal covers are unlabeled; one class name competes against "others").

The public helpers are what the web page uses too: `load_predictor`, `load_image`, `preprocess`,
`render`, `summarize`, `label_image`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageOps

from ovseg_jax.compilation import CompileTimer
from ovseg_jax.data import transforms
from ovseg_jax.data.sources import BadExampleError, _rgb_uint8, read_image
from ovseg_jax.ensemble import UNLABELED, Predictor, Segmentation, as_rgb_uint8, check_class_names
from ovseg_jax.host_memory import keep_freed_memory
from ovseg_jax import visualize

log = logging.getLogger("ovseg_jax.predict")

# The original's settings per mode (reference 1.7 evaluation config; 1.10 demo config).
MODE_DEFAULTS = {"semantic": {"ensemble_weight": 0.7, "mask_threshold": 0.4},
                 "demo": {"ensemble_weight": 0.0, "mask_threshold": 0.35}}
# Reference 1.1 / 3.5: test-time resize (short side, long-side cap) per segmenter backbone.
RESIZE = {"swin": (640, 2560), "resnet": (512, 2048)}
BUCKET = 128
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# Where a tokenizer is looked for next to a checkpoint file that has none (the demo's layout included).
TOKENIZER_PLACES = ("tokenizer", "bpe_simple_vocab_16e6.txt.gz", "world/tokenizer")
_UNSET = object()  # --ensemble-weight not given: the mode's default


class InputError(ValueError):
    """Bad command-line input (class names, inputs, checkpoint): reported in one line, exit status 2."""


# ---------------------------------------------------------------------------------------------
# Public helpers


def find_tokenizer(checkpoint: str | os.PathLike) -> Path | None:
    """The first of `TOKENIZER_PLACES` beside a checkpoint file (a directory with `vocab.json` or
    `tokenizer.json`, or OpenAI's BPE file), or None."""
    for name in TOKENIZER_PLACES:
        place = Path(checkpoint).parent / name
        if place.is_file() or any((place / f).is_file() for f in ("vocab.json", "tokenizer.json")):
            return place
    return None


def load_predictor(checkpoint: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                   **predictor_kwargs) -> Predictor:
    """A `Predictor` from one checkpoint: our merged OVSeg `.pth` (`python -m ovseg_jax.merge`, the
    demo's `ovseg_synthetic.pth`), an original OVSeg `.pth`, or a segmenter training workdir (with the
    frozen CLIP it trained against).

    tokenizer: a tokenizer directory or OpenAI's `bpe_simple_vocab_16e6.txt.gz`; by default the
        run's tokenizer of a workdir, else `find_tokenizer(checkpoint)`. None found: `InputError`.
    predictor_kwargs: `Predictor` options; `mode` sets the defaults of `ensemble_weight` and
        `mask_threshold` (`MODE_DEFAULTS`), and `resize` defaults to the backbone's test resize
        (`RESIZE`), so `predictor.segment(raw_image, names)` works as the original.
    """
    import ovseg_jax.clip  # noqa: PLC0415  (heavy imports kept out of `--help`)
    import ovseg_jax.segmenter  # noqa: PLC0415

    path = Path(checkpoint)
    if not path.exists():
        raise InputError(f"checkpoint {path}: no such file or directory")
    if tokenizer is not None and not Path(tokenizer).exists():
        raise InputError(f"tokenizer {tokenizer}: no such file or directory")
    if tokenizer is None and path.is_file():
        tokenizer = find_tokenizer(path)
        if tokenizer is None:  # a checkpoint file never holds one: say so before the slow loading
            raise _no_tokenizer(path)
    segmenter = ovseg_jax.segmenter.load(path)
    clip = ovseg_jax.clip.load(path, tokenizer=tokenizer)
    if clip.tokenizer is None:
        raise _no_tokenizer(path)
    mode = predictor_kwargs.get("mode", "semantic")
    kwargs = {**MODE_DEFAULTS.get(mode, {}), "resize": RESIZE.get(segmenter.config.backbone), **predictor_kwargs}
    return Predictor(segmenter, clip, **kwargs)


def _no_tokenizer(path: Path) -> InputError:
    return InputError(f"{path} holds no tokenizer and none was found beside it ({', '.join(TOKENIZER_PLACES)}); "
                      "pass --tokenizer (a tokenizer directory or OpenAI's bpe_simple_vocab_16e6.txt.gz)")


def load_image(source) -> np.ndarray:
    """A file path, PIL image or array -> uint8 `[H, W, 3]` RGB. Files and PIL images get their EXIF
    rotation applied (as the original demo's reader); 16-bit images keep their high byte; alpha is
    dropped. Unreadable files raise `BadExampleError` naming the file."""
    if isinstance(source, (str, os.PathLike)):
        return read_image(source)
    if isinstance(source, Image.Image):
        return _rgb_uint8(ImageOps.exif_transpose(source), "image")
    return as_rgb_uint8(source)


def preprocess(image, short: int = 640, max_size: int = 2560,
               bucket: int = BUCKET) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """uint8 `[H, W, 3]` image (or anything `load_image` takes) -> (padded uint8 `[Hp, Wp, 3]`,
    resized_hw, original_hw): short side to `short`, long side <= `max_size` (PIL bilinear,
    reference 1.1), zero-padded bottom/right to multiples of `bucket` (a multiple of 32)."""
    image = load_image(image)
    out = transforms.eval_transform({"image": image, "label": None}, short=short, max_size=max_size, bucket=bucket)
    return out["image"], tuple(int(v) for v in out["resized_size"]), tuple(int(v) for v in out["orig_size"])


def padded_shape(hw: tuple[int, int], short: int = 640, max_size: int = 2560, bucket: int = BUCKET) -> tuple[int, int]:
    """The padded shape `preprocess` gives an image of `hw` pixels (its compile bucket)."""
    h, w = transforms.resized_hw(*hw, short, max_size)
    return transforms.bucket_size(h, bucket=bucket), transforms.bucket_size(w, bucket=bucket)


def summarize(segmentation: Segmentation, class_names: Sequence[str]) -> dict:
    """One image's result in numbers: `{"class_names", "size": [H, W], "classes": [{"index", "name",
    "pixels", "share", "mean_confidence"}] (present classes, largest first), "unlabeled_share"}`.
    Confidence is the winning class's score `Σ_q p[q, c] · M[q]` (reference 1.7), not a probability."""
    labels, confidence = np.asarray(segmentation.labels), np.asarray(segmentation.confidence)
    total, num = labels.size, len(class_names)
    inside = (labels >= 0) & (labels < num)
    pixels = np.bincount(labels[inside], minlength=num)
    score = np.bincount(labels[inside], weights=confidence[inside], minlength=num)
    classes = [{"index": int(i), "name": class_names[i], "pixels": int(pixels[i]),
                "share": round(float(pixels[i]) / total, 6), "mean_confidence": round(float(score[i] / pixels[i]), 6)}
               for i in np.argsort(-pixels, kind="stable") if pixels[i] > 0]
    return {"class_names": list(class_names), "size": list(labels.shape), "classes": classes,
            "unlabeled_share": round(float(total - inside.sum()) / total, 6)}


def render(image: np.ndarray, segmentation: Segmentation, class_names: Sequence[str],
           side_by_side: bool = False) -> Image.Image:
    """uint8 `[H, W, 3]` image and its `Segmentation` (same size) -> a PIL picture: class colours
    blended over the image (unlabeled pixels left as they are, boundaries drawn), optionally the
    input on the left, and a legend of the classes present with their pixel share."""
    image = load_image(image)
    colours = visualize.palette(len(class_names))
    picture = visualize.overlay(image, segmentation.labels, colours)
    if side_by_side:
        picture = visualize.side_by_side([image, picture])
    entries = [(f"{c['name']}  {100 * c['share']:.1f}%", colours[c["index"]])
               for c in summarize(segmentation, class_names)["classes"]]
    return visualize.with_legend(picture, entries)


def label_image(labels: np.ndarray, num_classes: int) -> Image.Image:
    """int `[H, W]` labels (UNLABELED = -1) -> the labels PNG: uint8 with 255 for unlabeled pixels
    when `num_classes` < 255, else uint16 with 65535."""
    labels = np.asarray(labels)
    dtype = np.uint8 if num_classes < 255 else np.uint16
    out = np.where(labels == UNLABELED, np.iinfo(dtype).max, labels).astype(dtype)
    return Image.fromarray(out)


# ---------------------------------------------------------------------------------------------
# Command line: inputs


def parse_class_names(classes: str | None = None, classes_file: str | os.PathLike | None = None) -> list[str]:
    """`"sky, tree,red car"` (comma-separated) or a file with one name per line (empty lines skipped)
    -> checked names (`ensemble.check_class_names`); `InputError` for blank or duplicate names."""
    if classes_file is not None:
        path = Path(classes_file)
        if not path.is_file():
            raise InputError(f"classes file {path}: no such file")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise InputError(f"classes file {path}: not UTF-8 text (expected one class name per line)") from None
        names = [line.strip() for line in lines if line.strip()]
        source = f"classes file {path}"
    else:
        names = [n.strip() for n in (classes or "").split(",")]
        names = [] if names == [""] else names
        source = "--classes"
    try:
        return check_class_names(names)
    except ValueError as e:
        raise InputError(f"{source}: {e}") from None


def collect_inputs(specs: Iterable[str]) -> list[Path]:
    """Files, directories (their image files, by extension, not recursive) and glob patterns ->
    sorted-per-spec unique paths; `InputError` when a spec names nothing."""
    paths: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise InputError(f"input {path}: directory holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
        elif path.is_file():
            found = [path]
        elif glob.has_magic(spec):
            found = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
            if not found:
                raise InputError(f"input {spec}: the pattern matches no file")
        else:
            raise InputError(f"input {path}: no such file or directory")
        paths.extend(found)
    return list(dict.fromkeys(paths))


def output_stems(paths: Sequence[Path]) -> list[str]:
    """Output name stems, unique: the file's stem, then `stem.ext`, then `stem-N` on collisions."""
    used: set[str] = set()
    stems = []
    for path in paths:
        candidates = [path.stem, path.name] + [f"{path.stem}-{n}" for n in range(1, len(paths) + 1)]
        stem = next(c for c in candidates if c not in used)
        used.add(stem)
        stems.append(stem)
    return stems


def _header_hw(path: Path) -> tuple[int, int]:
    """An image file's (H, W) after EXIF rotation, from its header; a file PIL cannot open is
    decoded by `read_image` to get its `BadExampleError`."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            orientation = img.getexif().get(0x0112, 1)
        return (w, h) if orientation in (5, 6, 7, 8) else (h, w)
    except Exception:  # noqa: BLE001  (PIL raises many types for bad files)
        return read_image(path).shape[:2]


class Item(NamedTuple):
    path: Path
    stem: str
    shape: tuple[int, int]  # padded shape: the compile bucket


class Batch(NamedTuple):
    items: list[Item]
    size: int  # the device batch size of its padded shape (short batches are topped up to it)


def plan(paths: Sequence[Path], *, short: int, max_size: int, bucket: int, batch_size: int
         ) -> tuple[list[Batch], list[tuple[Path, str]]]:
    """Group the inputs by padded shape (read from the file headers) and cut each group into
    batches -> (batches, skipped (path, reason)). Batches of one group share one device batch
    size, min(`batch_size`, group size), so each padded shape compiles once."""
    groups: dict[tuple[int, int], list[Item]] = {}
    skipped = []
    for path, stem in zip(paths, output_stems(paths)):
        try:
            shape = padded_shape(_header_hw(path), short, max_size, bucket)
        except BadExampleError as e:
            skipped.append((path, str(e)))
            continue
        groups.setdefault(shape, []).append(Item(path, stem, shape))
    batches = []
    for items in groups.values():
        size = min(batch_size, len(items))
        batches.extend(Batch(items[i:i + size], size) for i in range(0, len(items), size))
    return batches, skipped


# ---------------------------------------------------------------------------------------------
# Command line: the run


class Progress:
    """A one-line progress bar with rate and ETA on stderr (a line per update when not a terminal)."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.done, self.stream = total, 0, stream
        self.start = time.perf_counter()
        self.tty = hasattr(stream, "isatty") and stream.isatty()

    def update(self, n: int) -> None:
        self.done += n
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        filled = int(24 * self.done / max(self.total, 1))
        line = (f"[{'#' * filled}{'.' * (24 - filled)}] {self.done}/{self.total} images, {rate:.2f} images/s, "
                f"elapsed {_clock(elapsed)}, ETA {_clock(eta)}")
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        if self.tty and self.done >= self.total:
            self.stream.write("\n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def _write_outputs(out_dir: Path, item: Item, image: np.ndarray, segmentation: Segmentation,
                   class_names: list[str], settings: dict, side_by_side: bool) -> str:
    """Write the image's overlay, labels PNG and JSON -> a one-line account ("x.jpg: sky 52.9%, ...")."""
    render(image, segmentation, class_names, side_by_side).save(out_dir / f"{item.stem}.overlay.png")
    labels = label_image(segmentation.labels, len(class_names))
    labels.save(out_dir / f"{item.stem}.labels.png")
    record = {"input": str(item.path), **summarize(segmentation, class_names), **settings,
              "labels_png": f"{item.stem}.labels.png", "labels_dtype": "uint8" if labels.mode == "L" else "uint16",
              "unlabeled_value": 255 if labels.mode == "L" else 65535}
    (out_dir / f"{item.stem}.json").write_text(json.dumps(record, indent=1))
    shares = [f"{c['name']} {100 * c['share']:.1f}%" for c in record["classes"]]
    if record["unlabeled_share"] > 0:
        shares.append(f"unlabeled {100 * record['unlabeled_share']:.1f}%")
    return f"{item.path.name}: {', '.join(shares)}"


def _load_batch(batch: Batch, short: int, max_size: int, bucket: int) -> tuple[list, list[tuple[Path, str]]]:
    """Decode + preprocess a batch -> ([(item, original image, padded, resized_hw, original_hw)], skipped)."""
    loaded, skipped = [], []
    for item in batch.items:
        try:
            image = read_image(item.path)
            loaded.append((item, image, *preprocess(image, short, max_size, bucket)))
        except BadExampleError as e:
            skipped.append((item.path, str(e)))
    return loaded, skipped


def predict_files(predictor: Predictor, paths: Sequence[Path], class_names: list[str], out_dir: Path, *,
                  short: int, max_size: int, bucket: int = BUCKET, batch_size: int = 4,
                  side_by_side: bool = False, progress: bool = True) -> dict:
    """Segment `paths` into `out_dir` (see the module docstring) -> the run's summary: `{"images",
    "skipped": [[path, reason]], "seconds", "images_per_second", "compiles", "compile_seconds",
    "padded_shapes", "per_image": ["x.jpg: sky 52.9%, ..."] (input order within each batch)}`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    batches, skipped = plan(paths, short=short, max_size=max_size, bucket=bucket, batch_size=batch_size)
    bar = Progress(len(paths)) if progress else None
    if bar and skipped:
        bar.update(len(skipped))
    settings = {"mode": predictor.mode, "ensemble_weight": predictor.ensemble_weight,
                "mask_threshold": predictor.mask_threshold, "mask_prompts": predictor.mask_prompts,
                "templates": predictor.templates if isinstance(predictor.templates, str) else list(predictor.templates),
                "short": short, "max_size": max_size}
    done, per_image = 0, []
    with CompileTimer() as compiles, concurrent.futures.ThreadPoolExecutor(2) as pool:
        writes: list[concurrent.futures.Future] = []
        upcoming = pool.submit(_load_batch, batches[0], short, max_size, bucket) if batches else None
        for i, batch in enumerate(batches):
            loaded, bad = upcoming.result()
            upcoming = pool.submit(_load_batch, batches[i + 1], short, max_size, bucket) if i + 1 < len(batches) else None
            skipped.extend(bad)
            for group in _by_shape(loaded):
                padded = group + [group[-1]] * (batch.size - len(group))  # one batch size per padded shape
                results = predictor.predict_batch([g[2] for g in padded], class_names,
                                                  resized_hw=[g[3] for g in padded], original_hw=[g[4] for g in padded])
                for (item, image, *_), segmentation in zip(group, results):
                    writes.append(pool.submit(_write_outputs, out_dir, item, image, segmentation, class_names,
                                              settings, side_by_side))
            while len(writes) > 2 * batch_size:  # bound the images held in memory
                per_image.append(writes.pop(0).result())
            done += len(loaded)
            if bar:
                bar.update(len(batch.items))
        per_image.extend(write.result() for write in writes)
    seconds = time.perf_counter() - t0
    return {"images": done, "skipped": [[str(p), reason] for p, reason in skipped], "seconds": round(seconds, 2),
            "images_per_second": round(done / seconds, 3) if seconds > 0 else 0.0, "compiles": compiles.count,
            "compile_seconds": round(compiles.seconds, 2),
            "padded_shapes": sorted({b.items[0].shape for b in batches}), "per_image": per_image}


def _by_shape(loaded: list) -> list[list]:
    """Loaded images grouped by padded shape (a header that misstated the size lands in its own group)."""
    groups: dict[tuple, list] = {}
    for entry in loaded:
        groups.setdefault(entry[2].shape, []).append(entry)
    return list(groups.values())


def format_summary(summary: dict, max_listed: int = 10) -> str:
    """The run's summary as a few printed lines (each image's class shares too, up to `max_listed` images)."""
    def count(n: int, noun: str) -> str:
        return f"{n} {noun}{'' if n == 1 else 's'}"

    lines = [f"{count(summary['images'], 'image')} segmented, {len(summary['skipped'])} skipped, in "
             f"{summary['seconds']:.1f} s ({summary['images_per_second']:.2f} images/s); "
             f"{count(summary['compiles'], 'compilation')} ({summary['compile_seconds']:.1f} s) for "
             f"{count(len(summary['padded_shapes']), 'padded shape')} "
             + ", ".join(f"{h}x{w}" for h, w in summary["padded_shapes"])]
    lines += [f"  skipped {path}: {reason}" for path, reason in summary["skipped"]]
    if len(summary["per_image"]) <= max_listed:
        lines += [f"  {line}" for line in summary["per_image"]]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ovseg_jax.predict", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Writes <stem>.overlay.png, <stem>.labels.png (class indices; uint8 with "
                                       "255 = unlabeled for < 255 classes, else uint16 with 65535) and <stem>.json "
                                       "per image into --output.")
    p.add_argument("--checkpoint", required=True, help="merged OVSeg .pth, original OVSeg .pth, or segmenter workdir")
    p.add_argument("--tokenizer", help="tokenizer directory or OpenAI's bpe_simple_vocab_16e6.txt.gz "
                                       f"(default: the run's, or beside the checkpoint: {', '.join(TOKENIZER_PLACES)})")
    names = p.add_mutually_exclusive_group(required=True)
    names.add_argument("--classes", help='comma-separated class names, e.g. "sky,tree,red car"')
    names.add_argument("--classes-file", help="a text file with one class name per line")
    p.add_argument("--input", required=True, nargs="+", help="image files, directories or glob patterns")
    p.add_argument("--output", required=True, help="output directory (created)")
    p.add_argument("--mode", choices=sorted(MODE_DEFAULTS), default="semantic")
    p.add_argument("--ensemble-weight", type=_weight, default=_UNSET,
                   help="λ: 0 = CLIP only, 'none' = segmenter only (default 0.7 semantic, 0.0 demo)")
    p.add_argument("--mask-threshold", type=float, default=None, help="default 0.4 semantic, 0.35 demo")
    p.add_argument("--templates", default="vild",
                   help="prompt templates: 'vild' (14), 'single', or your own with '{}', separated by ';'")
    p.add_argument("--no-mask-prompts", action="store_true", help="run CLIP without its mask prompts")
    p.add_argument("--clip-top-k", type=int, default=None, metavar="K",
                   help="CLIP on the K valid proposals the segmenter ranks highest only (default: all, as the paper)")
    p.add_argument("--short", type=int, default=None, help="short side of the model input (default 640; R101c 512)")
    p.add_argument("--max-size", type=int, default=None, help="long side cap (default 2560; R101c 2048)")
    p.add_argument("--bucket", type=int, default=BUCKET, help="pad sizes to multiples of this (compile buckets)")
    p.add_argument("--batch-size", type=int, default=4, help="images of one padded shape per device call")
    p.add_argument("--side-by-side", action="store_true", help="overlay pictures show the input on the left")
    p.add_argument("--compile-cache", default=str(default_cache_dir()),
                   help="JAX persistent compilation cache: later runs skip compiling ('none': off; default %(default)s)")
    return p


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/ovseg_jax/jax_cache` (default `~/.cache/ovseg_jax/jax_cache`)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ovseg_jax" / "jax_cache"


def _weight(text: str) -> float | None:
    if text.lower() == "none":
        return None
    return float(text)


def parse_templates(text: str) -> str | list[str]:
    """`--templates`: a set name ("vild", "single") as is, else templates with `{}` separated by ';'."""
    return text if "{}" not in text else [t.strip() for t in text.split(";") if t.strip()]




def _check_args(args) -> None:
    for name in ("short", "max_size", "bucket", "batch_size"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive; got {value}")
    if args.bucket % 32:
        raise InputError(f"--bucket must be a multiple of 32 (the segmenter's size divisibility); got {args.bucket}")


def run(args) -> dict:
    """The command: check inputs, load, segment, print the summary -> the summary dict."""
    from ovseg_jax.text import templates as resolve_templates  # noqa: PLC0415

    _check_args(args)
    class_names = parse_class_names(args.classes, args.classes_file)
    try:
        templates = parse_templates(args.templates)
        resolve_templates(templates)
    except ValueError as e:
        raise InputError(f"--templates: {e}") from None
    paths = collect_inputs(args.input)
    if args.compile_cache and args.compile_cache.lower() != "none":
        from ovseg_jax.compilation import enable_cache  # noqa: PLC0415

        enable_cache(args.compile_cache, min_compile_seconds=0.0)  # model init compiles too
    options = {"mode": args.mode, "mask_prompts": not args.no_mask_prompts, "templates": templates,
               "clip_top_k": args.clip_top_k}
    if args.mask_threshold is not None:
        options["mask_threshold"] = args.mask_threshold
    if args.ensemble_weight is not _UNSET:
        options["ensemble_weight"] = args.ensemble_weight
    predictor = _load(args.checkpoint, args.tokenizer, options)
    short, max_size = predictor.resize or RESIZE["swin"]
    short, max_size = args.short or short, args.max_size or max_size
    summary = predict_files(predictor, paths, class_names, Path(args.output), short=short, max_size=max_size,
                            bucket=args.bucket, batch_size=args.batch_size, side_by_side=args.side_by_side)
    print(format_summary(summary))
    return summary


def _load(checkpoint: str, tokenizer: str | None, options: dict) -> Predictor:
    from ovseg_jax.convert.torch_io import CheckpointError  # noqa: PLC0415

    try:
        return load_predictor(checkpoint, tokenizer, **options)
    except (CheckpointError, FileNotFoundError) as e:
        raise InputError(str(e).splitlines()[0]) from None
    except ValueError as e:  # Predictor's option checks
        raise InputError(str(e)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m ovseg_jax.predict ...` -> exit status (0 ok, 2 bad input, 1 when every image was skipped)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = run(args)
    except InputError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    return 1 if summary["images"] == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
