"""Pictures of segmentations: a fixed colour per class, label maps in colour, and panels of images
side by side with a legend of class names.

    colours = palette(len(names))
    picture = panel([("input", image), ("prediction", colorize(labels, colours))],
                    legend=[(names[i], colours[i]) for i in np.unique(labels)])
    picture.save("prediction.png")
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IGNORE_COLOR = (0, 0, 0)


def palette(n: int, seed: int = 0) -> np.ndarray:
    """`n` distinct-looking colours -> uint8 `[n, 3]`: hues spread by the golden ratio, with
    alternating saturation and value so that neighbours differ; the same for any `n` prefix."""
    index = np.arange(n)
    hue = (seed * 0.1 + index * 0.618033988749895) % 1.0
    sat = np.where(index % 2 == 0, 0.85, 0.55)
    val = np.where(index % 3 == 2, 0.7, 0.95)
    sector = np.floor(hue * 6).astype(int) % 6
    f = hue * 6 - np.floor(hue * 6)
    p, q, t = val * (1 - sat), val * (1 - sat * f), val * (1 - sat * (1 - f))
    rgb = np.stack([np.choose(sector, (val, q, p, p, t, val)), np.choose(sector, (t, val, val, q, p, p)),
                    np.choose(sector, (p, p, t, val, val, q))], -1)
    return np.round(rgb * 255).astype(np.uint8)


def colorize(labels: np.ndarray, colours: np.ndarray, ignore_value: int = 255) -> np.ndarray:
    """int `[H, W]` class indices -> uint8 `[H, W, 3]`; `ignore_value` (or any index past the
    palette) is black."""
    labels = np.asarray(labels)
    table = np.concatenate([colours, np.zeros((1, 3), np.uint8)])
    index = np.where((labels >= 0) & (labels < len(colours)) & (labels != ignore_value), labels, len(colours))
    return table[index]


def panel(images: Sequence[tuple[str, np.ndarray]], legend: Sequence[tuple[str, Sequence[int]]] = (),
          scale: int = 1) -> Image.Image:
    """Titled uint8 `[H, W, 3]` images side by side (nearest-upscaled by `scale`), a legend of
    (name, colour) swatches below -> a PIL image."""
    font = ImageFont.load_default()
    h = max(im.shape[0] for _, im in images) * scale
    widths = [im.shape[1] * scale for _, im in images]
    gap, title_h, row_h = 8, 16, 16
    per_row = max(1, (sum(widths) + gap * (len(images) + 1)) // 170)
    legend_h = (len(legend) + per_row - 1) // per_row * row_h + (gap if legend else 0)
    canvas = Image.new("RGB", (sum(widths) + gap * (len(images) + 1), title_h + h + gap + legend_h), "white")
    draw = ImageDraw.Draw(canvas)
    x = gap
    for (title, im), w in zip(images, widths):
        draw.text((x, 2), title, fill="black", font=font)
        picture = Image.fromarray(np.asarray(im, np.uint8))
        canvas.paste(picture.resize((w, im.shape[0] * scale), Image.NEAREST), (x, title_h))
        x += w + gap
    for i, (name, colour) in enumerate(legend):
        lx, ly = gap + (i % per_row) * 170, title_h + h + gap + (i // per_row) * row_h
        draw.rectangle((lx, ly + 2, lx + 11, ly + 13), fill=tuple(int(c) for c in colour), outline="black")
        draw.text((lx + 16, ly + 2), name, fill="black", font=font)
    return canvas
