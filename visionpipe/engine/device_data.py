"""``train.decode: device``: workers read JPEG bytes; decoding and augmentation run on the training device.

On CUDA the JPEGs of a batch are decoded together by nvJPEG (``torchvision.io.decode_jpeg(...,
device="cuda")``), then cropped, resized, flipped and normalized with torch ops on the GPU, so
CPU cores no longer cap a fast GPU. On CPU the same code decodes with libjpeg-turbo, which is
how CI tests it against the ordinary path (the task's albumentations transforms in workers).

Scope: image-label datasets (torchvision ImageFolder's ``samples`` of (path, class index)) with
the core ``augment`` block, whose train list may hold only the transforms in :data:`SUPPORTED`.
Files that are not plain JPEGs (PNG, CMYK, EXIF-rotated) are decoded in the worker exactly as
the ordinary path does and uploaded as pixels.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from visionpipe.augment import AugmentConfig
from visionpipe.errors import VisionpipeError
from visionpipe.images import is_image_file, read_image

SUPPORTED = ("HorizontalFlip", "VerticalFlip", "RandomResizedCrop")
"""albumentations transforms (in ``augment.train``) that the device path reproduces."""

_N_PARAMS = 7  # hflip, vflip, crop-apply, crop-area, crop-log-ratio, crop-x, crop-y: uniforms in [0, 1)


@dataclass(frozen=True)
class DeviceImages:
    """What ``decode: device`` needs from a task for one split: (image path, label) pairs and the augment block."""

    samples: list[tuple[str, int]]
    augment: AugmentConfig


@dataclass(frozen=True)
class DeviceAugment:
    """The augmentation the device path applies: optional random resized crop, resize, flips, normalize."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    hflip: float = 0.0
    vflip: float = 0.0
    crop_p: float = 0.0
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)

    @classmethod
    def from_config(cls, cfg: AugmentConfig, *, train: bool) -> DeviceAugment:
        """The train (or eval) augmentation of an augment block; VisionpipeError for what it cannot do."""
        kw: dict[str, Any] = {}
        specs = cfg.train if train else cfg.eval
        for i, spec in enumerate(specs):
            name, p = spec.get("name"), float(spec.get("p", 1.0 if spec.get("name") == "RandomResizedCrop" else 0.5))
            where = f"augment.{'train' if train else 'eval'}[{i}]"
            if name == "HorizontalFlip":
                kw["hflip"] = p
            elif name == "VerticalFlip":
                kw["vflip"] = p
            elif name == "RandomResizedCrop":
                kw.update(crop_p=p, crop_scale=tuple(spec.get("scale", (0.08, 1.0))),
                          crop_ratio=tuple(spec.get("ratio", (3 / 4, 4 / 3))))
            else:
                raise VisionpipeError(
                    f"{where}: train.decode: device cannot apply '{name}' on the device; it supports "
                    f"{', '.join(SUPPORTED)} (then resize + normalize). Use train.decode: workers for other transforms")
        return cls(size=tuple(cfg.image_size), mean=tuple(cfg.mean), std=tuple(cfg.std), **kw)


def image_label_source(task: Any, ds: Dataset | None) -> DeviceImages | None:
    """The default of ``Task.device_images``: ImageFolder-style ``ds.samples`` plus a core augment block."""
    samples = getattr(ds, "samples", None)
    if not isinstance(samples, list) or not samples:
        return None
    head = samples[: min(len(samples), 8)]
    if not all(isinstance(s, tuple) and len(s) == 2 and isinstance(s[0], str) and isinstance(s[1], int)
               and is_image_file(s[0]) for s in head):
        return None
    cfg = getattr(task, "cfg", None)
    field = type(cfg).model_fields.get("augment") if cfg is not None else None
    augment = getattr(cfg, "augment", None)
    if augment is None and field is not None and AugmentConfig in getattr(field.annotation, "__args__", ()):
        augment = AugmentConfig()
    if not isinstance(augment, AugmentConfig):
        return None
    return DeviceImages(list(samples), augment)


def _plain_jpeg(data: bytes) -> bool:
    """A baseline/progressive RGB or grayscale JPEG without EXIF rotation: what nvJPEG decodes like PIL."""
    if data[:2] != b"\xff\xd8":
        return False
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:  # header only, no pixels decoded
            return im.mode in ("RGB", "L") and im.getexif().get(0x0112, 1) == 1
    except Exception:  # let the pixel path report the problem
        return False


class EncodedImages(Dataset):
    """(encoded JPEG bytes or decoded HWC pixels, augmentation uniforms, label) per sample.

    Augmentation randomness depends only on (seed, epoch, index), like
    :class:`visionpipe.augment.SeededAugmentation`.
    """

    def __init__(self, samples: list[tuple[str, int]]) -> None:
        self.samples = samples
        self.aug_seed, self.aug_epoch = 0, 0

    def set_epoch(self, epoch: int, seed: int) -> None:
        """Select the augmentation stream of ``epoch``."""
        self.aug_epoch, self.aug_seed = epoch, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        path, label = self.samples[i]
        data = Path(path).read_bytes()
        if _plain_jpeg(data):
            item = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        else:
            pixels = read_image(path)  # HWC uint8, decoded as the ordinary path does
            item = torch.from_numpy(pixels if pixels.flags.writeable else pixels.copy())
        rng = np.random.default_rng(np.random.SeedSequence([self.aug_seed, self.aug_epoch, i]))
        return item, torch.from_numpy(rng.random(_N_PARAMS)), label


def collate_encoded(batch: list[tuple[torch.Tensor, torch.Tensor, int]]) -> tuple[list[torch.Tensor], torch.Tensor,
                                                                               torch.Tensor]:
    """Encoded items stay a list (their lengths differ); uniforms and labels are stacked."""
    items, params, labels = zip(*batch, strict=True)
    return list(items), torch.stack(params), torch.tensor(labels, dtype=torch.long)


def crop_box(height: int, width: int, u: torch.Tensor | list[float], aug: DeviceAugment) -> tuple[int, int, int, int]:
    """(top, left, h, w) of the random resized crop that the uniforms ``u`` select (whole image when off)."""
    u = [float(v) for v in u]
    if aug.crop_p <= 0 or u[2] >= aug.crop_p:
        return 0, 0, height, width
    lo, hi = aug.crop_scale
    area = height * width * (lo + (hi - lo) * u[3])
    lr0, lr1 = math.log(aug.crop_ratio[0]), math.log(aug.crop_ratio[1])
    ratio = math.exp(lr0 + (lr1 - lr0) * u[4])
    w = min(width, max(1, round(math.sqrt(area * ratio))))
    h = min(height, max(1, round(math.sqrt(area / ratio))))
    top = min(height - h, int(u[6] * (height - h + 1)))
    left = min(width - w, int(u[5] * (width - w + 1)))
    return top, left, h, w


class DeviceTransform:
    """Decode a batch from :func:`collate_encoded` on ``device`` and augment it there; returns (images, labels)."""

    def __init__(self, aug: DeviceAugment, device: torch.device, non_blocking: bool = False) -> None:
        self.aug, self.device, self.non_blocking = aug, device, non_blocking
        self.mean = torch.tensor(aug.mean, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(aug.std, device=device).view(1, 3, 1, 1) * 255.0

    def decode(self, items: list[torch.Tensor]) -> list[torch.Tensor]:
        """CHW uint8 images on the device: JPEG bytes decoded there (batched), pixels uploaded."""
        from torchvision.io import ImageReadMode, decode_jpeg

        out: list[torch.Tensor | None] = [None] * len(items)
        jpegs = [i for i, t in enumerate(items) if t.dim() == 1]
        if jpegs:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29+: "use torchcodec"
                decoded = decode_jpeg([items[i] for i in jpegs], mode=ImageReadMode.RGB, device=self.device)
            for i, img in zip(jpegs, decoded, strict=True):
                out[i] = img
        for i, t in enumerate(items):
            if t.dim() == 3:
                t = t if t.shape[-1] == 3 else t[..., None].expand(*t.shape, 3)
                out[i] = t.permute(2, 0, 1).to(self.device, non_blocking=self.non_blocking)
        return out  # type: ignore[return-value]

    def __call__(self, batch: tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        items, params, labels = batch
        aug, (h, w) = self.aug, self.aug.size
        images = self.decode(items)
        x = torch.empty(len(images), 3, h, w, device=self.device, dtype=torch.float32)
        for i, img in enumerate(images):
            top, left, ch, cw = crop_box(img.shape[1], img.shape[2], params[i], aug)
            img = img[:, top:top + ch, left:left + cw].float()
            if (ch, cw) != (h, w):  # bilinear without antialiasing, like albumentations' Resize (cv2 INTER_LINEAR)
                img = F.interpolate(img[None], size=(h, w), mode="bilinear", align_corners=False)[0]
            x[i] = img
        if aug.hflip > 0:
            flip = (params[:, 0] < aug.hflip).to(self.device, non_blocking=self.non_blocking)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if aug.vflip > 0:
            flip = (params[:, 1] < aug.vflip).to(self.device, non_blocking=self.non_blocking)
            x = torch.where(flip[:, None, None, None], x.flip(-2), x)
        x = (x - self.mean) / self.std
        return x, labels.to(self.device, non_blocking=self.non_blocking)


class DeviceBatches:
    """A DataLoader of encoded images whose batches come out decoded and augmented on the device."""

    def __init__(self, loader: DataLoader, transform: DeviceTransform) -> None:
        self.loader, self.transform = loader, transform
        self.dataset, self.sampler, self.batch_size = loader.dataset, loader.sampler, loader.batch_size

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.loader:
            yield self.transform(batch)
