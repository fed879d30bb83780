"""Read any image the same way in training and predict: EXIF orientation, any mode, any depth."""

from __future__ import annotations

import io
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


def _bits_per_sample(im: Image.Image) -> int | None:
    """Bits per sample that an integer-mode image (I;16*, I) was stored with; None for float (F)."""
    if im.mode.startswith("I;16"):
        return 16
    if im.mode != "I":
        return None
    if im.format == "TIFF":
        tags = getattr(im, "tag_v2", {})
        bits = tags.get(258, 32)  # BitsPerSample: an int or one value per channel
        bits = int(bits[0] if isinstance(bits, tuple) else bits)
        signed = tags.get(339, 1) in (2, (2,))  # SampleFormat 2: two's complement integers
        return max(8, bits - 1 if signed else bits)
    if im.format in ("PNG", "PPM"):  # Pillow < 11 opens 16-bit greyscale PNG and PGM as mode I
        return 16
    return 31


def _to_uint8(arr: np.ndarray, bits: int | None) -> np.ndarray:
    """Scale by the stored bit depth, never by the pixel values: ``bits``-bit integers keep their top 8 bits
    (as Pillow and OpenCV do for 16-bit colour), floats (``bits`` None) are taken as 0..1."""
    if bits is None:
        return np.clip(np.nan_to_num(arr.astype(np.float32)) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if bits <= 8:
        return np.clip(arr, 0, 255).astype(np.uint8)
    return (np.clip(arr.astype(np.int64), 0, 2**bits - 1) >> (bits - 8)).astype(np.uint8)


_PNG = b"\x89PNG\r\n\x1a\n"
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_frame(data: bytes) -> tuple[int, int, int, int] | None:
    """(precision, height, width, components) from a JPEG's start-of-frame segment, or None."""
    i, n = 2, len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _JPEG_SOF:
            return data[i + 4], int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big"), \
                data[i + 9]
        if marker == 0xDA:  # start of scan before any frame header: malformed
            return None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def _png_plain(data: bytes) -> bool:
    """True when a PNG's chunks are intact up to IEND and none is tRNS (transparency) or eXIf (orientation)."""
    i, n = 8, len(data)
    while i + 8 <= n:
        kind = data[i + 4:i + 8]
        if kind in (b"tRNS", b"eXIf"):
            return False
        if kind == b"IEND":
            return True
        i += 12 + int.from_bytes(data[i:i + 4], "big")
    return False  # truncated: the general path reports it


def _fast_decodable(data: bytes) -> bool:
    """True for the common files a fast decoder turns into exactly the pixels of the general (PIL) path.

    8-bit grey or RGB PNGs without transparency or an EXIF chunk (lossless: any decoder gives
    the same pixels), and complete 8-bit grey or YCbCr JPEGs (torchvision and PIL both use
    libjpeg-turbo with the same settings; EXIF orientation is applied by both). Everything else,
    and anything odd, takes the general path, which also gives the error messages.
    """
    if data.startswith(_PNG) and len(data) > 33 and data[12:16] == b"IHDR":
        w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        return (data[24] == 8 and data[25] in (0, 2) and 0 < w * h <= (Image.MAX_IMAGE_PIXELS or 0)
                and _png_plain(data))
    if data.startswith(b"\xff\xd8\xff") and data.endswith(b"\xff\xd9") and b"Adobe" not in data[:4096]:
        frame = _jpeg_frame(data)
        return (frame is not None and frame[0] == 8 and frame[3] in (1, 3)
                and 0 < frame[1] * frame[2] <= (Image.MAX_IMAGE_PIXELS or 0))
    return False


def _decode_fast(data: bytes) -> np.ndarray | None:
    """RGB uint8 pixels of a :func:`_fast_decodable` file, or None to take the general path.

    PNGs go through OpenCV (libpng checks every chunk's CRC, so a damaged file gives None).
    JPEGs go through torchvision's libjpeg-turbo rather than OpenCV's: it fails on the corrupt
    scans that PIL rejects (OpenCV only prints a warning and returns the garbage), at about
    OpenCV's speed (about 2x PIL on small files). A failure here is reported by the general path.
    """
    if data.startswith(_PNG):
        import cv2

        rgb = getattr(cv2, "IMREAD_COLOR_RGB", None)  # OpenCV >= 4.10 decodes straight to RGB
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), rgb if rgb is not None else cv2.IMREAD_COLOR)
        if arr is None or rgb is not None:
            return arr
        return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        chw = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                          apply_exif_orientation=True)
    except (RuntimeError, ValueError):
        return None
    return chw.permute(1, 2, 0).contiguous().numpy()


def _read_bytes(path: str) -> bytes:
    """The whole file, with plain system calls (half the per-file cost of ``open().read()`` on small images).

    One read of the file's size (plus one byte, to see the end) in the common case; a file that grows
    meanwhile, or reports no size, is read on to its end."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        size = os.fstat(fd).st_size
        data = os.read(fd, size + 1 if size else 1 << 16)
        if size and len(data) == size:  # asked for one byte more than there is: that was all of it
            return data
        chunks = [data]
        while chunk := os.read(fd, 1 << 22):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def read_image(path: str | os.PathLike, mode: str = "RGB") -> np.ndarray:
    """Decode ``path`` to an HxWx3 (RGB) or HxW (L) uint8 array with EXIF orientation applied.

    Grayscale, palette, RGBA (alpha dropped onto black), CMYK, 16-bit and float images all
    come out the same way. Raises ImageReadError with the reason when it cannot be read.
    Plain 8-bit PNGs (OpenCV) and JPEGs (torchvision) take a faster decoder, to the same pixels.
    """
    path = str(path)
    try:
        data = _read_bytes(path)  # read once: both decoders work from these bytes
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except OSError as e:
        raise ImageReadError(path, f"cannot read: {e}") from None
    if mode == "RGB" and _fast_decodable(data):
        arr = _decode_fast(data)
        if arr is not None:
            return _check_size(path, arr)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            bits = _bits_per_sample(im)
            im = ImageOps.exif_transpose(im)
            if im.mode.startswith("I") or im.mode == "F":
                im = Image.fromarray(_to_uint8(np.asarray(im), bits))
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (0, 0, 0, 255))
                im = Image.alpha_composite(bg, im)
            im = im.convert(mode)
            arr = np.asarray(im, dtype=np.uint8)
    except UnidentifiedImageError:
        raise ImageReadError(path, "not a recognised image format (corrupt or not an image)") from None
    except Image.DecompressionBombError as e:
        raise ImageReadError(path, f"image too large: {e}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning) as e:
        raise ImageReadError(path, f"cannot decode: {e}") from None
    return _check_size(path, arr)


def _check_size(path: str, arr: np.ndarray) -> np.ndarray:
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
    """Image files under ``root`` recursively, in sorted (deterministic) order.

    Hidden files and folders (``.``-names: ``._x.jpg`` resource forks, ``.ipynb_checkpoints``) are left out."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        folder = Path(dirpath)
        for name in sorted(filenames):
            if is_image_file(name) and not name.startswith("."):
                yield folder / name
