"""One progress reporter for the loops that take minutes (predict, evaluate, mine_pairs): tqdm.

On a terminal it is tqdm's bar (count, rate, elapsed and ETA, redrawn in place). Anywhere else (a
CI log, a pipe, a file) it prints a whole line at the start, at each tenth of the total and at the
end, so a log holds about a dozen lines per loop and no carriage returns:

    evaluating:  30% 12/40 [00:04<00:09,  3.21image/s]

Training loops report through clu's `ReportProgress` instead (`ovseg_jax.training.trainer`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TextIO

from tqdm import tqdm

LINE = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]"  # tqdm's, less the bar
LINE_NO_TOTAL = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}]"


def progress(iterable_or_total: Iterable | int | None, desc: str, unit: str = "image", *,
             disable: bool = False, stream: TextIO | None = None) -> tqdm:
    """A progress reporter on `stream` (default: stderr) -> a tqdm object: iterate it when given an
    iterable, else call `update(n)`; `close()` it or use it as a context manager.

    `disable` (the commands' `--no-progress`) writes nothing."""
    stream = stream or sys.stderr
    iterable, total = ((None, iterable_or_total) if iterable_or_total is None or isinstance(iterable_or_total, int)
                       else (iterable_or_total, None))
    if disable or _is_terminal(stream):
        return tqdm(iterable, total=total, desc=desc, unit=unit, file=stream, disable=disable, dynamic_ncols=True)
    return _Lines(iterable, total=total, desc=desc, unit=unit, file=stream)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


class _Lines(tqdm):
    """tqdm for logs: a whole line when the count reaches a new tenth of the total, and at the end
    (with an unknown total: at the start and the end only)."""

    def __init__(self, *args, **kwargs):
        self._printed_n, self._printed_tenth = None, -1
        # every update reaches display(), which filters; the rate is the average so far (smoothing 0);
        # leave=False makes close() call display(msg="")
        super().__init__(*args, mininterval=0, miniters=1, smoothing=0, leave=False, **kwargs)

    def display(self, msg=None, pos=None) -> bool:
        closing = msg == ""  # tqdm.close clears a leave=False bar with an empty message
        tenth = 10 * self.n // self.total if self.total else None
        if closing and self.n == self._printed_n or not closing and tenth == self._printed_tenth:
            return False
        self._printed_n, self._printed_tenth = self.n, tenth
        self.bar_format = LINE if self.total else LINE_NO_TOTAL  # (tqdm's __init__ displays before it returns)
        self.fp.write(f"{self}\n")
        self.fp.flush()
        return False  # nothing on the line for close() to clear
