"""What every command shares: one-line errors instead of tracebacks, and its logging set-up."""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Iterator

from ovseg_jax.convert.torch_io import CheckpointError


@contextlib.contextmanager
def exit_on_error() -> Iterator[None]:
    """For command-line entry points: a CheckpointError / ValueError / OSError (FileNotFoundError,
    PermissionError, ...) becomes `error: <message>` on stderr and exit status 2 (no traceback)."""
    try:
        yield
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def cli_logging() -> None:
    """Log this package's INFO lines to stderr, and only orbax's (absl's) errors."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s:%(name)s: %(message)s")
    for name in ("ovseg_jax", "__main__"):
        logging.getLogger(name).setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.ERROR)
