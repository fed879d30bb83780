"""Read any image the same way in training and predict: EXIF orientation, any mode, any depth."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from visionpipe.errors import ImageReadError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")
MIN_SIDE = 8

# Decompression bombs are an error, not a warning.
Image.MAX_IMAGE_PIXELS = 20000 * 20000
import warnings  # noqa: E402

warnings.simplefilter("error", Image.DecompressionBombWarning)


def is_image_file(path: str | os.PathLike) -> bool:
    """True when the extension is one visionpipe reads."""
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale a 16-bit, 32-bit int or float array to 0..255 uint8."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16 or (arr.dtype.kind in "iu" and arr.max(initial=0) > 255):
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        return np.clip(arr.astype(np.float32) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if arr.dtype.kind == "f":
        hi = float(arr.max(initial=0.0))
        scale = 255.0 if hi <= 1.0 else (255.0 / hi if hi > 255 else 1.0)
        return np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8)
    return arr.astype(np.uint8)


def read_image(path: str | os.PathLike, mode: str = "RGB") -> np.ndarray:
    """Decode ``path`` to an HxWx3 (RGB) or HxW (L) uint8 array with EXIF orientation applied.

    Grayscale, palette, RGBA (alpha dropped onto black), CMYK, 16-bit and float images all
    come out the same way. Raises ImageReadError with the reason when it cannot be read.
    """
    path = str(path)
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                arr = _to_uint8(np.asarray(im))
                im = Image.fromarray(arr, mode="L")
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (0, 0, 0, 255))
                im = Image.alpha_composite(bg, im)
            im = im.convert(mode)
            arr = np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except UnidentifiedImageError:
        raise ImageReadError(path, "not a recognised image format (corrupt or not an image)") from None
    except Image.DecompressionBombError as e:
        raise ImageReadError(path, f"image too large: {e}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning) as e:
        raise ImageReadError(path, f"cannot decode: {e}") from None
    if arr.ndim < 2 or min(arr.shape[:2]) < MIN_SIDE:
        raise ImageReadError(path, f"image too small ({arr.shape[1]}x{arr.shape[0]}); at least {MIN_SIDE}px a side")
    return np.ascontiguousarray(arr)


@dataclass(frozen=True)
class BadImage:
    """An input that was skipped, with why."""

    path: str
    reason: str


def check_images(paths: Iterable[str], workers: int | None = None) -> tuple[list[str], list[BadImage]]:
    """Decode every image once (in threads); return (readable paths in order, bad ones)."""
    paths = list(paths)
    workers = workers or min(8, (os.cpu_count() or 2) * 2)

    def probe(p: str) -> BadImage | None:
        try:
            read_image(p)
        except ImageReadError as e:
            return BadImage(p, e.reason)
        return None

    good: list[str] = []
    bad: list[BadImage] = []
    with ThreadPoolExecutor(workers) as pool:
        for p, res in zip(paths, pool.map(probe, paths), strict=False):
            (bad.append(res) if res else good.append(p))
    return good, bad


def iter_image_files(root: str | os.PathLike) -> Iterator[Path]:
    """Image files under ``root`` recursively, in sorted (deterministic) order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if is_image_file(name) and not name.startswith("."):
                yield Path(dirpath) / name
