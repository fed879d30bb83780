"""Segmentation datasets: image + mask pairs from folders, list files or COCO, checked before training."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from visionpipe.augment import SeededAugmentation
from visionpipe.errors import ConfigError, DataError, ImageReadError, VisionpipeError
from visionpipe.images import IMAGE_EXTENSIONS, BadImage, iter_image_files, read_image
from visionpipe.paths import resolve_under
from visionpipe_plugins.segmentation.coco import CocoImage, read_coco, render_mask
from visionpipe_plugins.segmentation.config import LoadConfig
from visionpipe_plugins.segmentation.generate import generate_shapes
from visionpipe_plugins.segmentation.masks import mask_palette, read_mask, voc_palette

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One image and where its mask comes from: a mask file or a COCO image entry."""

    image: str
    mask: str | None = None
    coco: CocoImage | None = None

    def describe_mask(self) -> str:
        """The mask's file, or the annotation file it is rendered from."""
        return self.mask or (f"{self.coco.source} (for {self.image})" if self.coco else "?")


def load_mask(sample: Sample, ignore_index: int) -> np.ndarray:
    """The class-index mask of ``sample`` (read from its PNG or rendered from COCO shapes)."""
    if sample.coco is not None:
        return render_mask(sample.coco, ignore_index)
    return read_mask(sample.mask)


def check_labels(mask: np.ndarray, num_classes: int, ignore_index: int, where: str) -> None:
    """Raise DataError when ``mask`` holds values that are neither a class nor ``ignore_index``."""
    bad = (mask >= num_classes) & (mask != ignore_index)
    if bad.any():
        vals = sorted(int(v) for v in np.unique(mask[bad]))[:5]
        raise DataError(f"{where}: mask values {vals} are neither a class index (0..{num_classes - 1}) nor "
                        f"ignore_index {ignore_index}; check load.classes / load.ignore_index")


class SegmentationDataset(SeededAugmentation, Dataset):
    """(image tensor CHW float, mask tensor HW long) pairs; ``transform`` is an albumentations Compose."""

    def __init__(self, samples: list[Sample], num_classes: int, ignore_index: int = 255,
                 transform: Any = None) -> None:
        self.samples = samples
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def raw(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Decoded image (HxWx3 uint8) and mask (HxW uint8) before any transform; sizes checked."""
        s = self.samples[i]
        img = read_image(s.image)
        mask = load_mask(s, self.ignore_index)
        if img.shape[:2] != mask.shape[:2]:
            raise DataError(f"{s.image}: image is {img.shape[1]}x{img.shape[0]} but its mask {s.describe_mask()} "
                            f"is {mask.shape[1]}x{mask.shape[0]} (width x height); they must match")
        check_labels(mask, self.num_classes, self.ignore_index, s.describe_mask())
        return img, mask

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img, mask = self.raw(i)
        if self.transform is not None:
            out = self.augment_sample(self.transform, i, image=img, mask=mask)
            img, mask = out["image"], out["mask"]
        x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float()
        return x, torch.from_numpy(mask.astype(np.int64))


# ----------------------------------------------------------------------------- scanning


def _find_image(folder: Path, stem: str) -> Path | None:
    for ext in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS):
        p = folder / f"{stem}{ext}"
        if p.is_file():
            return p
    return None


def scan_mask_folder(split_dir: Path, cfg: LoadConfig, split: str) -> list[Sample]:
    """Pairs of split_dir/<image_dir>/X.* and split_dir/<mask_dir>/X<mask_suffix>; a missing mask is an error."""
    image_name, mask_name = cfg.split_dirs(split)
    image_dir = resolve_under(split_dir, image_name, what=f"load.image_dir ({split})")
    mask_dir = resolve_under(split_dir, mask_name, what=f"load.mask_dir ({split})")
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: images folder of split '{split}' not found "
                        f"(expected {split_dir}/{image_name} and {split_dir}/{mask_name})")
    samples = []
    for img in iter_image_files(image_dir):
        rel = img.relative_to(image_dir)
        mask = mask_dir / rel.parent / f"{img.stem}{cfg.mask_suffix}"
        if not mask.is_file():
            raise DataError(f"{img}: no mask for this image (expected {mask})")
        samples.append(Sample(str(img), str(mask)))
    if not samples:
        raise DataError(f"{image_dir}: no images in split '{split}'")
    return samples


def scan_mask_list(list_file: Path, root: Path, cfg: LoadConfig, split: str) -> list[Sample]:
    """Pairs named by a list of stems (Pascal VOC ImageSets style); images and masks under root."""
    if not list_file.is_file():
        raise DataError(f"{list_file}: list file of split '{split}' not found")
    image_name, mask_name = cfg.split_dirs(split)
    image_dir = resolve_under(root, image_name, what="load.image_dir")
    mask_dir = resolve_under(root, mask_name, what="load.mask_dir")
    samples = []
    for lineno, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), 1):
        stem = line.strip().split()[0] if line.strip() else ""
        if not stem or stem.startswith("#"):
            continue
        img = _find_image(resolve_under(image_dir, Path(stem).parent, what=f"{list_file.name}:{lineno}"),
                          Path(stem).name)
        if img is None:
            raise DataError(f"{list_file}:{lineno}: no image '{stem}.*' in {image_dir}")
        mask = resolve_under(mask_dir, f"{stem}{cfg.mask_suffix}", what=f"{list_file.name}:{lineno}")
        if not mask.is_file():
            raise DataError(f"{img}: no mask for this image (expected {mask}; listed in {list_file}:{lineno})")
        samples.append(Sample(str(img), str(mask)))
    if not samples:
        raise DataError(f"{list_file}: no entries")
    return samples


def _decode_error(path: str) -> str | None:
    """Why PIL cannot decode ``path`` (missing, not an image, corrupt), or None when it can."""
    try:
        with Image.open(path) as im:
            im.load()
    except FileNotFoundError:
        return "file not found"
    except Exception as e:  # any decoder failure: the file is unusable
        return f"{type(e).__name__}: {e}"
    return None


def check_pairs(samples: list[Sample], workers: int | None = None, num_classes: int | None = None,
                ignore_index: int = 255) -> tuple[list[Sample], list[BadImage], int]:
    """Decode every image and mask once; skip pairs with an unreadable file; raise DataError for wrong masks.

    A wrong mask is one of another size than its image, a colour image, or (given ``num_classes``)
    one with values that are neither a class nor ``ignore_index``. Also returns the largest class
    label in the good pairs' mask files (-1 when none), from which classes can be inferred.
    """
    workers = workers or min(8, (os.cpu_count() or 2) * 2)

    def probe(s: Sample) -> tuple[BadImage | str | None, int]:
        """(None, or why the pair is skipped (BadImage) or wrong (str); the mask file's largest label)."""
        hi = -1
        try:
            img = read_image(s.image)
        except ImageReadError as e:
            return BadImage(s.image, e.reason), hi
        if s.coco:
            h, w = s.coco.height, s.coco.width
        else:
            try:
                mask = read_mask(s.mask)
            except DataError as e:
                why = _decode_error(s.mask)
                if why is None:  # it decodes, so the content is wrong (e.g. a colour image): an error
                    return str(e), hi
                return BadImage(s.mask, f"cannot read mask ({why}); its image {s.image} is left out"), hi
            h, w = mask.shape[:2]
            if num_classes is not None and (h, w) == img.shape[:2]:
                try:
                    check_labels(mask, num_classes, ignore_index, s.describe_mask())
                except DataError as e:
                    return str(e), hi
            labels = mask[mask != ignore_index]
            hi = int(labels.max()) if labels.size else -1
        if (h, w) != img.shape[:2]:
            return (f"{s.image}: image is {img.shape[1]}x{img.shape[0]} but its mask {s.describe_mask()} is "
                    f"{w}x{h} (width x height); image and mask sizes must match"), hi
        return None, hi

    good, bad, wrong = [], [], []
    largest = -1
    with ThreadPoolExecutor(workers) as pool:
        for s, (res, hi) in zip(samples, pool.map(probe, samples), strict=True):
            if res is None:
                good.append(s)
                largest = max(largest, hi)
            elif isinstance(res, BadImage):
                bad.append(res)
            else:
                wrong.append(res)
    if wrong:
        more = f" (and {len(wrong) - 1} more wrong mask(s))" if len(wrong) > 1 else ""
        raise DataError(f"{wrong[0]}{more}")
    return good, bad, largest


def read_class_file(path: Path) -> list[str]:
    """Class names, one per line (blank lines and # comments skipped)."""
    if not path.is_file():
        raise DataError(f"{path}: classes file not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the file as UTF-8") from None
    first: dict[str, int] = {}
    names = []
    for lineno, ln in enumerate(text.splitlines(), 1):
        name = ln.strip()
        if not name or name.startswith("#"):
            continue
        if name in first:
            raise DataError(f"{path}:{lineno}: class name '{name}' again (first on line {first[name]})")
        first[name] = lineno
        names.append(name)
    if len(names) < 2:
        raise DataError(f"{path}: needs at least 2 class names, one per line (got {len(names)})")
    return names


def largest_label(samples: list[Sample], ignore_index: int) -> int:
    """The largest class label in the masks of ``samples`` (-1 when none); unreadable masks are passed over."""
    hi = -1
    for s in samples:
        try:
            m = load_mask(s, ignore_index)
        except DataError:
            if s.mask and _decode_error(s.mask) is not None:  # unreadable: check_pairs skips and reports it
                continue
            raise
        vals = m[m != ignore_index]
        if vals.size:
            hi = max(hi, int(vals.max()))
    return hi


def inferred_class_names(largest: int) -> list[str]:
    """class_0..class_K for masks whose largest label is K (when no names are given); at least two."""
    n = max(largest + 1, 2)
    log.warning("no load.classes or load.classes_file: %d classes inferred from the masks (largest label %d)",
                n, max(largest, 0))
    return [f"class_{i}" for i in range(n)]


# ----------------------------------------------------------------------------- splits


def load_splits(cfg: LoadConfig) -> tuple[dict[str, list[Sample]], dict[str, Any], list[BadImage], list[Path]]:
    """Samples per split, the data info (class names, palette, ignore_index), skipped images, list files."""
    root = Path(cfg.root).expanduser().resolve()
    if cfg.generate is not None and not root.exists():
        generate_shapes(root, cfg.generate)
    if not root.is_dir():
        raise DataError(f"load.root: {root} does not exist")
    samples: dict[str, list[Sample]] = {}
    inputs: list[Path] = []
    cats: list[dict[str, Any]] | None = None
    for split in ("train", "val", "test"):
        name = getattr(cfg, split)
        if name is None:
            continue
        target = resolve_under(root, name, what=f"load.{split}")
        if cfg.format == "coco":
            image_root = resolve_under(root, cfg.split_dirs(split)[0], what="load.image_dir")
            images, split_cats = read_coco(target, image_root)
            if cats is not None and [c["name"] for c in split_cats] != [c["name"] for c in cats]:
                raise DataError(f"{target}: categories differ from the other splits' ({[c['name'] for c in cats]})")
            cats = split_cats
            samples[split] = [Sample(im.path, None, im) for im in images]
            inputs.append(target)
        elif name.endswith(".txt"):
            samples[split] = scan_mask_list(target, root, cfg, split)
            inputs.append(target)
        else:
            samples[split] = scan_mask_folder(target, cfg, split)
    if not samples:
        raise VisionpipeError("load: no split configured (train/val/test are all null)")

    bad_all: list[BadImage] = []
    checked: set[str] = set()
    classes = _given_class_names(cfg, root, cats, inputs)
    if classes is None:  # named after the largest label of the training masks (of the first split without train)
        first = "train" if "train" in samples else next(iter(samples))
        if cfg.check_images:  # the check decodes every mask anyway: infer from the same pass
            samples[first], bad_all, largest = check_pairs(samples[first], ignore_index=cfg.ignore_index)
            checked.add(first)  # its labels are all <= largest: every one is a class of the inferred ones
        else:
            largest = largest_label(samples[first], cfg.ignore_index)
        classes = inferred_class_names(largest)
    _check_class_names(classes, cats)
    if cfg.ignore_index < len(classes):
        raise ConfigError(f"{cfg.ignore_index} is a class index (classes are 0..{len(classes) - 1}); "
                          f"use a value >= {len(classes)}, e.g. 255", field="load.ignore_index")
    if cfg.check_images:
        for split in [sp for sp in samples if sp not in checked]:
            samples[split], bad, _ = check_pairs(samples[split], num_classes=len(classes),
                                                 ignore_index=cfg.ignore_index)
            bad_all += bad
        for b in bad_all:
            log.warning("skipping unreadable file %s: %s", b.path, b.reason)
    first = next((s.mask for split in samples.values() for s in split if s.mask), None)
    try:
        palette = mask_palette(first, len(classes)) if first else None
    except (OSError, ValueError, SyntaxError):  # an unreadable mask when check_images is off
        palette = None
    palette = palette or voc_palette(len(classes))
    info = {"class_names": classes, "palette": palette, "ignore_index": cfg.ignore_index}
    return samples, info, bad_all, inputs


def _given_class_names(cfg: LoadConfig, root: Path, cats: list[dict[str, Any]] | None,
                       inputs: list[Path]) -> list[str] | None:
    """The class names from the config, its classes file or the COCO categories; None: infer them."""
    if cfg.classes:
        return list(cfg.classes)
    if cfg.classes_file:
        path = resolve_under(root, cfg.classes_file, what="load.classes_file")
        inputs.append(path)
        return read_class_file(path)
    if cats is not None:
        return [cfg.coco_background] + [str(c["name"]) for c in cats]
    return None


def _check_class_names(names: list[str], cats: list[dict[str, Any]] | None) -> None:
    if cats is not None and len(names) != len(cats) + 1:
        raise ConfigError(f"{len(names)} names given but the COCO file has {len(cats)} categories + background",
                          field="load.classes")
    if len(set(names)) != len(names):
        dup = next(n for i, n in enumerate(names) if n in names[:i])
        raise ConfigError(f"class name '{dup}' appears twice in {names}", field="load.classes")
