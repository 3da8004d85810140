"""The evaluation report: `metrics.json` (JSON-safe), the printed table, the per-class IoU chart."""

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


def _font(size: int):
    from PIL import ImageFont  # noqa: PLC0415

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError, ImportError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def draw_iou_chart(iou: Mapping[str, float | None], unseen: Iterable[str], path: str | Path, title: str) -> Path:
    """Per-class IoU as horizontal bars, best first, coloured seen / unseen (grey: no ground-truth
    pixels) -> a PNG at `path`."""
    from PIL import Image, ImageDraw  # noqa: PLC0415

    unseen = set(unseen)
    has = {n: v for n, v in iou.items() if v is not None and not math.isnan(v)}
    order = sorted(has, key=lambda n: -has[n]) + [n for n in iou if n not in has]
    face = _font(12)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    name_w = int(max([probe.textlength(n, font=face) for n in order] + [60])) + 12
    bar_w, row, header = 400, 16, 48
    width, height = name_w + bar_w + 60, header + row * len(order) + 8
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((8, 6), title, fill="black", font=face)

    def mean(names):
        values = [has[n] for n in names if n in has]
        return f"{np.mean(values):.1f}" if values else "-"

    x = 8
    for label, colour in ((f"seen (mean IoU {mean([n for n in iou if n not in unseen])})", SEEN_COLOUR),
                          (f"unseen (mean IoU {mean(unseen)})", UNSEEN_COLOUR), ("no ground truth", NO_GT_COLOUR)):
        draw.rectangle([x, 27, x + 10, 37], fill=colour)
        draw.text((x + 14, 25), label, fill="black", font=face)
        x += int(probe.textlength(label, font=face)) + 34
    for i, name in enumerate(order):
        y = header + i * row
        draw.text((name_w - 6 - probe.textlength(name, font=face), y + 1), name, fill="black", font=face)
        if name not in has:
            draw.text((name_w + 2, y + 1), "no ground truth", fill=NO_GT_COLOUR, font=face)
            continue
        colour = UNSEEN_COLOUR if name in unseen else SEEN_COLOUR
        draw.rectangle([name_w, y + 2, name_w + max(1, round(bar_w * has[name] / 100)), y + row - 3], fill=colour)
        draw.text((name_w + bar_w + 6, y + 1), f"{has[name]:.1f}", fill="black", font=face)
    path = Path(path)
    image.save(path)
    return path
