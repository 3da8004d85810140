"""A generated open-vocabulary world: coloured, patterned objects on textured "stuff", designed so
that open-vocabulary transfer is learnable in minutes on a CPU and measurable.

Vocabulary: 4 stuff classes (textures) + 4 colours x 4 patterns ("striped red", "dotted blue",
...) = 20 classes. Objects also get a random shape (circle, square, triangle, cross) that is not
part of their class. The seen/unseen split is fixed: one stuff class ("snow") and one
pattern-colour combination per colour are unseen (`UNSEEN`), so that every colour and every
pattern word stays seen in three other combinations. An unseen thing is therefore a new
*combination* of attributes that the segmenter and the CLIP adaptation stages saw, only apart.

Why the task is learnable and measurable:
- Both attributes are local (a colour, a texture a few pixels wide), which a tiny ViT with 4-pixel
  patches learns in a few hundred steps. Shapes were tried first: the caption-pretrained tiny CLIP
  stayed at chance on shape after 800 steps while learning colour, so they are only nuisance here.
- CLIP pretraining (the stand-in for OpenAI's web data, which knows every class) reads a separate
  "web" corpus: one large object on stuff, or stuff alone, captioned "a striped red on a grass" /
  "a striped red" / "a grass". Every class name, seen or unseen, occurs in these captions, as
  "cow" occurs on the web; captions are at most 9 tokens (context 24: nothing is truncated).
- The web pictures never show the grey fill of masked crops, and their objects are smaller in the
  picture than in a crop of a proposal, so the pretrained CLIP classifies masked proposals worse
  than whole pictures: the domain gap that OVSeg's mask adaptation (fine-tuning on masked crops,
  then mask prompts) closes, reproduced here.
- Segmentation scenes (the COCO-Stuff stand-in) hold 1-2 stuff regions and 1-3 objects of radius
  14-26% of the side; unseen pixels are labelled with their id on disk and ignored by the train
  source, so the segmenter never learns their names.
- Colours are far apart in hue, stuff textures look unlike the objects' patterns, and a
  pattern's period scales with its object, so the texture survives every crop and resize.

On-disk layout written by `generate` (COCO-Stuff-like; `ovseg_jax.data.sources` reads it):
    images/{train,val}/NNNNNN.png          RGB uint8
    annotations/{train,val}/NNNNNN.png     uint8 class ids into classes.json "names", 255 = ignore
    classes.json                           {"names", "seen", "unseen", "stuff", "things"}
    captions.jsonl                         {"image": "images/train/..", "caption": "a striped red and a
                                           plain blue on a grass"}: the train scenes (COCO Captions stand-in)
    pairs.jsonl                            {"image", "mask": COCO RLE, "noun", "source": "gt"} (seen only)
    web/images/NNNNNN.png, web/captions.jsonl   the CLIP pretraining corpus (all classes)
    tokenizer/{vocab.json, merges.txt}     a word-level CLIP BPE covering every caption/name word

`python -m ovseg_jax.data.synthetic --out DIR [--num-train N --num-val N --num-web N --image-size S --seed K]`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ovseg_jax.data.crops import rle_encode
from ovseg_jax.text import write_word_vocab

# Stuff textures unlike the objects' patterns (no wavy water next to "striped blue").
STUFF = ("grass", "sky", "sand", "snow")
COLORS = {"red": (215, 40, 40), "green": (40, 175, 70), "blue": (45, 75, 220), "yellow": (235, 210, 40)}
PATTERNS = ("plain", "striped", "dotted", "checkered")
SHAPES = ("circle", "square", "triangle", "cross")  # drawn at random: not part of a class
THINGS = tuple(f"{p} {c}" for c in COLORS for p in PATTERNS)
CLASS_NAMES = STUFF + THINGS
# One held-out combination per colour (colour i with pattern i mod 4: each colour keeps three seen
# patterns, each pattern at least three seen colours) + one stuff class.
UNSEEN = ("snow",) + tuple(f"{PATTERNS[i % len(PATTERNS)]} {c}" for i, c in enumerate(COLORS))
SEEN = tuple(n for n in CLASS_NAMES if n not in UNSEEN)
IGNORE = 255
VERSION = 3  # of the world's design; `ensure` regenerates worlds of another version
_SPLIT_ID = {"train": 0, "val": 1, "web": 2}
TOKENIZER_WORDS = list(CLASS_NAMES) + ["a an scene on and"]  # every word of the names and captions


def tokenizer_size() -> int:
    """Vocabulary size of the world's tokenizer (the CLIP text tower's embedding rows)."""
    import tempfile  # noqa: PLC0415

    from ovseg_jax.text import Tokenizer  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        return Tokenizer.from_dir(write_word_vocab(TOKENIZER_WORDS, tmp)).vocab_size


def ensure(out_dir: str | Path, **kwargs) -> Path:
    """`generate(out_dir, **kwargs)` unless `out_dir` already holds a world of this design with at
    least as many pictures per split (generation is deterministic, so an existing one is the same)."""
    out = Path(out_dir)
    meta = out / "generated.json"
    counts = ("num_train", "num_val", "num_web")
    if meta.is_file():
        done = json.loads(meta.read_text())
        if done.get("version") == VERSION and all(done.get(k) == v for k, v in kwargs.items() if k not in counts) \
                and all(done.get(k, 0) >= kwargs.get(k, 0) for k in counts):
            return out
    generate(out, **kwargs)
    meta.write_text(json.dumps({**kwargs, "version": VERSION}))
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
        shade = 22 * noise
        base = np.array([215, 188, 128], np.float32)
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
    if shape == "cross":
        ax, ay = np.abs(dx), np.abs(dy)
        return ((ax <= 0.3 * r) & (ay <= r)) | ((ay <= 0.3 * r) & (ax <= r))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _background(rng: np.random.Generator, size: int, two_stuff: bool):
    """1 or 2 stuff regions split by a wavy horizon -> (image float32 [S, S, 3], label uint8 [S, S])."""
    h = w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    image = np.empty((h, w, 3), np.float32)
    label = np.empty((h, w), np.uint8)
    stuff = rng.choice(len(STUFF), size=2, replace=False)
    if two_stuff:
        horizon = h * rng.uniform(0.3, 0.7) + h * 0.06 * np.sin(xx * rng.uniform(0.05, 0.2) * 64 / w
                                                                 + rng.uniform(0, 6.3))
        top = yy < horizon
    else:
        top = np.ones((h, w), bool)
    for region, s in ((top, stuff[0]), (~top, stuff[1])):
        image[region] = _texture(STUFF[s], rng, h, w)[region]
        label[region] = s
    return image, label


def _pattern_mask(pattern: str, dy: np.ndarray, dx: np.ndarray, period: float) -> np.ndarray:
    """Where `pattern` is dark, given pixel offsets from the object's centre and its period (pixels)."""
    if pattern == "plain":
        return np.zeros(dy.shape, bool)
    if pattern == "striped":  # horizontal stripes, half a period each
        return np.floor(dy / (period / 2)) % 2 == 1
    if pattern == "dotted":
        fy, fx = dy / period - np.round(dy / period), dx / period - np.round(dx / period)
        return fy * fy + fx * fx <= 0.3 ** 2
    if pattern == "checkered":
        return (np.floor(dy / (period / 2)) + np.floor(dx / (period / 2))) % 2 == 1
    raise ValueError(f"unknown pattern {pattern!r}; expected one of {PATTERNS}")


def _draw_object(rng: np.random.Generator, image: np.ndarray, label: np.ndarray, radius: tuple[float, float],
                 centred: bool) -> None:
    """Paint one object of a random colour, pattern and shape into `image` / `label` (in place).
    The pattern's period scales with the object (radius / 1.8, at least 6 pixels), so a crop of the
    object shows about the same pattern whatever its size."""
    h, w = label.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    color, pattern, shape = rng.integers(len(COLORS)), rng.integers(len(PATTERNS)), rng.integers(len(SHAPES))
    r = h * rng.uniform(*radius)
    if centred:
        cy, cx = h / 2 + rng.uniform(-0.15, 0.15) * h, w / 2 + rng.uniform(-0.15, 0.15) * w
    else:
        cy, cx = rng.uniform(r * 0.6, h - r * 0.6), rng.uniform(r * 0.6, w - r * 0.6)
    mask = _shape_mask(SHAPES[shape], yy - cy, xx - cx, r)
    dark = _pattern_mask(PATTERNS[pattern], yy - cy, xx - cx, max(6.0, r / 1.8))
    rgb = np.array(list(COLORS.values())[color], np.float32)
    shade = 20 * (yy - cy) / (2 * r) + rng.normal(0, 5, (h, w)).astype(np.float32)
    pixels = (rgb + shade[..., None]) * np.where(dark, 0.4, 1.0)[..., None]
    image[mask] = pixels[mask]
    label[mask] = len(STUFF) + color * len(PATTERNS) + pattern


def _finish(image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """-> (uint8 image, label, names of the classes with >= 4 pixels, stuff first)."""
    ids, counts = np.unique(label, return_counts=True)
    visible = [CLASS_NAMES[i] for i, c in zip(ids, counts, strict=True) if c >= 4]
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), label, visible


def render(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One segmentation scene -> (image uint8 [S, S, 3], label uint8 [S, S] ids into CLASS_NAMES,
    visible names). 1-2 stuff regions, then 1-3 shapes of radius 14-26% of the side (later ones
    occlude earlier ones); each visible class named once, stuff first."""
    image, label = _background(rng, size, two_stuff=rng.random() < 0.7)
    for _ in range(rng.integers(1, 4)):
        _draw_object(rng, image, label, (0.14, 0.26), centred=False)
    return _finish(image, label)


def render_web(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """One picture of the CLIP pretraining corpus -> (image uint8 [S, S, 3], caption): with
    probability 3/4 one large object (radius 22-42% of the side) near the centre, captioned
    "a striped red" or "a striped red on a grass" (equal chance); else stuff alone, "a grass" /
    "a grass and a sky"."""
    image, label = _background(rng, size, two_stuff=rng.random() < 0.3)
    if rng.random() < 0.75:
        _draw_object(rng, image, label, (0.22, 0.42), centred=True)
    image, _, names = _finish(image, label)
    things = [n for n in names if n not in STUFF]
    if things and rng.random() < 0.5:
        return image, caption(things[:1])
    return image, caption(names)


def caption(names: list[str]) -> str:
    """"a striped red and a plain blue on a grass and a sky" (things first, then stuff)."""
    things = " and ".join(f"a {n}" for n in names if n not in STUFF)
    stuff = " and ".join(f"a {n}" for n in names if n in STUFF)
    if things and stuff:
        return f"{things} on {stuff}"
    return things or stuff or "a scene"


def generate(out_dir: str | Path, *, num_train: int = 1000, num_val: int = 200, num_web: int = 2000,
             image_size: int = 64, seed: int = 0) -> Path:
    """Write the synthetic world to `out_dir` (layout in the module docstring) -> `out_dir`.

    Every image depends only on (seed, split, index), so a larger world extends a smaller one.
    """
    if image_size < 16:
        raise ValueError(f"image_size={image_size}: expected at least 16 pixels")
    out = Path(out_dir)
    seen_ids = {CLASS_NAMES.index(n) for n in SEEN}
    for sub in ("images/train", "images/val", "annotations/train", "annotations/val", "web/images"):
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
    with open(out / "web" / "captions.jsonl", "w") as web:
        for index in range(num_web):
            image, text = render_web(np.random.default_rng([seed, _SPLIT_ID["web"], index]), image_size)
            Image.fromarray(image).save(out / "web" / "images" / f"{index:06d}.png", compress_level=1)
            web.write(json.dumps({"image": f"images/{index:06d}.png", "caption": text}) + "\n")
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
    parser.add_argument("--num-web", type=int, default=2000, help="CLIP pretraining pictures")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = generate(args.out, num_train=args.num_train, num_val=args.num_val, num_web=args.num_web,
                   image_size=args.image_size, seed=args.seed)
    print(f"wrote {args.num_train} train + {args.num_val} val scenes and {args.num_web} web pictures "
          f"({args.image_size} px) to {out}")


if __name__ == "__main__":
    main()
