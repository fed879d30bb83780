"""Mask PNGs: read index and palette masks as class indices, write them, colour them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from visionpipe.errors import DataError
from visionpipe.io import atomic_path

INDEX_MODES = ("P", "L", "1", "I;16", "I;16L", "I;16B", "I")


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Class indices (HxW uint8) of an index PNG (mode L) or palette PNG (mode P, indices kept as they are)."""
    path = str(path)
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode not in INDEX_MODES:
                raise DataError(f"{path}: mask has mode {mode}; masks must be single-channel index PNGs or "
                                f"palette PNGs (class index per pixel), not colour images")
            arr = np.array(im)
    except FileNotFoundError:
        raise DataError(f"{path}: mask file not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: cannot read mask ({e})") from None
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype != np.uint8:
        hi = int(arr.max(initial=0))
        if hi > 255:
            raise DataError(f"{path}: mask value {hi} does not fit the 0..255 class range")
        arr = arr.astype(np.uint8)
    return np.ascontiguousarray(arr)


def mask_palette(path: str | os.PathLike, n: int) -> list[list[int]] | None:
    """The first ``n`` palette colours of a palette PNG, or None for other masks."""
    with Image.open(path) as im:
        if im.mode != "P":
            return None
        pal = im.getpalette() or []
    cols = [pal[i:i + 3] for i in range(0, len(pal), 3)][:n]
    return cols if len(cols) == n else None


def voc_palette(n: int) -> list[list[int]]:
    """The Pascal VOC colour map: distinct colours for ``n`` classes (class 0 black)."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append([r, g, b])
    return out


def write_mask(path: str | os.PathLike, mask: np.ndarray, palette: list[list[int]] | None = None) -> None:
    """Save class indices as a PNG atomically: a palette PNG when ``palette`` is given, else mode L."""
    im = Image.fromarray(np.ascontiguousarray(mask.astype(np.uint8)), mode="L")
    if palette:
        im = im.convert("P")
        flat = [v for c in palette for v in c]
        im.putpalette(flat + [0] * (768 - len(flat)))
    with atomic_path(Path(path)) as tmp:
        im.save(tmp, format="PNG")


def colorize(mask: np.ndarray, palette: list[list[int]], ignore_index: int | None = None) -> np.ndarray:
    """HxWx3 uint8 colours of a class-index mask; ignored pixels white."""
    lut = np.zeros((256, 3), np.uint8)
    pal = np.asarray(palette, np.uint8).reshape(-1, 3)[:256]
    lut[: len(pal)] = pal
    if ignore_index is not None:
        lut[ignore_index] = 255
    return lut[mask]


def overlay(image: np.ndarray, mask: np.ndarray, palette: list[list[int]], alpha: float = 0.5) -> np.ndarray:
    """``image`` with class colours blended in (class 0, the background, left as it is)."""
    colors = colorize(mask, palette).astype(np.float32)
    out = image.astype(np.float32)
    sel = mask > 0
    out[sel] = (1 - alpha) * out[sel] + alpha * colors[sel]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
