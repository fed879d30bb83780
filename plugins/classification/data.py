"""Classification datasets: ImageFolder trees and CSV lists, checked before training."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from visionpipe.augment import SeededAugmentation
from visionpipe.errors import DataError, VisionpipeError
from visionpipe.images import BadImage, check_images, iter_image_files, read_image
from visionpipe.paths import resolve_under
from visionpipe.synthetic import (
    SHAPES,
    build_atomically,
    paint,
    random_color,
    shape_mask,
    textured_background,
    write_png,
)

log = logging.getLogger(__name__)
Sample = tuple[str, int]


class ClassificationDataset(SeededAugmentation, Dataset):
    """(image tensor CHW float, label) pairs; ``transform`` is an albumentations Compose."""

    def __init__(self, samples: list[Sample], transform: Any = None) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        img = read_image(path)
        if self.transform is not None:
            img = self.augment_sample(self.transform, i, image=img)["image"]
        t = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float()
        return t, label


def scan_imagefolder(folder: Path) -> dict[str, list[str]]:
    """Class name → image paths (recursive, sorted) for ``folder/<class>/...``."""
    if not folder.is_dir():
        raise DataError(f"{folder}: split folder not found")
    out: dict[str, list[str]] = {}
    for cls_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(str(p) for p in iter_image_files(cls_dir))  # as predict finds them: hidden ones left out
        if files:
            out[cls_dir.name] = files
    if not out:
        raise DataError(f"{folder}: no class sub-folders with images (expected {folder}/<class>/<image>)")
    return out


def read_csv_list(csv_path: Path, root: Path) -> list[tuple[str, str]]:
    """(path, label) rows of a CSV; header optional; paths resolved under ``root`` and refused outside it."""
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: CSV list not found")
    rows = []
    with open(csv_path, newline="", encoding="utf-8") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            if not row or row[0].startswith("#"):
                continue
            if lineno == 1 and [c.strip().lower() for c in row[:2]] == ["path", "label"]:
                continue
            if len(row) < 2:
                raise DataError(f"{csv_path}:{lineno}: expected 'path,label' (got {row!r})")
            p = resolve_under(root, row[0].strip(), what=f"{csv_path.name}:{lineno} path")
            rows.append((str(p), row[1].strip()))
    if not rows:
        raise DataError(f"{csv_path}: no rows")
    return rows


def split_holdout(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Stratified deterministic split of ``samples`` into (train, held-out)."""
    rng = np.random.default_rng(seed)
    by_label: dict[int, list[Sample]] = {}
    for s in samples:
        by_label.setdefault(s[1], []).append(s)
    train, held = [], []
    for label in sorted(by_label):
        items = by_label[label]
        idx = rng.permutation(len(items))
        k = max(1, round(len(items) * fraction)) if len(items) > 1 else 0
        held += [items[i] for i in idx[:k]]
        train += [items[i] for i in idx[k:]]
    return train, held


def check(samples: list[Sample], enabled: bool) -> tuple[list[Sample], list[BadImage]]:
    """Drop samples whose image cannot be decoded; return (good, bad)."""
    if not enabled or not samples:
        return samples, []
    good, bad = check_images([p for p, _ in samples])
    ok = set(good)
    return [s for s in samples if s[0] in ok], bad


def generate_shapes(root: Path, per_class: int, size: int, seed: int) -> None:
    """Write the built-in dataset: root/{train,val,test}/<shape>/NNNN.png (70/15/15)."""

    def build(tmp: Path) -> None:
        rng = np.random.default_rng(seed)
        for ci, kind in enumerate(SHAPES):
            for i in range(per_class):
                split = "train" if i < per_class * 0.7 else ("val" if i < per_class * 0.85 else "test")
                img = textured_background(size, size, rng, clutter=0.5)
                s = rng.uniform(0.35, 0.8) * size
                cx, cy = rng.uniform(s / 2, size - s / 2, size=2)
                m = shape_mask(kind, size, size, cx, cy, s, rng.uniform(0, np.pi))
                paint(img, m, random_color(rng, img.reshape(-1, 3).mean(0)), rng)
                write_png(tmp / split / kind / f"{ci}{i:05d}.png", img)

    log.info("generating the built-in shapes dataset at %s (%d images)", root, per_class * len(SHAPES))
    build_atomically(root, build)


def load_splits(cfg: Any, seed: int) -> tuple[dict[str, list[Sample]], list[str], list[BadImage], list[Path]]:
    """Samples per split, class names, unreadable images, and list files used."""
    root = Path(cfg.root).expanduser().resolve()
    if cfg.generate is not None and not root.exists():
        generate_shapes(root, cfg.generate.per_class, cfg.generate.image_size, cfg.generate.seed)
    if not root.is_dir():
        raise DataError(f"load.root: {root} does not exist")
    raw: dict[str, list[tuple[str, str]]] = {}
    inputs: list[Path] = []
    for split in ("train", "val", "test"):
        name = getattr(cfg, split)
        if name is None:
            continue
        if cfg.format == "imagefolder":
            folder = resolve_under(root, name, what=f"load.{split}")
            if not folder.is_dir():
                hint = {"train": " (class folders right under root, without split folders: set train: '.' and "
                                 "val_split: 0.2)", "val": " (or set val_split: 0.2 to hold out part of train)"}
                raise DataError(f"load.{split}: {folder}: split folder not found{hint.get(split, '')}")
            tree = scan_imagefolder(folder)
            raw[split] = [(p, c) for c, ps in tree.items() for p in ps]
        else:
            csv_path = resolve_under(root, name, what=f"load.{split}")
            raw[split] = read_csv_list(csv_path, root)
            inputs.append(csv_path)
    if "train" not in raw and "val" not in raw and "test" not in raw:
        raise VisionpipeError("load: no split configured (train/val/test are all null)")
    classes = list(cfg.classes) if cfg.classes else sorted({c for rows in raw.values() for _, c in rows})
    index = {c: i for i, c in enumerate(classes)}
    samples: dict[str, list[Sample]] = {}
    for split, rows in raw.items():
        unknown = sorted({c for _, c in rows if c not in index})
        if unknown:
            raise DataError(f"load.{split}: labels {unknown[:5]} are not in load.classes {classes}")
        samples[split] = [(p, index[c]) for p, c in rows]
    if "val" not in samples and cfg.val_split > 0 and "train" in samples:
        samples["train"], samples["val"] = split_holdout(samples["train"], cfg.val_split, seed)
    bad_all: list[BadImage] = []
    for split in list(samples):
        samples[split], bad = check(samples[split], cfg.check_images)
        bad_all += bad
        for b in bad:
            log.warning("skipping unreadable image %s: %s", b.path, b.reason)
    for split, items in samples.items():
        have = {label for _, label in items}
        missing = [c for i, c in enumerate(classes) if i not in have]
        if missing and items:
            log.warning("load.%s: no image of class %s in this split%s", split, ", ".join(map(repr, missing[:10])),
                        " (the model cannot learn it)" if split == "train" else " (its metrics leave it out)")
    return samples, classes, bad_all, inputs
