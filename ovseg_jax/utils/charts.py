"""One chart helper: matplotlib figures on their own Agg canvas, saved as PNG and SVG side by side.

Figures are `matplotlib.figure.Figure` objects attached to a `FigureCanvasAgg`: no pyplot, no
global backend switch, nothing left open, so a chart can be drawn from any thread of a library
call. Image panels (an input beside its prediction) are composited with PIL instead
(`ovseg_jax.inference.visualize`); a chart is a plot.

    with charts.figure(6.4, 3.6) as fig:
        ax = fig.subplots()
        ax.bar(...)
        charts.save(fig, "scores.png")  # scores.png and scores.svg
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 100
STYLE = {  # sizes in points: 11 pt text is 15 px at DPI 100
    "font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "xtick.labelsize": 10, "ytick.labelsize": 10,
    "legend.fontsize": 10, "legend.frameon": False, "axes.spines.top": False, "axes.spines.right": False,
    "svg.fonttype": "none",  # SVG text stays text (searchable, small), rendered in the reader's sans-serif
    "svg.hashsalt": "ovseg_jax",  # the same chart gives the same SVG bytes
}


@contextlib.contextmanager
def figure(width: float, height: float) -> Iterator[Figure]:
    """A `width` x `height` inch figure (DPI px per inch) with the chart style in force while the
    block draws it (text takes its size when it is created)."""
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
        FigureCanvasAgg(fig)
        yield fig


def save(fig: Figure, path: str | Path) -> tuple[Path, Path]:
    """Write `fig` as `path` with the suffix .png and beside it .svg -> (png path, svg path)."""
    png = Path(path).with_suffix(".png")
    svg = png.with_suffix(".svg")
    with matplotlib.rc_context(STYLE):
        fig.savefig(png, dpi=DPI, facecolor="white")
        fig.savefig(svg, facecolor="white", metadata={"Date": None})
    return png, svg
