"""A generated open-vocabulary world: scenes of coloured shapes on textured "stuff" backgrounds.

Vocabulary: 5 stuff classes (textures) + 6 colours x 5 shapes ("red circle", ...) = 35 classes.
A fixed seen/unseen split holds out one colour-shape combination per colour and one stuff class;
unseen names never appear in the segmenter's labels or the mask-category pairs of the train split
(their pixels are labelled with their id on disk and ignored by the train source), only in val.
Captions (for CLIP pretraining, the stand-in for web pretraining) mention every visible object.

On-disk layout written by `generate` (COCO-Stuff-like; `ovseg_jax.data.sources` reads it):
    images/{train,val}/NNNNNN.png          RGB uint8
    annotations/{train,val}/NNNNNN.png     uint8 class ids into classes.json "names", 255 = ignore
    classes.json                           {"names", "seen", "unseen", "stuff", "things"}
    captions.jsonl                         {"image": "images/train/..", "caption": "a red circle on grass"}
    pairs.jsonl                            {"image", "mask": COCO RLE, "noun", "source": "gt"} (seen only)
    tokenizer/{vocab.json, merges.txt}     a word-level CLIP BPE covering every caption/name word

`python -m ovseg_jax.data.synthetic --out DIR [--num-train N --num-val N --image-size S --seed K]`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ovseg_jax.data.crops import rle_encode
from ovseg_jax.text import write_word_vocab

STUFF = ("grass", "sky", "sand", "water", "snow")
COLORS = {"red": (215, 40, 40), "green": (40, 175, 70), "blue": (45, 75, 220),
          "yellow": (235, 210, 40), "purple": (140, 60, 190), "orange": (245, 135, 25)}
SHAPES = ("circle", "square", "triangle", "ring", "cross")
THINGS = tuple(f"{c} {s}" for c in COLORS for s in SHAPES)
CLASS_NAMES = STUFF + THINGS
# One held-out combination per colour (each colour and each shape stays seen elsewhere) + one stuff.
UNSEEN = ("snow",) + tuple(f"{c} {SHAPES[(2 * i + 1) % len(SHAPES)]}" for i, c in enumerate(COLORS))
SEEN = tuple(n for n in CLASS_NAMES if n not in UNSEEN)
IGNORE = 255
_SPLIT_ID = {"train": 0, "val": 1}
TOKENIZER_WORDS = list(CLASS_NAMES) + ["a an scene on and"]  # every word of the names and captions


def tokenizer_size() -> int:
    """Vocabulary size of the world's tokenizer (the CLIP text tower's embedding rows)."""
    import tempfile  # noqa: PLC0415

    from ovseg_jax.text import Tokenizer  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        return Tokenizer.from_dir(write_word_vocab(TOKENIZER_WORDS, tmp)).vocab_size


def ensure(out_dir: str | Path, **kwargs) -> Path:
    """`generate(out_dir, **kwargs)` unless `out_dir` already holds a world with at least as many
    train/val images (generation is deterministic, so an existing one is the same world)."""
    out = Path(out_dir)
    meta = out / "generated.json"
    if meta.is_file():
        done = json.loads(meta.read_text())
        if all(done.get(k) == v for k, v in kwargs.items() if k not in ("num_train", "num_val")) and \
                done.get("num_train", 0) >= kwargs.get("num_train", 0) and done.get("num_val", 0) >= kwargs.get("num_val", 0):
            return out
    generate(out, **kwargs)
    meta.write_text(json.dumps(kwargs))
    return out


def _texture(name: str, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A procedural texture for a stuff class -> float32 [h, w, 3] on the 0-255 scale."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) / max(h, w)
    noise = rng.normal(0.0, 1.0, (h, w)).astype(np.float32)
    if name == "grass":
        streak = rng.normal(0.0, 1.0, (1, w)).astype(np.float32)
        shade = 18 * streak + 12 * noise
        base = np.array([70, 140, 45], np.float32)
    elif name == "sky":
        shade = -60 * yy + 4 * noise
        base = np.array([175, 210, 250], np.float32)
    elif name == "sand":
        shade = 22 * noise + 10 * np.sin(40 * xx + 25 * yy)
        base = np.array([215, 188, 128], np.float32)
    elif name == "water":
        phase = rng.uniform(0, 2 * np.pi)
        shade = 25 * np.sin(60 * yy + 6 * np.sin(20 * xx) + phase) + 6 * noise
        base = np.array([40, 95, 170], np.float32)
    elif name == "snow":
        shade = 8 * noise - 25 * xx
        base = np.array([238, 240, 248], np.float32)
    else:
        raise ValueError(f"unknown stuff class {name!r}; expected one of {STUFF}")
    return base + shade[..., None]


def _shape_mask(shape: str, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of `shape` with radius `r` given pixel offsets from its centre."""
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.82 * r
    if shape == "triangle":  # apex up, base at +0.8 r
        return (dy <= 0.8 * r) & (2 * np.abs(dx) <= (dy + r) * 1.1)
    if shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.5 * r) ** 2)
    if shape == "cross":
        ax, ay = np.abs(dx), np.abs(dy)
        return ((ax <= 0.3 * r) & (ay <= r)) | ((ay <= 0.3 * r) & (ax <= r))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One scene -> (image uint8 [S, S, 3], label uint8 [S, S] ids into CLASS_NAMES, visible names).

    One or two stuff regions split by a wavy horizon, then 1-4 shapes (later ones occlude earlier
    ones); the name list is in drawing order, stuff first, each visible class once.
    """
    h = w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    image = np.empty((h, w, 3), np.float32)
    label = np.empty((h, w), np.uint8)
    stuff = rng.choice(len(STUFF), size=2, replace=False)
    if rng.random() < 0.7:
        horizon = h * rng.uniform(0.3, 0.7) + h * 0.06 * np.sin(xx * rng.uniform(0.05, 0.2) * 64 / w
                                                                 + rng.uniform(0, 6.3))
        top = yy < horizon
    else:
        top = np.ones((h, w), bool)
    for region, s in ((top, stuff[0]), (~top, stuff[1])):
        image[region] = _texture(STUFF[s], rng, h, w)[region]
        label[region] = s
    for _ in range(rng.integers(1, 5)):
        color = rng.integers(len(COLORS))
        shape = rng.integers(len(SHAPES))
        r = size * rng.uniform(0.1, 0.22)
        cy, cx = rng.uniform(r * 0.6, h - r * 0.6), rng.uniform(r * 0.6, w - r * 0.6)
        mask = _shape_mask(SHAPES[shape], yy - cy, xx - cx, r)
        rgb = np.array(list(COLORS.values())[color], np.float32)
        shade = 20 * (yy - cy) / (2 * r) + rng.normal(0, 5, (h, w)).astype(np.float32)
        image[mask] = rgb + shade[mask][:, None]
        label[mask] = len(STUFF) + color * len(SHAPES) + shape
    ids, counts = np.unique(label, return_counts=True)
    visible = [CLASS_NAMES[i] for i, c in zip(ids, counts, strict=True) if c >= 4]
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), label, visible


def caption(names: list[str]) -> str:
    """"a red circle and a blue square on grass and sky" (things first, then stuff)."""
    things = [n for n in names if n not in STUFF]
    stuff = [n for n in names if n in STUFF]
    text = " and ".join(f"{'an' if n[0] in 'aeiou' else 'a'} {n}" for n in things) or "a scene"
    return f"{text} on {' and '.join(stuff)}" if stuff else text


def generate(out_dir: str | Path, *, num_train: int = 1000, num_val: int = 200, image_size: int = 64,
             seed: int = 0) -> Path:
    """Write the synthetic world to `out_dir` (layout in the module docstring) -> `out_dir`.

    Every image depends only on (seed, split, index), so a larger world extends a smaller one.
    """
    if image_size < 16:
        raise ValueError(f"image_size={image_size}: expected at least 16 pixels")
    out = Path(out_dir)
    seen_ids = {CLASS_NAMES.index(n) for n in SEEN}
    for sub in ("images/train", "images/val", "annotations/train", "annotations/val"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    with open(out / "captions.jsonl", "w") as captions, open(out / "pairs.jsonl", "w") as pairs:
        for split, count in (("train", num_train), ("val", num_val)):
            for index in range(count):
                rng = np.random.default_rng([seed, _SPLIT_ID[split], index])
                image, label, names = render(rng, image_size)
                stem = f"{index:06d}"
                image_rel = f"images/{split}/{stem}.png"
                Image.fromarray(image).save(out / image_rel, compress_level=1)
                Image.fromarray(label).save(out / "annotations" / split / f"{stem}.png", compress_level=1)
                if split != "train":
                    continue
                captions.write(json.dumps({"image": image_rel, "caption": caption(names)}) + "\n")
                for name in names:
                    cid = CLASS_NAMES.index(name)
                    if cid in seen_ids:
                        pairs.write(json.dumps({"image": image_rel, "mask": rle_encode(label == cid),
                                                "noun": name, "source": "gt"}) + "\n")
    (out / "classes.json").write_text(json.dumps(
        {"names": list(CLASS_NAMES), "seen": list(SEEN), "unseen": list(UNSEEN),
         "stuff": list(STUFF), "things": list(THINGS)}, indent=1))
    write_word_vocab(TOKENIZER_WORDS, out / "tokenizer")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num-train", type=int, default=1000)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = generate(args.out, num_train=args.num_train, num_val=args.num_val,
                   image_size=args.image_size, seed=args.seed)
    print(f"wrote {args.num_train} train + {args.num_val} val images ({args.image_size} px) to {out}")


if __name__ == "__main__":
    main()
