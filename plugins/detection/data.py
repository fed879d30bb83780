"""Detection datasets: contiguous labels, clipped boxes, checked images, albumentations with boxes."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from visionpipe.augment import SeededAugmentation, build_transform
from visionpipe.errors import DataError, ImageReadError
from visionpipe.images import BadImage, check_images, read_image
from visionpipe.paths import resolve_under
from visionpipe_plugins.detection.config import DetectionAugmentConfig, LoadConfig
from visionpipe_plugins.detection.formats import (
    RawSplit,
    image_size,
    read_coco,
    read_voc,
    read_yolo,
    yolo_class_names,
)
from visionpipe_plugins.detection.generate import generate_shapes

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


@dataclass
class ImageRecord:
    """One image with boxes (xyxy pixels, clipped), contiguous labels 1..K, crowd flags and areas."""

    path: str
    image_id: int
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    crowd: np.ndarray
    areas: np.ndarray
    file_name: str = ""


@dataclass
class Categories:
    """Contiguous label ``i + 1`` ↔ original category ``ids[i]`` named ``names[i]`` (0 is background)."""

    ids: list[Any]
    names: list[str]
    key_to_label: dict[Any, int] = field(default_factory=dict)


def box_target(boxes: np.ndarray, labels: np.ndarray) -> dict[str, torch.Tensor]:
    """torchvision's target dict (an empty image gets a (0, 4) box tensor)."""
    return {"boxes": torch.as_tensor(np.asarray(boxes, np.float32).reshape(-1, 4)),
            "labels": torch.as_tensor(np.asarray(labels, np.int64).reshape(-1))}


class DetectionDataset(SeededAugmentation, Dataset):
    """(image CHW float 0..1, target dict) pairs; crowd boxes are left out of training targets."""

    def __init__(self, records: list[ImageRecord], transform: A.Compose | None = None, train: bool = False,
                 categories: Categories | None = None) -> None:
        self.records = records
        self.transform = transform
        self.train = train
        self.categories = categories

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        r = self.records[i]
        img = read_image(r.path)
        h, w = img.shape[:2]
        keep = ~r.crowd if self.train else np.ones(len(r.labels), bool)
        boxes = clip_boxes(r.boxes[keep], w, h)
        labels, crowd = r.labels[keep], r.crowd[keep]
        ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, labels, crowd = boxes[ok], labels[ok], crowd[ok]
        if self.transform is not None:
            out = self.augment_sample(self.transform, i, image=img, bboxes=boxes, labels=labels)
            img = out["image"]
            boxes = np.asarray(out["bboxes"], np.float32).reshape(-1, 4)
            labels = np.asarray(out["labels"], np.int64)
            crowd = np.zeros(len(labels), bool)
        x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(255.0)
        target = box_target(boxes, labels)
        target["index"] = torch.tensor(i)
        target["iscrowd"] = torch.as_tensor(crowd.astype(np.int64))
        return x, target


def collate(batch: list[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """A list of images (sizes may differ) and a list of target dicts, as torchvision detectors take them."""
    return [b[0] for b in batch], [b[1] for b in batch]


def clip_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Boxes clipped to the image."""
    b = np.asarray(boxes, np.float32).reshape(-1, 4).copy()
    b[:, 0::2] = b[:, 0::2].clip(0, width)
    b[:, 1::2] = b[:, 1::2].clip(0, height)
    return b


def build_train_transform(cfg: DetectionAugmentConfig) -> A.Compose | None:
    """The augment block's transforms with box parameters (None when there are none)."""
    if not cfg.train:
        return None
    return A.Compose([build_transform(t) for t in cfg.train],
                     bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"], clip=True,
                                              min_visibility=cfg.min_visibility, min_area=cfg.min_area))


# ----------------------------------------------------------------------------- loading


def _read_split(cfg: LoadConfig, root: Path, split: str, classes: list[str] | None) -> RawSplit:
    spec = getattr(cfg, split)
    if cfg.format == "coco":
        if spec.annotations is None:
            raise DataError(f"load.{split}.annotations: the COCO JSON file is required")
        ann = resolve_under(root, spec.annotations, what=f"load.{split}.annotations")
        images = resolve_under(root, spec.images or ".", what=f"load.{split}.images")
        return read_coco(ann, images)
    if cfg.format == "voc":
        return read_voc(root, spec.annotations, spec.images, split)
    return read_yolo(root, spec.annotations, spec.images, split, classes or [])


def _categories(cfg: LoadConfig, raws: dict[str, RawSplit]) -> Categories:
    """Contiguous labels for the union of the splits' categories (or ``load.classes``)."""
    seen: dict[Any, str] = {}
    key_of: dict[str, tuple[Any, str]] = {}  # a name given once in a split → (its key, that split)
    for split, raw in raws.items():
        names = [n for _, n in raw.categories]
        for key, name in raw.categories:
            if key in seen and seen[key] != name:
                raise DataError(f"load.{split}: category {key!r} is named '{name}' here but '{seen[key]}' in "
                                "another split")
            seen.setdefault(key, name)
            if names.count(name) == 1:
                other = key_of.setdefault(name, (key, split))
                if other[0] != key:  # two labels for one class: trained on one, scored on the other
                    raise DataError(f"load.{split}: category '{name}' has id {key!r} here but {other[0]!r} in "
                                    f"load.{other[1]}; give each class the same id in every split")
    keys = sorted(seen, key=lambda k: (str(type(k)), k))
    if cfg.classes and cfg.format != "yolo":
        by_name = {n: k for k, n in seen.items()}
        missing = [c for c in cfg.classes if c not in by_name]
        if missing and cfg.format == "coco":
            raise DataError(f"load.classes: {missing} not among the categories "
                            f"({', '.join(sorted(by_name))})")
        keys = [by_name.get(c, c) for c in cfg.classes]
        seen.update({k: k for k in keys if k not in seen})
    if not keys:
        raise DataError("load: no categories found in the annotations")
    ids = list(keys) if cfg.format == "coco" else list(range(1, len(keys) + 1))
    return Categories(ids, [seen[k] for k in keys], {k: i + 1 for i, k in enumerate(keys)})


def to_records(raw: RawSplit, cats: Categories, split: str,
               cfg: LoadConfig) -> tuple[list[ImageRecord], int, list[BadImage]]:
    """Map keys to labels, clip boxes to the image, drop degenerate boxes.

    Returns the records, the dropped box count, and the images left out because their size
    (needed to clip boxes, when the annotations do not give it) could not be read.
    """
    records: list[ImageRecord] = []
    unreadable: list[BadImage] = []
    dropped, example, unknown = 0, "", 0
    resized: list[str] = []
    for im in raw.images:
        w, h = im.width, im.height
        if im.objects and (w <= 0 or h <= 0):
            try:
                w, h = image_size(im.path)
            except ImageReadError as e:
                unreadable.append(BadImage(e.path, e.reason))
                continue
        elif im.objects and cfg.check_images and cfg.format != "yolo":  # yolo sizes come from the image already
            try:
                size = image_size(im.path)
            except ImageReadError:
                size = (w, h)  # the image check reports it
            if size != (w, h):
                resized.append(f"{im.source}: {im.file_name} is {size[0]}x{size[1]} pixels, annotated {w}x{h}"
                               + (" (EXIF orientation?)" if size == (h, w) else ""))
        boxes, labels, crowd, areas = [], [], [], []
        for o in im.objects:
            label = cats.key_to_label.get(o.key)
            if label is None:
                if cfg.format == "voc" and cfg.classes:
                    raise DataError(f"{im.source}: class '{o.key}' is not in load.classes {cfg.classes}")
                unknown += 1  # a COCO category outside load.classes
                continue
            b = clip_boxes(np.array(o.box), w, h)[0]
            if b[2] - b[0] < cfg.min_box_size or b[3] - b[1] < cfg.min_box_size:
                dropped += 1
                example = example or f"{im.source}: {im.file_name} box {[round(float(v), 1) for v in o.box]}"
                continue
            boxes.append(b)
            labels.append(label)
            crowd.append(o.crowd)
            areas.append(o.area if o.area is not None else float((b[2] - b[0]) * (b[3] - b[1])))
        records.append(ImageRecord(im.path, im.image_id, w, h, np.array(boxes, np.float32).reshape(-1, 4),
                                   np.array(labels, np.int64), np.array(crowd, bool),
                                   np.array(areas, np.float32), im.file_name))
    if dropped:
        log.warning("load.%s: dropped %d degenerate box(es) (narrower or lower than %g px after clipping to the "
                    "image), e.g. %s", split, dropped, cfg.min_box_size, example)
    if resized:
        log.warning("load.%s: %d image(s) are not the size their annotations give, so their boxes may be misplaced or "
                    "dropped, e.g. %s", split, len(resized), resized[0])
    if unknown:
        log.info("load.%s: %d box(es) of categories outside load.classes left out", split, unknown)
    return records, dropped, unreadable


def _check(records: list[ImageRecord], split: str, enabled: bool,
           unreadable: list[BadImage] | None = None) -> tuple[list[ImageRecord], list[BadImage]]:
    """Drop records whose image cannot be decoded; all missing is an error (a wrong images folder).

    ``unreadable``: images already left out by the annotation reader; they count for that error and
    are returned with the bad ones.
    """
    missing = [r.path for r in records if not Path(r.path).is_file()]
    unreadable = unreadable or []
    missing += [b.path for b in unreadable if not Path(b.path).is_file()]
    total = len(records) + len(unreadable)
    if total and len(missing) == total:
        name = next((r.file_name for r in records if r.path == missing[0]), Path(missing[0]).name)
        raise DataError(f"load.{split}: none of its {total} image(s) exist, e.g. {missing[0]} "
                        f"(file_name '{name}'); check load.{split}.images")
    bad = list(unreadable)
    if enabled and records:
        good, more = check_images([r.path for r in records])
        ok = set(good)
        records, bad = [r for r in records if r.path in ok], bad + more
    for b in bad:
        log.warning("load.%s: skipping unreadable image %s: %s", split, b.path, b.reason)
    return records, bad


def dataset_root(cfg: LoadConfig) -> Path:
    """``load.root`` with ``~`` and ``$VARS`` expanded, resolved against the current folder."""
    return Path(os.path.expandvars(cfg.root)).expanduser().resolve()


def load_splits(cfg: LoadConfig) -> tuple[dict[str, list[ImageRecord]], Categories, list[BadImage], list[Path], dict]:
    """Records per split, categories, unreadable images, annotation files used, and counts for the log."""
    root = dataset_root(cfg)
    if cfg.generate is not None and not root.exists():
        generate_shapes(root, cfg.generate)
    if not root.is_dir():
        raise DataError(f"load.root: {root} does not exist")
    classes = list(cfg.classes) if cfg.classes else None
    if cfg.format == "yolo" and classes is None:
        classes = yolo_class_names(root)
        if not classes:
            raise DataError(f"load.classes: required for yolo (or put classes.txt / data.yaml 'names' in {root})")
    raws = {s: _read_split(cfg, root, s, classes) for s in SPLITS if getattr(cfg, s) is not None}
    cats = _categories(cfg, raws)
    records: dict[str, list[ImageRecord]] = {}
    bad_all: list[BadImage] = []
    inputs: list[Path] = []
    stats: dict[str, Any] = {}
    for split, raw in raws.items():
        recs, dropped, unreadable = to_records(raw, cats, split, cfg)
        recs, bad = _check(recs, split, cfg.check_images, raw.skipped + unreadable)
        records[split] = recs
        bad_all += bad
        inputs += raw.files
        stats[split] = {"images": len(recs), "boxes": int(sum(len(r.labels) for r in recs)),
                        "empty": sum(1 for r in recs if len(r.labels) == 0), "degenerate_dropped": dropped}
        log.info("load.%s: %d image(s), %d box(es), %d without boxes (negatives)", split, stats[split]["images"],
                 stats[split]["boxes"], stats[split]["empty"])
    return records, cats, bad_all, inputs, stats
