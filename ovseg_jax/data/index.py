"""A dataset's file index, built once and cached beside the data: listing 100k files (or parsing a
COCO JSON) happens once, not at every start, epoch or grain worker.

    files = index.cached(root, "folder/val", build)   # build() -> (data, watched paths)

The cache is `ROOT/.ovseg_index.json`, one entry per key, each with the JSON-able `data` that
`build()` returned and the stamp (`mtime_ns`, size) of every path `build()` watched: the folders
it listed and the metadata files it read. Adding, removing or renaming a file changes its folder's
mtime, so a stamp that differs in any path means the entry is stale and is rebuilt; checking costs
one `stat` per watched folder, not one per file. (A file rewritten in place under the same name
keeps the index valid: the index holds names, and each file is read afresh when used.) Where ROOT
is not writable the cache goes to `$XDG_CACHE_HOME/ovseg_jax/index/<hash of ROOT>.json` (default
`~/.cache`). Writes are atomic (a temporary file renamed), so concurrent processes at worst
rebuild the same entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

log = logging.getLogger("ovseg_jax.data")

INDEX_FILE = ".ovseg_index.json"
VERSION = 1


def stamp(root: Path, paths: Iterable[str]) -> dict[str, list[int]]:
    """`{path relative to root: [mtime_ns, size]}` of each path (`[-1, -1]` for a missing one)."""
    out = {}
    for rel in paths:
        try:
            st = os.stat(root / rel)
            out[rel] = [st.st_mtime_ns, st.st_size]
        except OSError:
            out[rel] = [-1, -1]
    return out


def home_cache(root: Path) -> Path:
    """The fallback index file of a dataset folder that cannot be written."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:20]
    return base / "ovseg_jax" / "index" / f"{digest}.json"


def _candidates(root: Path) -> list[Path]:
    return [root / INDEX_FILE, home_cache(root)]


def _read(path: Path) -> dict:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(content, dict) or content.get("version") != VERSION:
        return {}
    return content.get("entries", {})


def _write(path: Path, entries: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ovseg_index.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"version": VERSION, "entries": entries}, f, separators=(",", ":"))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def lookup(root: Path, key: str) -> Any | None:
    """The cached data of `key` if its stamp still matches the files, else None."""
    for path in _candidates(root):
        entry = _read(path).get(key)
        if entry and stamp(root, entry["stamp"]) == entry["stamp"]:
            return entry["data"]
    return None


def store(root: Path, key: str, data: Any, watched: Iterable[str]) -> Path | None:
    """Save `data` under `key` with the stamp of `watched` -> the index file (None: nowhere writable)."""
    entry = {"stamp": stamp(root, sorted(set(watched))), "data": data}
    for path in _candidates(root):
        try:
            entries = _read(path)
            entries[key] = entry
            _write(path, entries)
            return path
        except OSError as e:
            log.info("index not written to %s (%s); trying the next place", path, e)
    log.warning("%s: the file index could not be cached (data folder and %s not writable)", root,
                home_cache(root).parent)
    return None


def cached(root: str | Path, key: str, build: Callable[[], tuple[Any, Iterable[str]]], *,
           refresh: bool = False) -> Any:
    """`key`'s data from the cache, or `build()` -> `(data, watched paths relative to root)` run
    and cached. `refresh` rebuilds whatever the cache holds."""
    root = Path(root)
    if not refresh:
        data = lookup(root, key)
        if data is not None:
            return data
    start = time.perf_counter()
    data, watched = build()
    where = store(root, key, data, watched)
    log.info("%s: indexed %s in %.2f s (cached in %s)", root, key, time.perf_counter() - start, where)
    return data
