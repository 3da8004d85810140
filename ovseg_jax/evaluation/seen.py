"""Seen and unseen classes of a benchmark (appendix H, Figure 2).

The synthetic world lists its unseen classes; for the benchmarks, a class is *seen* when one of its
names matches a COCO-Stuff-171 training class (`coco_seen`): names are compared lower-case with
everything but letters removed, each of a class's comma-separated synonyms on its own ("sidewalk,
pavement" matches "pavement"), a COCO-Stuff name also by its head before "-" ("wall-brick" ->
"wall", "sky-other" -> "sky"), plus the spelling variants in `COCO_ALIASES` ("aeroplane" =
"airplane", "sofa" = "couch", ...).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

from ovseg_jax.data import custom, registry

# Spelling variants between COCO-Stuff's names and the benchmarks' (normalised: letters only).
COCO_ALIASES = {"airplane": ("aeroplane", "plane"), "motorcycle": ("motorbike",), "tv": ("tvmonitor", "television"),
                "couch": ("sofa",), "shelf": ("shelves",)}


def _letters(name: str) -> str:
    return re.sub(r"[^a-z]", "", name.lower())


def coco_seen(class_names: Sequence[str], coco_names: Sequence[str]) -> list[bool]:
    """For each evaluation class: does one of its comma-separated synonyms match a COCO-Stuff class
    (full name, head before "-", or a `COCO_ALIASES` variant; compared as lower-case letters)?"""
    keys = set()
    for name in coco_names:
        for form in (name, name.split("-")[0]):
            keys.add(_letters(form))
            keys.update(COCO_ALIASES.get(form, ()))
    return [any(_letters(part) in keys for part in name.split(",") if part.strip()) for name in class_names]


def seen_rule(dataset: str) -> str:
    """Where `unseen_classes` takes a dataset's unseen classes from (for reports)."""
    if dataset == "synthetic":
        return "synthetic world classes.json"
    if dataset not in registry.names() and custom.is_path(dataset) and custom.open_dataset(dataset).seen is not None:
        return f"{Path(dataset) / 'dataset.json'} seen list"
    return "COCO-Stuff-171 name match (ovseg_jax.evaluation.seen.coco_seen)"


def unseen_classes(dataset: str, class_names: Sequence[str], root: str | Path | None) -> list[str]:
    """The unseen classes of a registry dataset: the synthetic world's `classes.json` "unseen" list;
    for a dataset folder, the classes its `dataset.json` does not list as `seen`; else the classes
    `coco_seen` finds no COCO-Stuff match for (none for COCO-Stuff itself)."""
    if dataset not in registry.names() and custom.is_path(dataset):
        unseen = custom.open_dataset(dataset).unseen(class_names)
        if unseen is not None:
            return unseen
    if dataset == "synthetic":
        path = Path(root) / "classes.json"
        try:
            return list(json.loads(path.read_text())["unseen"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: cannot read the world's 'unseen' list ({type(e).__name__}: {e})") from None
    if dataset == "coco_stuff_171":
        return []
    seen = coco_seen(class_names, registry.class_names("coco_stuff_171"))
    return [n for n, s in zip(class_names, seen) if not s]
