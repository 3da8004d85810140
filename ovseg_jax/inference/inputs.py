"""What users hand the predictor: images (files, PIL, arrays; preprocessing as reference 1.1),
class names (a comma-separated string or a file), prompt templates, and input paths."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageOps

from ovseg_jax.data import transforms
from ovseg_jax.data.sources import _rgb_uint8, read_image
from ovseg_jax.inference.ensemble import as_rgb_uint8, check_class_names

BUCKET = 128  # inputs are padded to multiples of this per side: one compilation per padded shape
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class InputError(ValueError):
    """Bad command-line input (class names, inputs, checkpoint): reported in one line, exit status 2."""


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


def parse_class_names(classes: str | None = None, classes_file: str | os.PathLike | None = None,
                      classes_from: str | None = None) -> list[str]:
    """`"sky, tree,red car"` (comma-separated), a file with one name per line (empty lines skipped;
    any readable file, pipes such as a shell's `<(...)` included, and `-` for standard input) or the
    class list of a dataset (`classes_from`: a registry name or a dataset folder, see
    `ovseg_jax.data.custom`) -> checked names (`ensemble.check_class_names`); `InputError` for blank
    or duplicate names, or a file or dataset that cannot be read."""
    if classes_from is not None:
        from ovseg_jax.data import registry  # noqa: PLC0415
        from ovseg_jax.data.sources import DatasetLayoutError  # noqa: PLC0415

        try:
            names = list(registry.get(classes_from).class_names)
        except (KeyError, DatasetLayoutError) as e:
            raise InputError(f"--classes-from {classes_from}: {str(e).splitlines()[0]}") from None
        source = f"--classes-from {classes_from}"
    elif classes_file is not None:
        import sys  # noqa: PLC0415

        stdin = str(classes_file) == "-"
        source = "classes from standard input" if stdin else f"classes file {classes_file}"
        try:
            data = getattr(sys.stdin, "buffer", sys.stdin).read() if stdin else Path(classes_file).read_bytes()
            lines = (data.decode("utf-8") if isinstance(data, bytes) else data).splitlines()
        except FileNotFoundError:
            raise InputError(f"{source}: no such file") from None
        except IsADirectoryError:
            raise InputError(f"{source}: a directory (expected a text file with one class name per line)") from None
        except OSError as e:
            raise InputError(f"{source}: cannot be read ({e.strerror or e})") from None
        except UnicodeDecodeError:
            raise InputError(f"{source}: not UTF-8 text (expected one class name per line)") from None
        names = [line.strip() for line in lines if line.strip()]
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


def parse_templates(text: str) -> str | list[str]:
    """`--templates`: a set name ("vild", "single") as is, else templates with `{}` separated by ';'."""
    return text if "{}" not in text else [t.strip() for t in text.split(";") if t.strip()]
