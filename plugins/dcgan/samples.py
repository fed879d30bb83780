"""Noise vectors from a seed, images from generator outputs, sample grids as PNG."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from visionpipe.io import atomic_path


def noise(n: int, nz: int, seed: int) -> np.ndarray:
    """[n, nz] float32 standard normal noise; row i depends only on (seed, i), not on n."""
    return np.random.default_rng(seed).standard_normal((n, nz), dtype=np.float32)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[B, C, H, W] in [0, 1] → [B, H, W, C] uint8."""
    return np.clip(np.rint(np.asarray(images).transpose(0, 2, 3, 1) * 255.0), 0, 255).astype(np.uint8)


def write_png(path: str | Path, image: np.ndarray) -> None:
    """Write an HxWx3 (RGB) or HxWx1 uint8 image atomically."""
    arr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.shape[-1] == 3 else image[..., 0]
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), arr):
            raise OSError(f"could not write {path}")


def make_grid(images: np.ndarray, pad: int = 2, min_cell: int = 64) -> np.ndarray:
    """[B, H, W, C] uint8 → one image of a near-square grid; small images are enlarged (nearest)."""
    b, h, w, c = images.shape
    scale = max(1, math.ceil(min_cell / max(h, w)))
    if scale > 1:
        images = images.repeat(scale, 1).repeat(scale, 2)
        h, w = h * scale, w * scale
    cols = math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i in range(b):
        r, k = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        grid[y:y + h, x:x + w] = images[i]
    return grid
