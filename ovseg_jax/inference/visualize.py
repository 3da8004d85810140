"""Pictures of segmentations: a fixed colour per class, label maps in colour, label maps blended
over the image, and panels of images side by side with a legend of class names.

    colours = palette(len(names))
    picture = panel([("input", image), ("prediction", colorize(labels, colours))],
                    legend=[(names[i], colours[i]) for i in np.unique(labels)])
    picture.save("prediction.png")
    blended = overlay(image, labels, colours)            # uint8 [H, W, 3], unlabeled pixels kept
    with_legend(blended, [("sky 41.0%", colours[1])]).save("overlay.png")
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


def font(size: int) -> ImageFont.ImageFont:
    """PIL's built-in font at `size` pixels (scalable with FreeType; the fixed bitmap font otherwise)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError, ImportError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def legend_font_size(height: int, width: int) -> int:
    """A legend font size readable next to a picture of `height x width` pixels: 12-40 px."""
    return int(np.clip(round(min(height, width) / 32), 12, 40))


def legend(entries: Sequence[tuple[str, Sequence[int]]], width: int, font_size: int = 12) -> Image.Image:
    """(name, colour) swatches flowing left to right in rows of at most `width` pixels (at least one
    entry per row) -> a white PIL image as wide as its widest row (or `width`)."""
    face = font(font_size)
    pad, swatch = max(4, font_size // 2), font_size
    sizes = [int(np.ceil(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(name, font=face))) + swatch + 3 * pad
             for name, _ in entries]
    rows, x = [[]], 0
    for i, w in enumerate(sizes):
        if rows[-1] and x + w > width:
            rows.append([])
            x = 0
        rows[-1].append(i)
        x += w
    row_h = font_size + pad
    canvas = Image.new("RGB", (max([width] + [sum(sizes[i] for i in r) for r in rows]),
                               len(rows) * row_h + pad if entries else 0), "white")
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        x, y = 0, pad + r * row_h
        for i in row:
            name, colour = entries[i]
            draw.rectangle((x + pad, y, x + pad + swatch - 1, y + swatch - 1), fill=tuple(int(c) for c in colour),
                           outline="black")
            draw.text((x + 2 * pad + swatch, y + swatch // 2), name, fill="black", font=face, anchor="lm")
            x += sizes[i]
    return canvas


def with_legend(picture, entries: Sequence[tuple[str, Sequence[int]]], font_size: int | None = None) -> Image.Image:
    """A picture (uint8 `[H, W, 3]` or PIL) with `legend(entries)` below it -> a PIL image."""
    picture = picture if isinstance(picture, Image.Image) else Image.fromarray(np.asarray(picture, np.uint8))
    size = legend_font_size(picture.height, picture.width) if font_size is None else font_size
    below = legend(entries, picture.width, size)
    canvas = Image.new("RGB", (max(picture.width, below.width), picture.height + below.height), "white")
    canvas.paste(picture, (0, 0))
    canvas.paste(below, (0, picture.height))
    return canvas


def side_by_side(images: Sequence[np.ndarray], gap: int = 8) -> np.ndarray:
    """uint8 `[H, W_i, 3]` images of one height -> `[H, sum W_i + gap * (n - 1), 3]` with white gaps."""
    spacer = np.full((images[0].shape[0], gap, 3), 255, np.uint8)
    parts = [p for image in images for p in (spacer, np.asarray(image, np.uint8))][1:]
    return np.concatenate(parts, axis=1)


def _boundaries(labels: np.ndarray, thickness: int) -> np.ndarray:
    """bool `[H, W]`: pixels within `thickness - 1` pixels of a change of label."""
    edge = np.zeros(labels.shape, bool)
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    for _ in range(thickness - 1):
        grown = edge.copy()
        grown[:, :-1] |= edge[:, 1:]
        grown[:-1, :] |= edge[1:, :]
        edge = grown
    return edge


def overlay(image: np.ndarray, labels: np.ndarray, colours: np.ndarray, alpha: float = 0.5,
            edge_thickness: int | None = None) -> np.ndarray:
    """uint8 `[H, W, 3]` image, int `[H, W]` class indices -> uint8 `[H, W, 3]`: labelled pixels
    blended with their class colour (`alpha`), class boundaries drawn in solid colour; pixels whose
    label is not an index into `colours` (e.g. -1, unlabeled) keep the image."""
    image, labels = np.asarray(image), np.asarray(labels)
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape[:2]} and labels {labels.shape} differ in size")
    inside = (labels >= 0) & (labels < len(colours))
    thickness = max(1, min(labels.shape) // 256) if edge_thickness is None else edge_thickness
    weight = np.where(inside, alpha, 0.0)
    if thickness > 0:
        weight = np.where(inside & _boundaries(labels, thickness), 1.0, weight)[..., None]
    else:
        weight = weight[..., None]
    colour = np.asarray(colours, np.float32)[np.where(inside, labels, 0)]
    return np.round(image.astype(np.float32) * (1 - weight) + colour * weight).astype(np.uint8)


def panel(images: Sequence[tuple[str, np.ndarray]], legend: Sequence[tuple[str, Sequence[int]]] = (),
          scale: int = 1) -> Image.Image:
    """Titled uint8 `[H, W, 3]` images side by side (nearest-upscaled by `scale`), a legend of
    (name, colour) swatches below -> a PIL image."""
    face = font(11)
    h = max(im.shape[0] for _, im in images) * scale
    widths = [im.shape[1] * scale for _, im in images]
    gap, title_h = 8, 16
    canvas = Image.new("RGB", (sum(widths) + gap * (len(images) + 1), title_h + h + gap), "white")
    draw = ImageDraw.Draw(canvas)
    x = gap
    for (title, im), w in zip(images, widths):
        draw.text((x, 2), title, fill="black", font=face)
        picture = Image.fromarray(np.asarray(im, np.uint8))
        canvas.paste(picture.resize((w, im.shape[0] * scale), Image.NEAREST), (x, title_h))
        x += w + gap
    return with_legend(canvas, legend, font_size=11) if legend else canvas
