"""The built-in detection dataset: shapes on textured backgrounds, boxes from their exact masks, COCO format."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from visionpipe.synthetic import (
    build_atomically,
    paint,
    random_color,
    shape_mask,
    textured_background,
    write_png,
)
from visionpipe_plugins.detection.config import GenerateConfig

log = logging.getLogger(__name__)


def _place(rng: np.random.Generator, size: int, cfg: GenerateConfig, kind: str,
           taken: np.ndarray) -> np.ndarray | None:
    """A mask for one shape that does not touch shapes already placed (None after 30 tries)."""
    lo, hi = cfg.object_size
    for _ in range(30):
        s = rng.uniform(lo, hi) * size
        cx, cy = rng.uniform(s / 2, size - s / 2, size=2)
        m = shape_mask(kind, size, size, cx, cy, s, rng.uniform(0, np.pi))
        if m.sum() >= 16 and not (m.astype(bool) & taken).any():
            return m
    return None


def make_image(rng: np.random.Generator, cfg: GenerateConfig) -> tuple[np.ndarray, list[dict]]:
    """One image and its objects ``{"class": i, "bbox": [x, y, w, h], "area": pixels}``."""
    size = cfg.image_size
    img = textured_background(size, size, rng, clutter=cfg.clutter)
    objects: list[dict] = []
    if rng.random() < cfg.empty_fraction:
        return img, objects
    taken = np.zeros((size, size), bool)
    bg = img.reshape(-1, 3).mean(0)
    for _ in range(int(rng.integers(cfg.objects[0], cfg.objects[1] + 1))):
        ci = int(rng.integers(len(cfg.classes)))
        m = _place(rng, size, cfg, cfg.classes[ci], taken)
        if m is None:
            continue
        paint(img, m, random_color(rng, bg), rng)
        sel = m.astype(bool)
        taken |= np.pad(sel, 2)[:-4, 2:-2] | np.pad(sel, 2)[4:, 2:-2] | np.pad(sel, 2)[2:-2, :-4] \
            | np.pad(sel, 2)[2:-2, 4:] | sel  # keep a 2-pixel gap between shapes
        ys, xs = np.nonzero(sel)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        objects.append({"class": ci, "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(sel.sum())})
    return img, objects


def generate_shapes(root: Path, cfg: GenerateConfig) -> Path:
    """Write root/images/{train,val,test}/*.png and root/annotations/{split}.json (COCO), atomically."""

    def build(tmp: Path) -> None:
        rng = np.random.default_rng(cfg.seed)
        categories = [{"id": i + 1, "name": c, "supercategory": "shape"} for i, c in enumerate(cfg.classes)]
        ann_id = 1
        for split, count in (("train", cfg.train), ("val", cfg.val), ("test", cfg.test)):
            images, annotations = [], []
            for i in range(count):
                img, objects = make_image(rng, cfg)
                name = f"{split}/{i:06d}.png"
                write_png(tmp / "images" / name, img)
                images.append({"id": i + 1, "file_name": name, "width": cfg.image_size, "height": cfg.image_size})
                for o in objects:
                    annotations.append({"id": ann_id, "image_id": i + 1, "category_id": o["class"] + 1,
                                        "bbox": o["bbox"], "area": o["area"], "iscrowd": 0})
                    ann_id += 1
            doc = {"info": {"description": f"visionpipe built-in shapes ({split})"}, "images": images,
                   "annotations": annotations, "categories": categories}
            (tmp / "annotations").mkdir(parents=True, exist_ok=True)
            (tmp / "annotations" / f"{split}.json").write_text(json.dumps(doc), encoding="utf-8")

    total = cfg.train + cfg.val + cfg.test
    log.info("generating the built-in detection dataset at %s (%d images, classes %s)", root, total,
             ", ".join(cfg.classes))
    return build_atomically(root, build)
