"""The built-in dataset: textured images with several shape classes and their exact masks."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from visionpipe.io import write_text
from visionpipe.synthetic import (
    SHAPES,
    build_atomically,
    paint,
    random_color,
    shape_mask,
    textured_background,
    write_png,
)
from visionpipe_plugins.segmentation.config import GenerateConfig
from visionpipe_plugins.segmentation.masks import voc_palette, write_mask

log = logging.getLogger(__name__)
CLASSES = ("background", *SHAPES)


PLACEMENT_TRIES = 20


def draw_sample(size: int, max_shapes: int, rng: np.random.Generator,
                overlap: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One RGB image with 1..max_shapes shapes and its class-index mask (later shapes on top).

    Without ``overlap`` a shape that would touch an earlier one is placed again (a few tries, then left out)."""
    img = textured_background(size, size, rng, clutter=0.5)
    mask = np.zeros((size, size), np.uint8)
    bg_mean = img.reshape(-1, 3).mean(0)
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        cls = int(rng.integers(len(SHAPES)))
        for _ in range(PLACEMENT_TRIES):
            s = rng.uniform(0.25, 0.5) * size
            cx, cy = rng.uniform(s / 2, size - s / 2, size=2)
            m = shape_mask(SHAPES[cls], size, size, cx, cy, s, rng.uniform(0, np.pi)).astype(bool)
            if overlap or not (mask[m] > 0).any():
                paint(img, m.astype(np.uint8), random_color(rng, bg_mean), rng)
                mask[m] = cls + 1
                break
    return img, mask


def generate_shapes(root: Path, cfg: GenerateConfig) -> None:
    """Write root/{train,val,test}/{images,masks}/NNNNN.png (palette masks) and root/classes.txt."""
    palette = voc_palette(len(CLASSES))

    def build(tmp: Path) -> None:
        rng = np.random.default_rng(cfg.seed)
        for split, n in (("train", cfg.train), ("val", cfg.val), ("test", cfg.test)):
            for i in range(n):
                img, mask = draw_sample(cfg.image_size, cfg.max_shapes, rng, cfg.overlap)
                write_png(tmp / split / "images" / f"{i:05d}.png", img)
                write_mask(tmp / split / "masks" / f"{i:05d}.png", mask, palette)
        write_text(tmp / "classes.txt", "\n".join(CLASSES) + "\n")

    total = cfg.train + cfg.val + cfg.test
    log.info("generating the built-in segmentation shapes dataset at %s (%d images)", root, total)
    build_atomically(root, build)
