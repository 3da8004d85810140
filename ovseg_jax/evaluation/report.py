"""The evaluation report: `metrics.json` (JSON-safe), the printed table, the per-class IoU chart
(PNG + SVG)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

SEEN_COLOUR, UNSEEN_COLOUR, NO_GT_COLOUR = (52, 101, 164), (230, 126, 34), (170, 170, 170)


def finite(value):
    """JSON-safe: NaN -> None, numpy scalars -> floats, recursively."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _fmt(value) -> str:
    return "  -  " if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:5.1f}"


def format_table(report: dict) -> str:
    """The printed summary of a `metrics.json` report: header, metrics, per-class rows (up to 60
    classes), and the sweep grid with the best setting."""
    s = report["setting"]
    weight = {"segmenter": "segmenter only", "clip": "CLIP only (λ=0)"}.get(s["mode"]) or f"λ={s['ensemble_weight']:g}"
    tta = (f", TTA scales {','.join(f'{v:g}' for v in s['tta']['scales'])}" + (" + flip" if s["tta"]["flip"] else "")
           if s["tta"]["flip"] or s["tta"]["scales"] != [1.0] else "")
    lines = [f"{report['dataset']} ({report['split']}): {report['images']} images in {report['seconds']:.1f} s"
             + (f", {report['skipped']} bad skipped" if report["skipped"] else ""),
             f"{weight}, mask threshold {s['mask_threshold']:g}, {s['crop']} crops"
             + (f" (CLIP on the top {s['clip_top_k']} proposals)" if s.get("clip_top_k") else "")
             + f", mask prompts {'on' if s['mask_prompts'] else 'off'}, templates {s['templates']}, "
             f"test size {s['short']}/{s['max_size']}" + tta, ""]
    n_unseen = len(report["unseen"])
    n_seen = len(report["IoU"]) - n_unseen
    lines.append(f"{'mIoU':>6} {'fwIoU':>6} {'mACC':>6} {'pACC':>6}  {'seen (' + str(n_seen) + ')':>11} "
                 f"{'unseen (' + str(n_unseen) + ')':>12}")
    lines.append(f"{_fmt(report['mIoU']):>6} {_fmt(report['fwIoU']):>6} {_fmt(report['mACC']):>6} "
                 f"{_fmt(report['pACC']):>6}  {_fmt(report.get('mIoU_seen')):>11} {_fmt(report.get('mIoU_unseen')):>12}")
    if len(report["IoU"]) <= 60:
        width = max(len(n) for n in report["IoU"]) + 2
        lines += ["", f"{'class':<{width}} {'IoU':>5} {'ACC':>5}"]
        unseen = set(report["unseen"])
        lines += [f"{name:<{width}} {_fmt(iou)} {_fmt(report['ACC'][name])}" + ("  unseen" if name in unseen else "")
                  for name, iou in report["IoU"].items()]
    sweep = report.get("sweep")
    if sweep:
        cells = {(c["mask_threshold"], c["ensemble_weight"]): c["mIoU"] for c in sweep["cells"]}
        weights = sweep["lambda"]
        lines += ["", "mIoU over the sweep (rows: mask threshold, columns: λ)",
                  "threshold " + " ".join(f"{w:>5g}" for w in weights)]
        for t in sweep["threshold"]:
            lines.append(f"{t:<9g} " + " ".join(_fmt(cells.get((t, w))) for w in weights))
        b = sweep["best"]
        lines.append(f"best: λ={b['ensemble_weight']:g}, mask threshold {b['mask_threshold']:g}: mIoU {b['mIoU']:.1f}"
                     + (f" (seen {_fmt(b.get('mIoU_seen')).strip()}, unseen {_fmt(b.get('mIoU_unseen')).strip()})"
                        if report["unseen"] else ""))
    return "\n".join(lines)


def draw_iou_chart(iou: Mapping[str, float | None], unseen: Iterable[str], path: str | Path, title: str) -> Path:
    """Per-class IoU (%) as horizontal bars, best first, coloured seen / unseen (classes without
    ground-truth pixels last, grey) -> the PNG at `path` (the same chart as SVG beside it)."""
    from matplotlib.patches import Patch  # noqa: PLC0415

    from ovseg_jax.utils import charts  # noqa: PLC0415

    unseen = set(unseen)
    has = {n: v for n, v in iou.items() if v is not None and not math.isnan(v)}
    order = sorted(has, key=lambda n: -has[n]) + [n for n in iou if n not in has]
    colour = {n: NO_GT_COLOUR if n not in has else UNSEEN_COLOUR if n in unseen else SEEN_COLOUR for n in order}

    def mean(names):
        values = [has[n] for n in names if n in has]
        return f"{np.mean(values):.1f}" if values else "-"

    with charts.figure(8, 1.2 + 0.22 * len(order)) as fig:
        ax = fig.subplots()
        bars = ax.barh(range(len(order)), [has.get(n, 0.0) for n in order], height=0.7,
                       color=[_rgb(colour[n]) for n in order])
        labels = ax.bar_label(bars, [f"{has[n]:.1f}" if n in has else "no ground truth" for n in order],
                              padding=3, fontsize=9)
        for name, label in zip(order, labels):
            label.set_color("black" if name in has else _rgb(NO_GT_COLOUR))
        ax.set_yticks(range(len(order)), order)
        ax.set(xlim=(0, 100), ylim=(len(order) - 0.5, -0.5), xlabel="IoU (%)")
        fig.suptitle(title, x=0.01, ha="left")
        ax.legend(handles=[Patch(color=_rgb(SEEN_COLOUR), label=f"seen (mean IoU {mean(set(iou) - unseen)})"),
                           Patch(color=_rgb(UNSEEN_COLOUR), label=f"unseen (mean IoU {mean(unseen)})"),
                           Patch(color=_rgb(NO_GT_COLOUR), label="no ground truth")],
                  loc="lower left", bbox_to_anchor=(0, 1), ncols=3, borderaxespad=0.2)
        png, _ = charts.save(fig, path)
    return png


def _rgb(colour: tuple[int, int, int]) -> tuple[float, ...]:
    return tuple(c / 255 for c in colour)
