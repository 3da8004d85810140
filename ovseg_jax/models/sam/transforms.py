"""SAM's input resizing (`segment_anything.utils.transforms.ResizeLongestSide`), in numpy.

An image of `(H, W)` is resized so that its longest side is `target_length` (1024): the new size is
`(int(H * s + 0.5), int(W * s + 0.5))` with `s = target_length / max(H, W)`. Point coordinates and
box corners are scaled by `new_w / W` (x) and `new_h / H` (y).

`apply_image` is what `SamPredictor.set_image` and the automatic mask generator feed the model:
segment_anything converts the uint8 image to PIL (`to_pil_image`) and calls torchvision's
`resize`, which for PIL images is PIL's `Image.resize((new_w, new_h), BILINEAR)` - PIL's
bilinear filter widens its support when shrinking (antialiased), unlike `F.interpolate`
(`apply_image_torch`, which the reference says "may not exactly match"). We call PIL directly.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def preprocess_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """`(height, width)` scaled so that the longest side is `long_side`, rounded half up."""
    scale = long_side * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


class ResizeLongestSide:
    """Resize images, points and boxes to the longest side `target_length` (numpy, host side)."""

    def __init__(self, target_length: int):
        self.target_length = target_length

    def target_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """`(H, W)` -> the resized `(h, w)`."""
        return preprocess_shape(int(original_size[0]), int(original_size[1]), self.target_length)

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """`[H, W, 3]` uint8 -> `[h, w, 3]` uint8 (PIL bilinear, as segment_anything)."""
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"apply_image takes an [H, W, 3] uint8 RGB image; got {image.dtype} {image.shape}")
        h, w = self.target_size(image.shape[:2])
        return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """`[..., 2]` (x, y) pixels of the original image -> float64 pixels of the resized one."""
        old_h, old_w = original_size
        new_h, new_w = self.target_size(original_size)
        coords = np.array(coords, dtype=np.float64)
        coords[..., 0] *= new_w / old_w
        coords[..., 1] *= new_h / old_h
        return coords

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """`[..., 4]` (x0, y0, x1, y1) pixels of the original image -> float64 resized-image pixels."""
        boxes = np.asarray(boxes)
        return self.apply_coords(boxes.reshape(boxes.shape[:-1] + (2, 2)), original_size).reshape(boxes.shape)
