"""The shipped class lists, `<name>.txt` beside this file, one class name per line (copied from the
original's dataset registration code; see `ovseg_jax.data.registry`)."""

from __future__ import annotations

import importlib.resources


def class_names(name: str) -> tuple[str, ...]:
    """The shipped class list `classes/<name>.txt`, one name per line."""
    text = (importlib.resources.files(__name__) / f"{name}.txt").read_text()
    return tuple(line.strip() for line in text.splitlines() if line.strip())
