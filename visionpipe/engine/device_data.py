"""``train.decode: device``: workers read JPEG bytes; decoding and augmentation run on the training device.

On CUDA the JPEGs of a batch are decoded together by nvJPEG (``torchvision.io.decode_jpeg(...,
device="cuda")``), then cropped, resized, flipped and normalized with torch ops on the GPU, so
CPU cores no longer cap a fast GPU. On CPU the same code decodes with libjpeg-turbo, which is
how CI tests it against the ordinary path (the task's albumentations transforms in workers).

Scope: image-label datasets (torchvision ImageFolder's ``samples`` of (path, class index)) with
the core ``augment`` block, whose train list may hold only the transforms in :data:`SUPPORTED`.
Files that are not plain JPEGs (PNG, CMYK, EXIF-rotated) are decoded in the worker exactly as
the ordinary path does and uploaded as pixels.

A JPEG the device decoder rejects is decoded again on the CPU by :func:`visionpipe.images.read_image`;
a file that cannot be read at all is reported (log, and ``data_errors.jsonl`` when the transform
is given that file) and left out of its batch, so one bad file never stops a run.
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import os
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
from visionpipe.errors import ImageReadError, VisionpipeError
from visionpipe.images import is_image_file, read_image
from visionpipe.io import append_jsonl

log = logging.getLogger(__name__)

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
    train: bool = False

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
        return cls(size=tuple(cfg.image_size), mean=tuple(cfg.mean), std=tuple(cfg.std), train=train, **kw)


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


Item = torch.Tensor | str
"""Encoded JPEG bytes (1-D), decoded HWC pixels (3-D), or why the file could not be read."""


class EncodedImages(Dataset):
    """(encoded JPEG bytes, decoded HWC pixels or the read error; augmentation uniforms; label; path) per sample.

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

    def __getitem__(self, i: int) -> tuple[Item, torch.Tensor, int, str]:
        path, label = self.samples[i]
        try:
            data = Path(path).read_bytes()
        except OSError:
            data = b""  # read_image says why
        item: Item
        if _plain_jpeg(data):
            item = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        else:
            try:
                pixels = read_image(path)  # HWC uint8, decoded as the ordinary path does
                item = torch.from_numpy(pixels if pixels.flags.writeable else pixels.copy())
            except ImageReadError as e:
                item = e.reason
        rng = np.random.default_rng(np.random.SeedSequence([self.aug_seed, self.aug_epoch, i]))
        return item, torch.from_numpy(rng.random(_N_PARAMS)), label, path


Batch = tuple[list[Item], torch.Tensor, torch.Tensor, list[str]]
"""What :func:`collate_encoded` makes: items, uniforms [B, 7], labels [B], paths."""


def collate_encoded(batch: list[tuple[Item, torch.Tensor, int, str]]) -> Batch:
    """Encoded items and paths stay lists (item lengths differ); uniforms and labels are stacked."""
    items, params, labels, paths = zip(*batch, strict=True)
    return list(items), torch.stack(params), torch.tensor(labels, dtype=torch.long), list(paths)


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
    """Decode a batch from :func:`collate_encoded` on ``device`` and augment it there; returns (images, labels).

    Unreadable files are reported once each: a warning, and a ``{"path", "error"}`` line in
    ``errors_file`` (the run's ``data_errors.jsonl``) if given. Evaluation leaves them out of the batch;
    training puts readable images of the same batch in their place (with their labels), so batches
    keep the size they have on the ordinary path. A batch with no readable file comes out empty.
    """

    def __init__(self, aug: DeviceAugment, device: torch.device, non_blocking: bool = False,
                 errors_file: str | os.PathLike | None = None) -> None:
        self.aug, self.device, self.non_blocking = aug, device, non_blocking
        self.errors_file = errors_file
        self.reported: set[str] = set()
        self.mean = torch.tensor(aug.mean, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(aug.std, device=device).view(1, 3, 1, 1) * 255.0

    def report(self, path: str, reason: str) -> None:
        """Log an unreadable file and add it to ``errors_file``, once per file."""
        if path in self.reported:
            return
        self.reported.add(path)
        log.warning("train.decode: device: skipping unreadable image %s: %s", path, reason)
        if self.errors_file is not None:
            with open(self.errors_file, "a", encoding="utf-8") as f:
                append_jsonl(f, {"path": path, "error": reason})

    def _decode_jpegs(self, data: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Decode on the device, all at once; when that fails, one at a time (None for each that fails)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29+: "use torchcodec"
            try:
                return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
            except RuntimeError:
                pass
            out: list[torch.Tensor | None] = []
            for d in data:
                try:
                    out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    out.append(None)
            return out

    def decode(self, items: list[Item], paths: list[str] | None = None) -> list[torch.Tensor | None]:
        """CHW uint8 images on the device: JPEG bytes decoded there (batched), pixels uploaded.

        A JPEG the device cannot decode is read on the CPU as the ordinary path reads it; None marks a
        file that cannot be read at all (reported).
        """
        paths = paths or [f"batch item {i}" for i in range(len(items))]
        out: list[torch.Tensor | None] = [None] * len(items)
        jpegs = [i for i, t in enumerate(items) if isinstance(t, torch.Tensor) and t.dim() == 1]
        if jpegs:
            for i, img in zip(jpegs, self._decode_jpegs([items[i] for i in jpegs]), strict=True):
                if img is None:  # e.g. corrupt data, or a JPEG nvJPEG does not support
                    try:
                        items[i] = torch.from_numpy(read_image(paths[i]).copy())
                        log.info("decoded %s on the CPU: the %s JPEG decoder rejected it", paths[i],
                                 self.device.type)
                    except ImageReadError as e:
                        items[i] = e.reason
                out[i] = img
        for i, t in enumerate(items):
            if isinstance(t, str):
                self.report(paths[i], t)
            elif t.dim() == 3:
                t = t if t.shape[-1] == 3 else t[..., None].expand(*t.shape, 3)
                out[i] = t.permute(2, 0, 1).to(self.device, non_blocking=self.non_blocking)
        return out

    def __call__(self, batch: Batch | tuple[list[Item], torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor,
                                                                                            torch.Tensor]:
        items, params, labels = batch[:3]
        paths = batch[3] if len(batch) > 3 else None
        aug, (h, w) = self.aug, self.aug.size
        decoded = self.decode(list(items), paths)
        keep = [i for i, img in enumerate(decoded) if img is not None]
        if keep and len(keep) < len(decoded) and aug.train:  # readable images, in turn, fill the gaps
            stand_in = itertools.cycle(keep)
            keep = [i if img is not None else next(stand_in) for i, img in enumerate(decoded)]
            labels = labels[keep]  # each place keeps its own augmentation uniforms
        elif len(keep) < len(decoded):
            params, labels = params[keep], labels[keep]
        images = [decoded[i] for i in keep]
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
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # the last good training batch, across epochs

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Decoded batches; a batch of only unreadable files is skipped (evaluation) or repeats the last good one.

        In training the repeat keeps the step count, which distributed ranks must agree on (only a
        run whose very first batch is all unreadable takes one step fewer).
        """
        train = self.transform.aug.train
        for batch in self.loader:
            x, y = self.transform(batch)
            if len(y):
                if train:
                    self._last = (x, y)
            elif train and self._last is not None:
                x, y = self._last
            else:
                continue
            yield x, y
