"""Unlabeled image folders for the GAN: scanned recursively, checked up front, built-in set on demand."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from visionpipe.augment import SeededAugmentation, build_transform
from visionpipe.errors import DataError
from visionpipe.images import IMAGE_EXTENSIONS, BadImage, check_images, iter_image_files, read_image
from visionpipe.synthetic import SHAPES, build_atomically, shape_mask, write_png

log = logging.getLogger(__name__)


class ImageDataset(SeededAugmentation, Dataset):
    """Image tensors CHW float (no labels); ``transform`` is an albumentations Compose ending in [-1, 1]."""

    def __init__(self, paths: list[str], transform: Any = None, channels: int = 3) -> None:
        self.paths = paths
        self.transform = transform
        self.channels = channels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = read_image(self.paths[i], mode="L" if self.channels == 1 else "RGB")
        if img.ndim == 2:
            img = img[..., None]
        if self.transform is not None:
            img = self.augment_sample(self.transform, i, image=img)["image"]
        if img.ndim == 2:
            img = img[..., None]
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float()


def to_square(size: int, resize: str, channels: int) -> list[Any]:
    """Resize (or resize + centre crop) to ``size`` x ``size`` and scale 0..255 to [-1, 1]."""
    # INTER_AREA when shrinking: GAN inputs are small, and aliasing would be a cue the generator must copy
    steps: list[Any] = ([A.SmallestMaxSize(max_size=size, area_for_downscale="image"), A.CenterCrop(size, size)]
                        if resize == "center_crop" else [A.Resize(size, size, area_for_downscale="image")])
    return steps + [A.Normalize(mean=(0.5,) * channels, std=(0.5,) * channels, max_pixel_value=255.0)]


def build_transforms(specs: list[dict[str, Any]], size: int, resize: str, channels: int) -> A.Compose:
    """The user's transforms followed by :func:`to_square`."""
    return A.Compose([build_transform(s) for s in specs] + to_square(size, resize, channels))


def scan_folder(folder: Path, what: str) -> list[str]:
    """Image files under ``folder`` (recursive, sorted); DataError when missing or empty."""
    if not folder.is_dir():
        raise DataError(f"{what}: {folder} is not a folder")
    paths = [str(p) for p in iter_image_files(folder)]
    if not paths:
        raise DataError(f"{what}: {folder} contains no images (searched recursively for "
                        f"{', '.join(IMAGE_EXTENSIONS)})")
    return paths


def checked(paths: list[str], enabled: bool, what: str) -> tuple[list[str], list[BadImage]]:
    """Drop images that cannot be decoded; DataError when none is left."""
    if not enabled:
        return paths, []
    good, bad = check_images(paths)
    for b in bad:
        log.warning("skipping unreadable image %s: %s", b.path, b.reason)
    if not good:
        raise DataError(f"{what}: none of the {len(paths)} image file(s) could be read "
                        f"(first error: {bad[0].path}: {bad[0].reason})")
    return good, bad


def evenly_spaced(items: list[str], k: int) -> list[str]:
    """At most ``k`` items spread evenly over ``items`` (deterministic)."""
    if len(items) <= k:
        return list(items)
    idx = np.linspace(0, len(items) - 1, k).round().astype(int)
    return [items[i] for i in idx]


PALETTE = np.array([(230, 60, 60), (60, 200, 80), (70, 110, 240), (240, 210, 60), (220, 90, 220), (80, 220, 230)],
                   np.float32)


def generate_shapes(root: Path, count: int, size: int, seed: int) -> None:
    """Write the built-in set: root/<shape>/NNNNN.png, one shape in one of six colours on a dark, graded background.

    Simple on purpose: a DCGAN learns it on a CPU in minutes, so the samples visibly improve.
    """

    def build(tmp: Path) -> None:
        rng = np.random.default_rng(seed)
        ramp = np.linspace(-1, 1, size, dtype=np.float32)[:, None, None]
        for i in range(count):
            bg = rng.uniform(15, 60) + rng.normal(0, 6, 3)
            img = np.clip(bg + ramp * rng.uniform(-12, 12) + np.zeros((size, size, 3), np.float32), 0, 255)
            s = rng.uniform(0.4, 0.75) * size
            cx, cy = rng.uniform(s / 2, size - s / 2, size=2)
            kind = SHAPES[int(rng.integers(len(SHAPES)))]
            m = shape_mask(kind, size, size, cx, cy, s, rng.uniform(0, np.pi)).astype(bool)
            img[m] = np.clip(PALETTE[rng.integers(len(PALETTE))] * rng.uniform(0.8, 1.05), 0, 255)
            write_png(tmp / kind / f"{i:05d}.png", img.astype(np.uint8))  # shape sub-folders: a classifier can use them

    log.info("generating the built-in unlabeled shapes image set at %s (%d images)", root, count)
    build_atomically(root, build)


def load_images(cfg: Any) -> tuple[list[str], list[str], list[BadImage]]:
    """(training images, reference images for the Fréchet distance, unreadable images)."""
    root = Path(cfg.root).expanduser().resolve()
    if cfg.generate is not None and not root.exists():
        generate_shapes(root, cfg.generate.count, cfg.generate.image_size, cfg.generate.seed)
    if not root.exists():
        raise DataError(f"load.root: {root} does not exist (add load.generate to create the built-in image set)")
    train, bad = checked(scan_folder(root, "load.root"), cfg.check_images, "load.root")
    if cfg.val is None:
        ref = train
    else:
        val_root = Path(cfg.val).expanduser().resolve()
        ref, bad_val = checked(scan_folder(val_root, "load.val"), cfg.check_images, "load.val")
        bad += bad_val
    return train, evenly_spaced(ref, cfg.reference_images), bad
