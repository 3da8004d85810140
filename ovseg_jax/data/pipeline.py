"""grain input pipelines: `source -> shuffle -> repeat -> transform -> this process's slice ->
batch -> worker prefetch`, yielding numpy dict batches of this process's share of the global batch.

Every loader returns a `grain.IterDataset`; `iter(loader)` is a checkpointable iterator
(`get_state()` / `set_state()`, also usable with `grain.checkpoint.CheckpointSave`) that counts
skipped bad examples in `.num_skipped`. Randomness is per (seed, global example position), and
process p of P takes global positions p, p+P, ...: the global stream is the same for any number
of processes and workers (with `skip_bad_examples=True` batches are formed after dropping bad
examples, so their composition then depends on the skips and the worker count). Turn the per-process batches into
global arrays with `ovseg_jax.training.trainer.to_global(batch, sharding)`.

    from ovseg_jax.data import pipeline, registry
    loader = pipeline.segmentation_loader(registry.get("coco_stuff_171").make_source(root, "train"),
                                          batch_size=32, crop_size=640, max_masks=32, num_workers=8)
    for batch in loader: ...   # {"image", "label", "masks", "classes", "valid"}
"""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import grain
import numpy as np

from ovseg_jax.data import crops, transforms
from ovseg_jax.data.sources import BadExampleError, DatasetLayoutError, read_image
from ovseg_jax.text import Tokenizer

log = logging.getLogger("ovseg_jax.data")

_BAD = "_bad_example"
_SKIPPED = "_skipped"


def _produce(read: Callable[[int], Any], transform: Callable[[Any, np.random.Generator], dict], seed: int,
             skip_bad: bool, position: int, index: int) -> dict:
    """Read record `index` and transform it with a generator seeded by (seed, position)."""
    try:
        return transform(read(index), np.random.default_rng([seed, position]))
    except BadExampleError as e:
        if not skip_bad:
            raise
        return {_BAD: str(e)}


class _DropBadIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, flush: bool):
        super().__init__(parent)
        self._pending = 0
        self._flush = flush

    def __next__(self) -> dict:
        while True:
            try:
                element = next(self._parent)
            except StopIteration:
                if not (self._flush and self._pending):
                    raise
                count, self._pending = self._pending, 0
                return {_SKIPPED: np.int32(count)}  # skips after the last good element
            if _BAD in element:
                log.warning("skipped bad example: %s", element[_BAD])
                self._pending += 1
                continue
            element[_SKIPPED] = np.int32(self._pending)
            self._pending = 0
            return element

    def get_state(self) -> dict:
        return {"parent": self._parent.get_state(), "pending": self._pending}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._pending = state["pending"]


class _DropBad(grain.IterDataset):
    """Drops bad-example markers; the next good element carries how many were dropped before it
    (`flush`: an unbatched stream ends with a count-only element for trailing skips)."""

    def __init__(self, parent: grain.IterDataset, flush: bool = False):
        super().__init__(parent)
        self._flush = flush

    def __iter__(self) -> _DropBadIterator:
        return _DropBadIterator(self._parent.__iter__(), self._flush)


class _CountSkipsIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)
        self.num_skipped = 0

    def __next__(self) -> dict:
        while True:
            batch = next(self._parent)
            skipped = int(np.sum(batch.pop(_SKIPPED, 0)))
            if skipped:
                self.num_skipped += skipped
                log.warning("%d bad examples skipped so far", self.num_skipped)
            if batch:  # (a count-only element carries no data)
                return batch

    def get_state(self) -> dict:
        return {"parent": self._parent.get_state(), "num_skipped": self.num_skipped}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self.num_skipped = state["num_skipped"]


class _CountSkips(grain.IterDataset):
    """Sums the per-element skip counts into the iterator's `num_skipped` (kept in its state)."""

    def __iter__(self) -> _CountSkipsIterator:
        return _CountSkipsIterator(self._parent.__iter__())


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # noqa: PLC0415  (only to ask which host this is)

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
    return process_index, process_count


# Read threads per process and their buffers (in elements: batches, or examples when bad ones are
# skipped). grain's default (16 threads, 500 elements) ran 16 transforms at once in every worker
# and buffered up to 500 batches; this bounds the memory to a few batches per process.
IN_PROCESS_THREADS = 2  # num_workers=0: PIL and numpy release the GIL for most of the transform
WORKER_THREADS = 1  # num_workers>0: each worker process transforms on one thread while it sends
WORKER_BUFFER = 2  # batches each worker holds ready


def _read_options(num_workers: int) -> grain.ReadOptions:
    threads = WORKER_THREADS if num_workers > 0 else IN_PROCESS_THREADS
    return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)


def _build(num_records: int, read: Callable[[int], Any], transform: Callable, *, batch_size: int | None,
           seed: int, shuffle: bool, num_epochs: int | None, num_workers: int, process_index: int | None,
           process_count: int | None, skip_bad_examples: bool, drop_remainder: bool = True,
           finish: Callable[[dict], dict] | None = None) -> grain.IterDataset:
    """The shared chain. `batch_size` is global (None: unbatched examples). `finish(batch)` runs in
    this process, on a background thread, after the worker processes: for outputs that are cheap to
    compute from what the workers send but costly to send."""
    index, count = _process(process_index, process_count)
    ds = grain.MapDataset.range(num_records)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    ds = ds.map_with_index(partial(_produce, read, transform, seed, skip_bad_examples))
    ds = ds[index::count]
    if batch_size is not None and batch_size % count:
        raise ValueError(f"global batch_size={batch_size} is not divisible by the {count} processes")
    read_options = _read_options(num_workers)
    if batch_size is not None and not skip_bad_examples:  # batches formed before the worker split
        it = ds.batch(batch_size // count, drop_remainder=drop_remainder).to_iter_dataset(read_options)
    else:  # the batch composition then depends on the skips (and on num_workers)
        it = _DropBad(ds.to_iter_dataset(read_options), flush=batch_size is None)
        if batch_size is not None:
            it = it.batch(batch_size // count, drop_remainder=drop_remainder)
    if num_workers > 0:
        from absl import flags  # noqa: PLC0415  (grain workers read absl flags)

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                         per_worker_buffer_size=WORKER_BUFFER))
    if finish is not None:
        it = grain.experimental.ThreadPrefetchIterDataset(it.map(finish), prefetch_buffer_size=2)
    if batch_size is None:
        it = it.map(_unbatched_skips)
    return _CountSkips(it)


def _unbatched_skips(element: dict) -> dict:
    element[_SKIPPED] = np.asarray(element[_SKIPPED])
    return element


def segmentation_loader(source, *, batch_size: int, crop_size: int = 640, max_masks: int = 32,
                        scales: Sequence[int] = transforms.TRAIN_SCALES, max_size: int = 2560,
                        photometric: bool = True, flip: bool = True, seed: int = 0, shuffle: bool = True,
                        num_epochs: int | None = None, num_workers: int = 0, process_index: int | None = None,
                        process_count: int | None = None, skip_bad_examples: bool = False) -> grain.IterDataset:
    """Segmenter training batches of `source` (e.g. `registry.get(name).make_source(root, "train")`):
    `{"image": uint8 [b,S,S,3], "label": int32 [b,S,S], "masks": uint8 [b,G,S,S],
    "classes": int32 [b,G], "valid": bool [b,G]}` with b = batch_size / process_count (global
    `batch_size`), S = crop_size, G = max_masks; reference 3.1 augmentation."""
    transform = partial(_train_example, crop_size=crop_size, scales=tuple(scales), max_size=max_size,
                        ignore_value=source.ignore_value, max_masks=max_masks, photometric=photometric, flip=flip)
    return _build(len(source), source.__getitem__, transform, batch_size=batch_size, seed=seed, shuffle=shuffle,
                  num_epochs=num_epochs, num_workers=num_workers, process_index=process_index,
                  process_count=process_count, skip_bad_examples=skip_bad_examples, finish=_with_masks)


def _train_example(example: dict, rng: np.random.Generator, **kwargs) -> dict:
    return transforms.train_transform(example, rng, masks=False, **kwargs)


def _with_masks(batch: dict) -> dict:
    """Adds "masks" uint8 [b,G,S,S] from the label and classes. The masks are 80% of a batch's
    bytes (32 x 640^2 per example): built here, after the workers, they are not copied through
    shared memory between processes."""
    batch["masks"] = transforms.masks_of(batch["label"], batch["classes"], batch["valid"])
    return batch


def eval_loader(source, *, short: int = 640, max_size: int = 2560, bucket: int = 128, num_workers: int = 0,
                process_index: int | None = None, process_count: int | None = None,
                skip_bad_examples: bool = True) -> grain.IterDataset:
    """One pass over `source` in order, this process's examples (i = p, p+P, ...), unbatched:
    `{"image": uint8 [H',W',3] padded to multiples of bucket, "label": int32 [H,W] original size,
    "orig_size": int32 [2], "resized_size": int32 [2], "index": int32 (source index)}`.

    Bad examples (`BadExampleError`: unreadable or missing files, size mismatch, bad label values)
    are skipped by default, each with a warning naming the file, and counted in the iterator's
    `num_skipped` (which `evaluation.evaluator.evaluate_dataset` reports); `skip_bad_examples=False` raises instead."""
    transform = partial(_eval_example, short=short, max_size=max_size, bucket=bucket)
    return _build(len(source), partial(_indexed, source), transform, batch_size=None, seed=0, shuffle=False,
                  num_epochs=1, num_workers=num_workers, process_index=process_index, process_count=process_count,
                  skip_bad_examples=skip_bad_examples)


def _indexed(source, index: int) -> tuple[int, dict]:
    return index, source[index]


def _eval_example(item: tuple[int, dict], rng: np.random.Generator, **kwargs) -> dict:
    del rng
    index, example = item
    return {**transforms.eval_transform(example, **kwargs), "index": np.int32(index)}


def _tokenized(tokenizer: Tokenizer, example: dict) -> dict:
    example["token_ids"] = tokenizer([example.pop("text")])[0]
    return example


def _pair_example(record: crops.PairRecord, rng: np.random.Generator, *, size: int, tokenizer: Tokenizer,
                  with_mask: bool) -> dict:
    example = crops.pair_example(record, rng, size)
    if not with_mask:
        del example["region_mask"]
    return _tokenized(tokenizer, example)


def clip_pairs_loader(path: str | Path, tokenizer: Tokenizer | str | Path, *, batch_size: int, image_size: int = 224,
                      region_mask: bool = True, seed: int = 0, shuffle: bool = True, num_epochs: int | None = None,
                      num_workers: int = 0, process_index: int | None = None, process_count: int | None = None,
                      skip_bad_examples: bool = False) -> grain.IterDataset:
    """CLIP adaptation batches from a released `.csv` or our `.jsonl` pairs file (reference 4.2-4.3):
    `{"image": float32 [b,S,S,3] CLIP-normalised, "region_mask": float32 [b,S,S] 0/1 (when
    `region_mask`), "token_ids": int32 [b,L]}`, texts tokenised as they are (no template)."""
    records = crops.read_pairs(path)
    transform = partial(_pair_example, size=image_size, tokenizer=Tokenizer.load(tokenizer), with_mask=region_mask)
    return _build(len(records), records.__getitem__, transform, batch_size=batch_size, seed=seed, shuffle=shuffle,
                  num_epochs=num_epochs, num_workers=num_workers, process_index=process_index,
                  process_count=process_count, skip_bad_examples=skip_bad_examples)


def read_captions(path: str | Path) -> list[tuple[str, str]]:
    """`captions.jsonl` lines `{"image": relative path, "caption": str}` (or a folder holding
    `captions.jsonl` beside its images) -> [(image path, caption)]."""
    path = captions_file(path)
    if not path.is_file():
        raise DatasetLayoutError(f"{path}: captions file not found; expected JSON lines "
                                 "{'image': path relative to the file, 'caption': text} "
                                 "(python -m ovseg_jax.data.synthetic writes one)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line_no = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}: not a text file ({e}, line {line_no}); expected JSON lines "
                         "{'image': path relative to the file, 'caption': text}") from None
    out = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
                out.append((str(path.parent / row["image"]), str(row["caption"])))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{line_no}: bad captions line ({e!r}); expected keys 'image', 'caption'") from e
    if not out:
        raise DatasetLayoutError(f"{path}: no captions in the file")
    return out


def captions_file(path: str | Path) -> Path:
    """A captions file, or a folder's `captions.jsonl`."""
    path = Path(path)
    return path / "captions.jsonl" if path.is_dir() else path


def _caption_example(item: tuple[str, str], rng: np.random.Generator, *, size: int, tokenizer: Tokenizer) -> dict:
    image, _ = crops.resized_crop(read_image(item[0]), None, rng, size)
    return _tokenized(tokenizer, {"image": image, "text": item[1]})


def caption_loader(path: str | Path, tokenizer: Tokenizer | str | Path, *, batch_size: int, image_size: int = 64,
                   seed: int = 0, shuffle: bool = True, num_epochs: int | None = None, num_workers: int = 0,
                   process_index: int | None = None, process_count: int | None = None,
                   skip_bad_examples: bool = False) -> grain.IterDataset:
    """Image-caption batches (the synthetic world's CLIP pretraining): `{"image": float32 [b,S,S,3]
    CLIP-normalised (RandomResizedCrop scale 0.9-1, bicubic), "token_ids": int32 [b,L]}`."""
    items = read_captions(path)
    transform = partial(_caption_example, size=image_size, tokenizer=Tokenizer.load(tokenizer))
    return _build(len(items), items.__getitem__, transform, batch_size=batch_size, seed=seed, shuffle=shuffle,
                  num_epochs=num_epochs, num_workers=num_workers, process_index=process_index,
                  process_count=process_count, skip_bad_examples=skip_bad_examples)
