"""The one progress reporter (tqdm: a bar on a terminal, a line per tenth in logs, silent when
disabled) and the one chart helper (matplotlib on its own Agg canvas, PNG + SVG)."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import textwrap

import numpy as np
from PIL import Image

from ovseg_jax.evaluation.report import draw_iou_chart
from ovseg_jax.utils.progress import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_a_whole_line_at_each_tenth():
    log = io.StringIO()
    with progress(100, "evaluating", stream=log) as bar:
        for _ in range(100):
            bar.update(1)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 11  # 0%, 10%, ..., 100%
    assert [line.split()[2] for line in lines] == [f"{n}/100" for n in range(0, 101, 10)]
    assert all(line.startswith("evaluating: ") and "image/s]" in line for line in lines)
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d, ", lines[5])  # elapsed < ETA


def test_off_a_terminal_iterates_and_a_stop_prints_where_it_stopped():
    assert list(progress(range(5), "mining", stream=io.StringIO())) == list(range(5))
    log = io.StringIO()
    bar = progress(40, "mining", stream=log)
    bar.update(13)  # 32%: the 30% step's line
    bar.update(1)  # 35%: no new step, no line
    bar.close()  # the count it stopped at
    assert [line.split()[2] for line in log.getvalue().splitlines()] == ["0/40", "13/40", "14/40"]


def test_on_a_terminal_a_bar_redrawn_in_place():
    screen = Terminal()
    with progress(4, "predicting", stream=screen) as bar:
        bar.update(4)
    assert screen.getvalue().startswith("\rpredicting:   0%|") and "| 4/4 [" in screen.getvalue()
    assert screen.getvalue().count("\n") == 1  # only the finished bar's line end


def test_disabled_writes_nothing():
    for stream in (io.StringIO(), Terminal()):
        with progress(10, "evaluating", disable=True, stream=stream) as bar:
            bar.update(10)
        assert stream.getvalue() == ""


def _texts(svg: str) -> list[tuple[float, str]]:
    """(y, text) of the SVG's text elements (the charts keep text as text)."""
    return [(float(y), text) for y, text in re.findall(r'<text[^>]*? y="([-\d.]+)"[^>]*>([^<]*)</text>', svg)]


def test_iou_chart_orders_classes_and_states_group_means(tmp_path):
    iou = {"sky": 90.0, "dog": None, "grass": 50.0, "cat": 20.0, "tree": float("nan"), "road": 65.5}
    png = draw_iou_chart(iou, unseen=["cat", "dog", "road"], path=tmp_path / "iou.png", title="val")
    svg = (tmp_path / "iou.svg").read_text()
    rows = sorted((y, t) for y, t in _texts(svg) if t in iou)
    assert [t for _, t in rows] == ["sky", "road", "grass", "cat", "dog", "tree"]  # best first, no ground truth last
    labels = {t for _, t in _texts(svg)}
    assert {f"seen (mean IoU {np.mean([90.0, 50.0]):.1f})", f"unseen (mean IoU {np.mean([20.0, 65.5]):.1f})",
            "65.5", "no ground truth"} <= labels
    with Image.open(png) as picture:
        assert picture.format == "PNG" and picture.height > 6 * 16


def test_charts_leave_pyplot_and_the_global_style_alone(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        import matplotlib

        def style():  # ("backend" left out: reading it would resolve it through pyplot)
            return {{k: matplotlib.rcParams[k] for k in matplotlib.rcParams if k != "backend"}}

        before = style()
        from ovseg_jax.utils import charts
        with charts.figure(3, 2) as fig:
            fig.subplots().plot([0, 1], [1, 0])
            png, svg = charts.save(fig, {str(tmp_path / "line.png")!r})
        assert "matplotlib.pyplot" not in sys.modules
        assert style() == before
        print(png, svg)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert run.stdout.split() == [str(tmp_path / "line.png"), str(tmp_path / "line.svg")]
    with Image.open(tmp_path / "line.png") as picture:
        assert picture.size == (300, 200)
    assert (tmp_path / "line.svg").read_text().lstrip().startswith("<?xml")
