"""Mine mask-category pairs from captions (reference 4.1; `python -m ovseg_jax.mine_pairs` runs it).

    python -m ovseg_jax.mine_pairs --config configs/mine_coco.py --workdir outputs/mined_coco
    python -m ovseg_jax.mine_pairs --config configs/mine_synthetic.py:outputs/demo --workdir outputs/demo/world/mined

For every image: the nouns of its caption (`ovseg_jax.mining.nouns`; one caption, the paper's "1cap", or
all of them), the trained segmenter's Q mask proposals, and CLIP on each proposal's masked crop
(reference 1.8-1.9, the template ensemble over the nouns). Each noun keeps its best valid proposal
when that proposal's score reaches `min_score`:

- score "softmax" (default): `softmax_n(100 · cos(crop_q, noun_n))` over the caption's nouns, i.e.
  how sure CLIP is that proposal q shows noun n rather than another thing the caption names. The
  caption says which things are there, so this is the question to ask; its scale does not depend
  on the CLIP model or template set (a cosine of 0.25 is high for ViT-L, low for a tiny CLIP), and
  `min_score` >= 0.5 makes each kept noun its proposal's top noun. Ties (a caption with one noun
  scores 1 everywhere) go to the higher cosine.
- score "cosine": `cos(crop_q, noun_n)`, the caption's other nouns ignored.

A proposal is valid when it has a pixel above `mask_threshold` (reference 1.8) and covers at
least `min_area` of the image. The segmenter's text bank is the noun bank (the vocabulary terms,
or with NLTK the nouns of this shard's captions): it only changes the segmenter's class scores,
which mining does not use; its masks do not depend on it. The pair's mask is the proposal's
probability map resized (bilinear) to the original image and thresholded at `mask_threshold`.

Writes into the workdir:
- `pairs.jsonl`: `{"image", "mask", "noun", "source": "caption" | "gt", "class", "score", "item"}`,
  paths relative to the file (read by `ovseg_jax.data.crops.read_pairs` and
  `pipeline.clip_pairs_loader`); masks as `masks/*.png` (nonzero = region) or inline COCO RLE
  (`mask_format`); `source: "gt"` pairs come from a segmentation dataset's ground truth
  (`sources` "gt" or "both", the appendix's Table 5).
- `crops.csv` + `crops/*.png` with `write_crops`: the 224 masked crops as the released CSV.
- `nouns.json` (per noun: class, mentions, pairs, mean score, below threshold),
  `scores.png` + `scores.svg` (histogram of each mentioned noun's best score, kept and rejected),
  `report.json` (images, pairs, unique nouns, skipped items by reason, agreement when known).

Sharding: process p of P (`shard.index`/`shard.count`, default `jax.process_index()` /
`jax.process_count()`) mines items i with i % P == p into `shards/pairs-p-of-P.jsonl`, its local
devices each holding a replica and taking batches in turn; the last shard to finish (process 0
after a barrier under `jax.distributed`) merges the shards in item order. Resuming: after each
batch the shard's pairs file is flushed and `shards/progress-p-of-P.json` rewritten atomically
with the next item and the file's length; a restarted run truncates the file to that length and
goes on, so a kill at any point leaves no duplicate. Changing the config of a started workdir is
refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from ovseg_jax import configs
from ovseg_jax.configs import ConfigError, Field, Section
from ovseg_jax.data import crops
from ovseg_jax.data.sources import BadExampleError, DatasetLayoutError, read_image, read_label
from ovseg_jax.data.transforms import bucket_size, resize_image, resized_hw
from ovseg_jax.mining.nouns import Noun, make_extractor
from ovseg_jax.utils.progress import progress as progress_bar

log = logging.getLogger("ovseg_jax.mine_pairs")

SCORES = ("softmax", "cosine")
SOURCES = ("captions", "gt", "both")
READERS = ("jsonl", "coco", "tfds")

SCHEMA = Section({
    "data": Section({
        "kind": Field((str,)),  # READERS
        "path": Field((str,), ""),  # jsonl: captions.jsonl or its folder; coco: the root with annotations/, <split>/
        "split": Field((str,), "train2017"),  # coco: train2017 / val2017; tfds: train / val / restval / test
        "data_dir": Field((str,), ""),  # tfds: TFDS data_dir ("" = TFDS's default)
        "captions": Field((str,), "one"),  # "one" (the first caption, the paper's 1cap) or "all"
        "max_images": Field((int,), 0),  # 0 = all
    }),
    "nouns": Section({"extractor": Field((str,), "vocabulary"), "vocabulary": Field((str,), "coco")}),
    "model": Section({
        "segmenter": Field((str,)),  # OVSeg .pth / segmenter workdir / ...: ovseg_jax.segmenter.load
        "clip": Field((str,)),  # the CLIP that scores crops: ovseg_jax.clip.load
        "tokenizer": Field((str,), ""),  # "" = the checkpoint's / run's own
        "templates": Field((str, list, tuple), "vild"),
        "mask_prompts": Field((bool,), False),  # feed region masks to a mask-prompted CLIP
        "mask_threshold": Field((float,), 0.4),
        "short": Field((int,), 640), "max_size": Field((int,), 2560), "bucket": Field((int,), 128),
        "batch_size": Field((int,), 4),  # images per device call
    }),
    "score": Field((str,), "softmax"),  # SCORES
    "min_score": Field((float,), 0.5),
    "min_area": Field((float,), 0.0),  # fraction of the resized image a valid proposal covers
    "sources": Field((str,), "captions"),  # SOURCES
    "gt": Section({"dataset": Field((str,), ""), "root": Field((str,), ""), "split": Field((str,), "train"),
                   "min_pixels": Field((int,), 1)}),
    "mask_format": Field((str,), "png"),  # "png" or "rle"
    "write_crops": Field((bool,), False), "crop_size": Field((int,), 224),
    "shard": Section({"index": Field((int,), -1), "count": Field((int,), -1)}),  # -1: from jax
    "agreement": Field((str,), ""),  # "synthetic:<world root>": label agreement in the report
    "histogram_bins": Field((int,), 20),
})


def check_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Fill defaults and check `config` against `SCHEMA`; every problem in one ConfigError."""
    errors: list[str] = []
    with config.unlocked():
        configs._check_section(config, SCHEMA, "", errors)  # the trainer's schema checker
    if not errors:
        for name, value, allowed in (("data.kind", config.data.kind, READERS), ("score", config.score, SCORES),
                                     ("sources", config.sources, SOURCES), ("data.captions", config.data.captions,
                                                                            ("one", "all")),
                                     ("mask_format", config.mask_format, ("png", "rle"))):
            if value not in allowed:
                errors.append(f"config.{name}={value!r}: expected one of {allowed}")
        if config.sources != "captions" and not config.gt.dataset:
            errors.append(f"config.sources={config.sources!r} needs config.gt.dataset (a registry dataset name "
                          "or a dataset folder, docs/own-data.md)")
        if config.model.batch_size <= 0:
            errors.append(f"config.model.batch_size={config.model.batch_size}: must be > 0")
    if errors:
        raise ConfigError("mining config is not valid:\n- " + "\n- ".join(errors))
    return config


# ---------------------------------------------------------------------------------------------
# Caption readers: `len(reader)`, `reader.captions(i) -> (key, image path or None, [caption])`,
# `reader.image(i) -> uint8 [H, W, 3]`.


class JsonlCaptions:
    """`captions.jsonl` (`pipeline.read_captions`: `{"image", "caption"}` lines; or a folder of images
    with its `captions.jsonl`), one item per image."""

    def __init__(self, path: str | Path):
        from ovseg_jax.data.pipeline import captions_file, read_captions  # noqa: PLC0415

        self.root = captions_file(path).parent
        grouped: dict[str, list[str]] = {}
        for image, caption in read_captions(path):
            grouped.setdefault(image, []).append(caption)
        self.items = list(grouped.items())

    def __len__(self) -> int:
        return len(self.items)

    def captions(self, i: int) -> tuple[str, str | None, list[str]]:
        image, captions = self.items[i]
        return os.path.relpath(image, self.root), image, captions

    def image(self, i: int) -> np.ndarray:
        return read_image(self.items[i][0])


class CocoCaptions:
    """COCO Captions: `<root>/annotations/captions_<split>.json` + `<root>/<split>/<file_name>`;
    images in increasing id order, each with its captions in annotation order."""

    def __init__(self, root: str | Path, split: str = "train2017"):
        root = Path(root)
        ann = root / "annotations" / f"captions_{split}.json"
        if not ann.is_file():
            raise DatasetLayoutError(f"{ann}: COCO captions file not found; expected <root>/annotations/"
                                     f"captions_{split}.json and the images in <root>/{split}/")
        try:
            data = json.loads(ann.read_bytes())
            files = {int(im["id"]): im["file_name"] for im in data["images"]}
            grouped: dict[int, list[str]] = {i: [] for i in sorted(files)}
            for a in data["annotations"]:
                grouped[int(a["image_id"])].append(str(a["caption"]).strip())
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{ann}: not a COCO captions file ({type(e).__name__}: {e}); expected 'images' "
                             "[{id, file_name}] and 'annotations' [{image_id, caption}]") from None
        self.items = [(files[i], str(root / split / files[i]), c) for i, c in grouped.items()]

    def __len__(self) -> int:
        return len(self.items)

    def captions(self, i: int) -> tuple[str, str | None, list[str]]:
        return self.items[i]

    def image(self, i: int) -> np.ndarray:
        return read_image(self.items[i][1])


class TfdsCaptions:
    """TFDS `coco_captions` (`ovseg_jax.data.tfds.TfdsCaptionSource`); images are not files, so
    those that give pairs are written to `images/<filename>` in the workdir (JPEG, quality 95)."""

    def __init__(self, split: str = "train", data_dir: str | None = None):
        from ovseg_jax.data.tfds import TfdsCaptionSource  # noqa: PLC0415

        self.source = TfdsCaptionSource(split, data_dir or None)
        self._cached: tuple[int, dict] | None = None

    def __len__(self) -> int:
        return len(self.source)

    def _record(self, i: int) -> dict:
        if self._cached is None or self._cached[0] != i:
            self._cached = (i, self.source[i])
        return self._cached[1]

    def captions(self, i: int) -> tuple[str, str | None, list[str]]:
        record = self._record(i)
        return f"images/{record['filename'] or record['id'] + '.jpg'}", None, list(record["captions"])

    def image(self, i: int) -> np.ndarray:
        return self._record(i)["image"]


def make_reader(data: ml_collections.ConfigDict):
    if data.kind == "jsonl":
        return JsonlCaptions(data.path)
    if data.kind == "coco":
        return CocoCaptions(data.path, data.split)
    return TfdsCaptions(data.split, data.data_dir)


# ---------------------------------------------------------------------------------------------
# Choosing pairs


class Pick(NamedTuple):
    noun: int  # index into the caption's nouns
    proposal: int  # index into the Q proposals
    score: float


def noun_scores(logits: np.ndarray, score: str) -> np.ndarray:
    """`[Q, N]` CLIP logits (100 · cos) of the proposals against the caption's nouns -> `[Q, N]`
    scores: softmax over the nouns, or the cosine."""
    logits = np.asarray(logits, np.float64)
    if score == "cosine":
        return logits / 100.0
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def select_pairs(logits: np.ndarray, valid: np.ndarray, *, score: str = "softmax",
                 min_score: float = 0.5) -> tuple[list[Pick], np.ndarray]:
    """Each noun's best valid proposal -> (the picks scoring >= `min_score`, `[N]` best score of each
    noun, NaN without a valid proposal). logits `[Q, N]` (100 · cos), valid `[Q]` bool. Ties of
    the score go to the higher cosine."""
    scores = noun_scores(logits, score)
    best = np.full(scores.shape[1], np.nan)
    picks = []
    if not np.any(valid):
        return picks, best
    q_valid = np.flatnonzero(valid)
    for n in range(scores.shape[1]):
        order = np.lexsort((logits[q_valid, n], scores[q_valid, n]))  # last key first: score, then cosine
        q = int(q_valid[order[-1]])
        best[n] = scores[q, n]
        if best[n] >= min_score:
            picks.append(Pick(n, q, float(best[n])))
    return picks, best


def full_size_mask(mask_probs: np.ndarray, original_hw: tuple[int, int], threshold: float) -> np.ndarray:
    """`[h, w]` probabilities at the resized size -> bool `[H0, W0]`: bilinear resize, then `> threshold`."""
    if mask_probs.shape != tuple(original_hw):
        resized = Image.fromarray(np.asarray(mask_probs, np.float32), mode="F").resize(
            (original_hw[1], original_hw[0]), Image.BILINEAR)
        mask_probs = np.asarray(resized)
    return mask_probs > threshold


# ---------------------------------------------------------------------------------------------
# Label agreement (the synthetic world, where the truth is known)


def majority_class(mask: np.ndarray, label: np.ndarray, ignore_value: int = 255) -> int | None:
    """The most frequent label under the bool `mask` `[H, W]`, ignoring `ignore_value`; None if no
    labelled pixel (ties go to the lower id)."""
    values = label[mask & (label != ignore_value)]
    if values.size == 0:
        return None
    ids, counts = np.unique(values, return_counts=True)
    return int(ids[np.argmax(counts)])


def label_agreement(records: Sequence[crops.PairRecord] | str | Path, label_of: Callable[[str], np.ndarray],
                    class_names: Sequence[str], *, ignore_value: int = 255,
                    noun_class: Callable[[str], str] = lambda n: n) -> dict:
    """Fraction of the pairs (records or a pairs file) whose noun's class (`noun_class`) is the majority ground-truth class
    under the pair's mask (`label_of(image path)` -> int `[H, W]` ids into `class_names`;
    `ignore_value` pixels not counted; a mask over ignored pixels only disagrees)
    -> {"pairs", "agree", "fraction", "per_noun": {noun: {"pairs", "agree"}}}."""
    per_noun: dict[str, Counter] = {}
    if isinstance(records, (str, Path)):
        records = crops.read_pairs(records)
    for record in records:
        label = label_of(record.image)
        mask = (read_label(record.mask) != 0 if isinstance(record.mask, str)
                else crops.rle_decode(record.mask, where=f"mask of {record.image}", shape=label.shape))
        majority = majority_class(mask, label, ignore_value)
        ok = majority is not None and class_names[majority] == noun_class(record.text)
        c = per_noun.setdefault(record.text, Counter())
        c["pairs"] += 1
        c["agree"] += int(ok)
    pairs = sum(c["pairs"] for c in per_noun.values())
    agree = sum(c["agree"] for c in per_noun.values())
    return {"pairs": pairs, "agree": agree, "fraction": agree / pairs if pairs else float("nan"),
            "per_noun": {n: dict(c) for n, c in sorted(per_noun.items())}}


def synthetic_labels(world: str | Path) -> Callable[[str], np.ndarray]:
    """`images/<split>/X.png` of the generated world -> its full label map `annotations/<split>/X.png`
    (unseen classes included, unlike the registry's train source)."""
    world = Path(world).resolve()

    def label_of(image: str) -> np.ndarray:
        rel = Path(image).resolve().relative_to(world / "images")
        return read_label(world / "annotations" / rel)

    return label_of


def agreement_for(spec: str, pairs_path: Path) -> dict | None:
    """`config.agreement` ("synthetic:<world root>") -> `label_agreement` of the caption pairs."""
    if not spec:
        return None
    kind, _, root = spec.partition(":")
    if kind != "synthetic" or not root:
        raise ConfigError(f"config.agreement={spec!r}: expected 'synthetic:<world root>' or ''")
    from ovseg_jax.data import synthetic  # noqa: PLC0415

    rows = [json.loads(ln) for ln in pairs_path.read_text().splitlines() if ln.strip()]
    if not any(r["source"] == "caption" for r in rows):
        return None
    records = [rec for rec, r in zip(crops.read_pairs(pairs_path), rows) if r["source"] == "caption"]
    return label_agreement(records, synthetic_labels(root), synthetic.CLASS_NAMES, ignore_value=synthetic.IGNORE)


# ---------------------------------------------------------------------------------------------
# Shard files and progress


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclasses.dataclass
class Progress:
    """What a shard has committed: items before `next` are done, `offset` bytes of its pairs file hold
    their pairs; counters, per-noun mentions / rejections and score histograms so far."""
    next: int = 0
    offset: int = 0
    done: bool = False
    counts: dict = dataclasses.field(default_factory=dict)
    mentions: dict = dataclasses.field(default_factory=dict)
    below: dict = dataclasses.field(default_factory=dict)
    hist_kept: list = dataclasses.field(default_factory=list)
    hist_rejected: list = dataclasses.field(default_factory=list)

    @classmethod
    def load(cls, path: Path, bins: int) -> "Progress":
        if path.is_file():
            return cls(**json.loads(path.read_text()))
        return cls(hist_kept=[0] * bins, hist_rejected=[0] * bins)

    def save(self, path: Path) -> None:
        _atomic_write(path, json.dumps(dataclasses.asdict(self)))

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n


def _shard(config) -> tuple[int, int]:
    index = config.shard.index if config.shard.index >= 0 else jax.process_index()
    count = config.shard.count if config.shard.count > 0 else jax.process_count()
    if not 0 <= index < count:
        raise ConfigError(f"config.shard.index={index} must lie in 0..{count - 1} (config.shard.count={count})")
    return index, count


def _stem(key: str) -> str:
    return os.path.splitext(key)[0].replace("/", "_").replace("\\", "_")


class _ShardWriter:
    """Appends one shard's pairs (+ crops), truncating to the last committed lengths first."""

    def __init__(self, workdir: Path, stream: str, index: int, count: int, config, bins: int):
        self.workdir, self.config = workdir, config
        shards = workdir / "shards"
        shards.mkdir(parents=True, exist_ok=True)
        tag = f"{stream}-{index:05d}-of-{count:05d}"
        self.pairs_path = shards / f"pairs-{tag}.jsonl"
        self.progress_path = shards / f"progress-{tag}.json"
        self.progress = Progress.load(self.progress_path, bins)
        self.pairs = open(self.pairs_path, "a+b")
        self.pairs.truncate(self.progress.offset)  # drop what an interrupted batch appended after the last commit
        self.pairs.seek(self.progress.offset)

    def add(self, item: int, key: str, image_path: str, j: int, mask: np.ndarray, noun: Noun, source: str,
            score: float | None) -> None:
        """One pair: its mask file (or RLE) and line."""
        stem = f"{source}/{_stem(key)}_{j}"
        if self.config.mask_format == "png":
            mask_file = self.workdir / "masks" / f"{stem}.png"
            mask_file.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(mask_file)
            mask_ref: Any = os.path.relpath(mask_file, self.workdir)
        else:
            mask_ref = crops.rle_encode(mask)
        row = {"image": os.path.relpath(image_path, self.workdir), "mask": mask_ref, "noun": noun.text,
               "source": source, "class": noun.cls, "score": None if score is None else round(score, 5), "item": item}
        if self.config.write_crops:
            row["crop"] = self._write_crop(stem, image_path, mask, noun.text)
        self.pairs.write((json.dumps(row) + "\n").encode())

    def _write_crop(self, stem: str, image_path: str, mask: np.ndarray, noun: str) -> str:
        """The masked crop as the released data (crop to the box, CLIP-mean fill, bicubic to
        `crop_size`) -> its path relative to the workdir."""
        crop, _ = crops.region_of(crops.PairRecord(image_path, crops.rle_encode(mask), noun))
        size = self.config.crop_size
        crop_file = self.workdir / "crops" / f"{stem}.png"
        crop_file.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(crop).resize((size, size), Image.BICUBIC).save(crop_file)
        return os.path.relpath(crop_file, self.workdir)

    def commit(self, next_item: int) -> None:
        """Make everything appended so far durable, then record it (atomically) as done."""
        self.pairs.flush()
        os.fsync(self.pairs.fileno())
        self.progress.next = next_item
        self.progress.offset = self.pairs.tell()
        self.progress.save(self.progress_path)

    def close(self) -> None:
        self.pairs.close()


# ---------------------------------------------------------------------------------------------
# The models


def load_models(model) -> tuple[Any, Any]:
    """(segmenter, clip) from `config.model` (`ovseg_jax.segmenter.load` / `ovseg_jax.clip.load`)."""
    from ovseg_jax import clip as clip_api, segmenter as segmenter_api  # noqa: PLC0415

    segmenter = segmenter_api.load(model.segmenter)
    if isinstance(segmenter, tuple):  # the older API returned (segmenter, config)
        segmenter = segmenter[0]
    clip = clip_api.load(model.clip, tokenizer=model.tokenizer or None)
    if clip.tokenizer is None:
        raise ConfigError(f"config.model.clip={model.clip!r} has no tokenizer of its own: set config.model.tokenizer")
    return segmenter, clip


def replicas(segmenter, clip, model, devices: Sequence[jax.Device]) -> list:
    """One `ensemble.Predictor` per local device, its weights on that device."""
    from flax import nnx  # noqa: PLC0415

    from ovseg_jax.clip import Clip  # noqa: PLC0415
    from ovseg_jax.inference.ensemble import Predictor  # noqa: PLC0415

    def on(module, device):
        graph, state = nnx.split(module)
        return nnx.merge(graph, jax.device_put(state, device))

    templates = model.templates if isinstance(model.templates, str) else list(model.templates)
    out = []
    for device in devices:
        seg, clp = (segmenter, clip) if len(devices) == 1 else (on(segmenter, device),
                                                                Clip(on(clip.model, device), clip.tokenizer))
        out.append(Predictor(seg, clp, mask_threshold=model.mask_threshold, mask_prompts=model.mask_prompts,
                             templates=templates))
    return out


class _Image(NamedTuple):
    """One item ready for the models."""
    item: int
    key: str
    path: str | None
    image: np.ndarray  # uint8 [H0, W0, 3] original
    resized: np.ndarray  # uint8 [h, w, 3]
    nouns: list[Noun]


def _run_batch(predictor, batch: list[_Image], bank: list[str], model):
    """Dispatch one batch (padded to `batch_size` with copies of its first image and to one bucket
    shape) -> device arrays (mask_probs `[B, Q, Hp, Wp]`, logits `[B, Q, V+1]`, valid `[B, Q]`,
    areas `[B, Q]`)."""
    hp = max(bucket_size(b.resized.shape[0], 32, model.bucket) for b in batch)
    wp = max(bucket_size(b.resized.shape[1], 32, model.bucket) for b in batch)
    images = np.zeros((model.batch_size, hp, wp, 3), np.uint8)
    sizes = np.zeros((model.batch_size, 2), np.int32)
    for i in range(model.batch_size):
        r = batch[min(i, len(batch) - 1)].resized
        images[i, :r.shape[0], :r.shape[1]] = r
        sizes[i] = r.shape[:2]
    proposals = predictor.proposals(images, bank, resized_hw=sizes)
    logits, valid = predictor.classify_crops(images, proposals.mask_probs, bank)
    areas = jnp.sum(proposals.mask_probs > model.mask_threshold, axis=(-2, -1))
    return proposals.mask_probs, logits, valid, areas


# ---------------------------------------------------------------------------------------------
# The miner


def _histogram_add(hist: list, value: float, lo: float, hi: float) -> None:
    b = int((value - lo) / (hi - lo) * len(hist))
    hist[min(max(b, 0), len(hist) - 1)] += 1


class Miner:
    """Mines one shard of caption items (and ground-truth items) into the workdir."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | Path, *, models=None,
                 devices: Sequence[jax.Device] | None = None):
        self.config = check_config(config)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._check_same_config()
        self.index, self.count = _shard(config)
        self.extractor = make_extractor(config.nouns.extractor, config.nouns.vocabulary)
        self._models, self._devices = models, devices
        self.score_range = (0.0, 1.0) if config.score == "softmax" else (-1.0, 1.0)

    def _check_same_config(self) -> None:
        saved = self.workdir / "mine_config.json"
        current = json.loads(self.config.to_json())
        current.pop("shard", None)
        if saved.is_file():
            diff = configs.config_diff(json.loads(saved.read_text()), current)
            if diff:
                raise ConfigError(f"{self.workdir} was mined with another config ({diff}); use a new workdir")
        else:
            _atomic_write(saved, json.dumps(current, indent=1))

    # -- captions ------------------------------------------------------------------------------

    def _nouns(self, captions: list[str], progress: Progress) -> list[Noun]:
        chosen = captions[:1] if self.config.data.captions == "one" else captions
        found: dict[str, Noun] = {}
        for caption in chosen:
            nouns = self.extractor(caption)
            if not nouns:
                progress.count("captions_without_nouns")
            for n in nouns:
                found.setdefault(n.text, n)
        return list(found.values())

    def _items(self, reader, start: int) -> range:
        total = len(reader) if not self.config.data.max_images else min(len(reader), self.config.data.max_images)
        first = start if start % self.count == self.index else start + (self.index - start) % self.count
        return range(first, total, self.count)

    def _bank(self, reader) -> list[str]:
        """The text bank: the vocabulary's terms, or (other extractors) every noun of this shard's
        captions (read once)."""
        vocabulary = getattr(self.extractor, "vocabulary", None)
        if vocabulary is not None:
            return list(vocabulary)
        nouns: dict[str, None] = {}
        for i in self._items(reader, 0):
            try:
                captions = reader.captions(i)[2]
            except (BadExampleError, OSError, ValueError):
                continue
            chosen = captions[:1] if self.config.data.captions == "one" else captions
            nouns.update((n.text, None) for c in chosen for n in self.extractor(c))
        return sorted(nouns) or ["object"]

    def _prepare(self, reader, i: int, progress: Progress) -> _Image | None:
        """Read item i -> `_Image`, or None (skipped and counted: no nouns, unreadable)."""
        model = self.config.model
        try:
            key, path, captions = reader.captions(i)
        except (BadExampleError, OSError, ValueError) as e:
            progress.count("skipped_unreadable")
            log.warning("item %d skipped: %s", i, e)
            return None
        nouns = self._nouns(captions, progress)
        for n in nouns:
            progress.mentions[n.text] = progress.mentions.get(n.text, 0) + 1
        if not nouns:
            progress.count("skipped_no_nouns")
            return None
        try:
            image = reader.image(i)
        except (BadExampleError, OSError, ValueError) as e:
            progress.count("skipped_unreadable")
            log.warning("item %d (%s) skipped: %s", i, key, e)
            return None
        resized = resize_image(image, resized_hw(*image.shape[:2], model.short, model.max_size))
        return _Image(i, key, path, image, resized, nouns)

    def _image_path(self, img: _Image) -> str:
        if img.path is not None:
            return img.path
        path = self.workdir / img.key  # images/<filename> of a TFDS record
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.image).save(path, quality=95)
        return str(path)

    def _finish_image(self, writer: _ShardWriter, img: _Image, bank_index: dict, outputs, b: int) -> None:
        """Choose and write one image's pairs from the batch outputs at row b."""
        mask_probs, logits, valid, areas = outputs
        progress, config = writer.progress, self.config
        h, w = img.resized.shape[:2]
        ok = np.asarray(valid[b]) & (np.asarray(areas[b]) >= config.min_area * h * w)
        columns = [bank_index[n.text] for n in img.nouns]
        picks, best = select_pairs(np.asarray(logits[b])[:, columns], ok, score=config.score,
                                   min_score=config.min_score)
        if not ok.any():
            progress.count("skipped_no_valid_proposals")
            return
        for n, noun in enumerate(img.nouns):
            kept = any(p.noun == n for p in picks)
            _histogram_add(progress.hist_kept if kept else progress.hist_rejected, best[n], *self.score_range)
            if not kept:
                progress.below[noun.text] = progress.below.get(noun.text, 0) + 1
                progress.count("nouns_below_threshold")
        if not picks:
            progress.count("images_without_pairs")
            return
        probs = np.asarray(mask_probs[b, np.array([p.proposal for p in picks]), :h, :w])
        image_path = None
        for j, (pick, prob) in enumerate(zip(picks, probs)):
            mask = full_size_mask(prob, img.image.shape[:2], config.model.mask_threshold)
            if not mask.any():
                progress.count("masks_empty_at_full_size")
                continue
            image_path = image_path or self._image_path(img)
            writer.add(img.item, img.key, image_path, j, mask, img.nouns[pick.noun], "caption", pick.score)
            progress.count("pairs")
        progress.count("images_with_pairs")

    def _batches(self, reader, progress: Progress) -> Iterator[tuple[list[_Image], int]]:
        """Batches of prepared images, each with the item index to resume from after it."""
        batch: list[_Image] = []
        items = self._items(reader, progress.next)
        for i in items:
            progress.count("items")
            img = self._prepare(reader, i, progress)
            if img is not None:
                batch.append(img)
            if len(batch) == self.config.model.batch_size:
                yield batch, i + 1
                batch = []
        if batch:
            yield batch, items.stop

    def mine_captions(self) -> Progress:
        """Mine this shard's caption items -> its final progress."""
        reader = make_reader(self.config.data)
        writer = _ShardWriter(self.workdir, "caption", self.index, self.count, self.config, self.config.histogram_bins)
        if writer.progress.done:
            writer.close()
            return writer.progress
        segmenter, clip = self._models or load_models(self.config.model)
        devices = self._devices or jax.local_devices()
        predictors = replicas(segmenter, clip, self.config.model, devices)
        bank = self._bank(reader)
        bank_index = {n: k for k, n in enumerate(bank)}
        total = len(self._items(reader, writer.progress.next))
        bar = progress_bar(total, f"mining shard {self.index}/{self.count}")
        try:
            pending = []
            for batch, next_item in self._batches(reader, writer.progress):
                pending.append(batch)
                if len(pending) == len(predictors):  # one batch per device in flight, then collect
                    self._collect(pending, predictors, bank, bank_index, writer, bar, next_item)
                    pending = []
            if pending:
                self._collect(pending, predictors, bank, bank_index, writer, bar, next_item)
            bar.update(total - bar.n)  # the items skipped before the device (no nouns, unreadable)
            writer.progress.done = True
            writer.commit(len(reader))
        finally:
            writer.close()
            bar.close()
        return writer.progress

    def _collect(self, pending, predictors, bank, bank_index, writer, bar, next_item: int) -> None:
        """Run one batch per device (dispatched before any result is read), write the pairs in item
        order, then commit the group (its counters were taken while preparing it)."""
        outputs = [_run_batch(p, batch, bank, self.config.model) for p, batch in zip(predictors, pending)]
        for batch, out in zip(pending, outputs):
            for b, img in enumerate(batch):
                self._finish_image(writer, img, bank_index, out, b)
                bar.update(1)  # (tests stop the run here to simulate a kill)
        writer.commit(next_item)

    # -- ground truth --------------------------------------------------------------------------

    def mine_ground_truth(self) -> Progress:
        """Pairs from a segmentation dataset's labels: each class with >= `gt.min_pixels` pixels."""
        from ovseg_jax.data import registry  # noqa: PLC0415

        g = self.config.gt
        spec = registry.get(g.dataset)
        source = spec.make_source(g.root, g.split)
        self._gt_root = g.root or (spec.name if spec.name not in registry.names() else "")  # a folder: itself
        names = list(source.class_names)
        writer = _ShardWriter(self.workdir, "gt", self.index, self.count, self.config, self.config.histogram_bins)
        try:
            for i in range(writer.progress.next, len(source)):
                if i % self.count == self.index:
                    self._gt_item(writer, source, i, names, spec.ignore_value)
                    writer.commit(i + 1)
            writer.progress.done = True
            writer.commit(len(source))
        finally:
            writer.close()
        return writer.progress

    def _gt_item(self, writer: _ShardWriter, source, i: int, names: list[str], ignore: int) -> None:
        progress = writer.progress
        progress.count("items")
        try:
            example = source[i]
        except (BadExampleError, OSError, ValueError) as e:
            progress.count("skipped_unreadable")
            log.warning("ground-truth item %d skipped: %s", i, e)
            return
        paths = getattr(source, "image_paths", None)
        key = os.path.relpath(paths[i], self._gt_root) if paths else f"images/gt_{i:07d}.jpg"
        img = _Image(i, key, paths[i] if paths else None, example["image"], example["image"], [])
        ids, pixels = np.unique(example["label"], return_counts=True)
        for j, (cid, n) in enumerate(zip(ids.tolist(), pixels.tolist())):
            if cid != ignore and n >= self.config.gt.min_pixels:
                writer.add(i, key, self._image_path(img), j, example["label"] == cid, Noun(names[cid], names[cid]),
                           "gt", None)
                progress.count("pairs")

    # -- all of it -----------------------------------------------------------------------------

    def run(self) -> dict | None:
        """Mine this shard; merge when every shard is done -> the report (None if others still run)."""
        if self.config.sources in ("captions", "both"):
            self.mine_captions()
        if self.config.sources in ("gt", "both"):
            self.mine_ground_truth()
        if jax.process_count() > 1 and self.config.shard.count <= 0:
            from jax.experimental import multihost_utils  # noqa: PLC0415

            multihost_utils.sync_global_devices("ovseg_jax.mine_pairs: shards done")
            return self.merge() if jax.process_index() == 0 else None
        return self.merge() if self._all_done() else None

    def _streams(self) -> list[str]:
        return {"captions": ["caption"], "gt": ["gt"], "both": ["caption", "gt"]}[self.config.sources]

    def _progress_files(self, stream: str) -> list[Path]:
        return [self.workdir / "shards" / f"progress-{stream}-{i:05d}-of-{self.count:05d}.json"
                for i in range(self.count)]

    def _all_done(self) -> bool:
        return all(p.is_file() and json.loads(p.read_text())["done"]
                   for s in self._streams() for p in self._progress_files(s))

    def merge(self) -> dict:
        """Shard files -> `pairs.jsonl` (+ `crops.csv`), `nouns.json`, `scores.png`, `report.json`."""
        bins = self.config.histogram_bins
        lines, total = [], Progress(hist_kept=[0] * bins, hist_rejected=[0] * bins)
        for stream in self._streams():
            for p in self._progress_files(stream):
                progress = Progress(**json.loads(p.read_text()))
                stream_counts = {f"{stream}_{k}" if k == "items" else k: v for k, v in progress.counts.items()}
                for k, v in stream_counts.items():
                    total.count(k, v)
                for field in ("mentions", "below"):
                    for noun, v in getattr(progress, field).items():
                        getattr(total, field)[noun] = getattr(total, field).get(noun, 0) + v
                total.hist_kept = [a + b for a, b in zip(total.hist_kept, progress.hist_kept)]
                total.hist_rejected = [a + b for a, b in zip(total.hist_rejected, progress.hist_rejected)]
                tag = p.name[len("progress-"):-len(".json")]
                pairs_file = p.with_name(f"pairs-{tag}.jsonl")
                text = pairs_file.read_bytes()[:progress.offset].decode() if pairs_file.is_file() else ""
                lines += [(stream != "caption", json.loads(ln)["item"], k, ln) for k, ln in enumerate(text.splitlines())]
        lines.sort()
        pairs_path = self.workdir / "pairs.jsonl"
        _atomic_write(pairs_path, "".join(ln + "\n" for *_, ln in lines))
        rows = [json.loads(ln) for *_, ln in lines]
        if self.config.write_crops:  # the released CSV layout (reference 4.1), titles = the nouns
            _atomic_write(self.workdir / "crops.csv",
                          "filepath\ttitle\n" + "".join(f"{r['crop']}\t{r['noun']}\n" for r in rows))
        nouns = self._noun_stats(rows, total)
        _atomic_write(self.workdir / "nouns.json", json.dumps(nouns, indent=1))
        draw_histogram(total.hist_kept, total.hist_rejected, self.score_range, self.config.min_score,
                       self.workdir / "scores.png", title=f"best {self.config.score} score per mentioned noun")
        report = {"items": {s: total.counts.get(f"{s}_items", 0) for s in self._streams()},
                  "images_with_pairs": total.counts.get("images_with_pairs", 0),
                  "pairs": len(rows), "caption_pairs": sum(r["source"] == "caption" for r in rows),
                  "gt_pairs": sum(r["source"] == "gt" for r in rows), "unique_nouns": len({r["noun"] for r in rows}),
                  "skipped": {k: total.counts.get(k, 0) for k in ("skipped_no_nouns", "skipped_no_valid_proposals",
                                                                 "skipped_unreadable")},
                  "captions_without_nouns": total.counts.get("captions_without_nouns", 0),
                  "nouns_below_threshold": total.counts.get("nouns_below_threshold", 0),
                  "images_without_pairs": total.counts.get("images_without_pairs", 0),
                  "masks_empty_at_full_size": total.counts.get("masks_empty_at_full_size", 0),
                  "shards": self.count}
        agreement = agreement_for(self.config.agreement, pairs_path)
        if agreement is not None:
            report["agreement"] = {k: agreement[k] for k in ("pairs", "agree", "fraction")}
            report["agreement_per_noun"] = agreement["per_noun"]
        _atomic_write(self.workdir / "report.json", json.dumps(report, indent=1))
        return report

    @staticmethod
    def _noun_stats(rows: list[dict], total: Progress) -> dict:
        stats: dict[str, dict] = {}
        for r in rows:
            s = stats.setdefault(r["noun"], {"class": r["class"], "pairs": 0, "score_sum": 0.0})
            s["pairs"] += 1
            s["score_sum"] += r["score"] or 0.0
        for noun, n in total.mentions.items():
            stats.setdefault(noun, {"class": None, "pairs": 0, "score_sum": 0.0})["mentions"] = n
        for noun, s in stats.items():
            s["mean_score"] = round(s.pop("score_sum") / s["pairs"], 4) if s["pairs"] else None
            s["below_threshold"] = total.below.get(noun, 0)
            s.setdefault("mentions", 0)
        return dict(sorted(stats.items(), key=lambda kv: (-kv[1]["pairs"], kv[0])))


def draw_histogram(kept: Sequence[int], rejected: Sequence[int], score_range: tuple[float, float],
                   threshold: float, path: str | Path, *, title: str = "") -> Path:
    """Histogram of scores over `score_range` (one bin per count), rejected grey with kept green
    stacked on top, the threshold a red line -> the PNG at `path` (the same chart as SVG beside it)."""
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415

    from ovseg_jax.utils import charts  # noqa: PLC0415

    edges = np.linspace(*score_range, len(kept) + 1)
    with charts.figure(6.4, 3.6) as fig:
        ax = fig.subplots()
        ax.stairs(np.add(kept, rejected), edges, baseline=rejected, fill=True, color="#3ca050", label="kept")
        ax.stairs(rejected, edges, fill=True, color="#a0a0a0", label="rejected")
        ax.axvline(threshold, color="#dc2828", linewidth=2, label=f"threshold {threshold:g}")
        ax.set(xlim=score_range, xlabel="score", ylabel="nouns")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title, loc="left")
        ax.legend()
        png, _ = charts.save(fig, path)
    return png


def run(config: ml_collections.ConfigDict, workdir: str | Path, **kwargs) -> dict | None:
    """Mine this process's shard into `workdir`; -> the merged report when all shards are done."""
    return Miner(config, workdir, **kwargs).run()


def format_report(report: dict) -> str:
    lines = [f"items: {report['items']}; images with pairs: {report['images_with_pairs']}",
             f"pairs: {report['pairs']} (caption {report['caption_pairs']}, gt {report['gt_pairs']}); "
             f"unique nouns: {report['unique_nouns']}",
             "skipped: " + ", ".join(f"{k.removeprefix('skipped_').replace('_', ' ')} {v}"
                                     for k, v in report["skipped"].items()),
             f"captions without nouns: {report['captions_without_nouns']}; nouns below the score threshold: "
             f"{report['nouns_below_threshold']}; images without pairs: {report['images_without_pairs']}"]
    if "agreement" in report:
        a = report["agreement"]
        lines.append(f"label agreement (noun = majority ground-truth class under the mask): "
                     f"{a['agree']}/{a['pairs']} = {100 * a['fraction']:.1f}%")
    return "\n".join(lines)
