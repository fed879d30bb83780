"""Built-in synthetic images: coloured shapes on textured backgrounds (no downloads needed).

Tasks build their demo/test datasets from these primitives: the shape is drawn together
with its exact mask, so classification labels, detection boxes and segmentation masks
all come from one drawing.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

SHAPES = ("circle", "square", "triangle", "cross")


def textured_background(h: int, w: int, rng: np.random.Generator, clutter: float = 1.0) -> np.ndarray:
    """A smooth random colour field with noise and a few stripes (HxWx3 uint8); ``clutter`` scales the texture."""
    base = rng.integers(0, 256, size=(3,), dtype=np.int64)
    small = rng.normal(0, 40 * clutter, size=(max(2, h // 16), max(2, w // 16), 3))
    field = cv2.resize(small.astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    img = base[None, None, :] * 0.6 + 50 + field
    if rng.random() < 0.5:
        period = rng.integers(6, 20)
        phase = rng.random() * math.tau
        xs = np.arange(w)[None, :] if rng.random() < 0.5 else np.arange(h)[:, None]
        img = img + (12 * clutter * np.sin(xs * math.tau / period + phase))[..., None]
    img = img + rng.normal(0, 8, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def shape_mask(kind: str, h: int, w: int, cx: float, cy: float, size: float, angle: float) -> np.ndarray:
    """A uint8 mask (0/1) of one shape of ``size`` (about its bounding-box side) at (cx, cy)."""
    m = np.zeros((h, w), np.uint8)
    r = size / 2
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])

    def poly(points: list[tuple[float, float]]) -> None:
        pts = (np.array(points) @ rot.T) + np.array([cx, cy])
        cv2.fillPoly(m, [np.round(pts).astype(np.int32)], 1, lineType=cv2.LINE_8)

    if kind == "circle":
        cv2.circle(m, (round(cx), round(cy)), max(1, round(r)), 1, -1)
    elif kind == "square":
        s = r * 0.85
        poly([(-s, -s), (s, -s), (s, s), (-s, s)])
    elif kind == "triangle":
        poly([(0, -r), (r * 0.95, r * 0.75), (-r * 0.95, r * 0.75)])
    elif kind == "cross":
        a, b = r, r * 0.33
        poly([(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)])
    else:
        raise ValueError(f"unknown shape {kind}")
    return m


def random_color(rng: np.random.Generator, avoid: np.ndarray | None = None) -> np.ndarray:
    """A saturated colour that differs clearly from ``avoid`` (a mean background colour)."""
    for _ in range(20):
        c = rng.integers(0, 256, size=3)
        c[rng.integers(0, 3)] = rng.integers(200, 256)
        if avoid is None or np.abs(c - avoid).sum() > 160:
            return c
    return 255 - (avoid if avoid is not None else np.zeros(3)).astype(np.int64)


def paint(img: np.ndarray, mask: np.ndarray, color: np.ndarray, rng: np.random.Generator) -> None:
    """Fill ``mask`` on ``img`` with ``color`` plus a little shading noise (in place)."""
    sel = mask.astype(bool)
    noise = rng.normal(0, 10, size=(int(sel.sum()), 3))
    img[sel] = np.clip(color[None, :] + noise, 0, 255).astype(np.uint8)


def build_atomically(root: str | os.PathLike, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp_dir)`` and move the result to ``root`` (never a half-made dataset)."""
    root = Path(root)
    if root.exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        build(tmp)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def write_png(path: Path, rgb: np.ndarray) -> None:
    """Save an RGB (or single-channel) uint8 array as PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if rgb.ndim == 3 else rgb
    if not cv2.imwrite(str(path), arr):
        raise OSError(f"could not write {path}")
