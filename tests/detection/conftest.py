"""Tiny detection datasets in each layout, written by the tests themselves."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from visionpipe_plugins.detection.config import GenerateConfig
from visionpipe_plugins.detection.generate import generate_shapes


def write_png(path: Path, size: tuple[int, int] = (40, 50), value: int = 120) -> Path:
    """A plain H x W RGB PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((*size, 3), value, np.uint8)
    img[5:15, 5:20] = (250, 30, 30)
    assert cv2.imwrite(str(path), img)
    return path


def coco_doc(images: list[dict], annotations: list[dict], categories: list[dict] | None = None) -> dict:
    """A COCO detection document."""
    return {"images": images, "annotations": annotations,
            "categories": categories or [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]}


def tiny_shapes(root: Path) -> Path:
    """The built-in generator at a tiny size: root/images/{split}/*.png + root/annotations/{split}.json."""
    cfg = GenerateConfig(train=6, val=3, test=3, image_size=48, objects=(1, 2), empty_fraction=0.2, seed=1)
    return generate_shapes(root, cfg)


@pytest.fixture
def shapes_root(tmp_path: Path) -> Path:
    """A tiny shapes dataset (:func:`tiny_shapes`) for one test."""
    return tiny_shapes(tmp_path / "shapes")


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    """A hand-written COCO split: non-contiguous category ids, a crowd box, an empty image, odd boxes."""
    root = tmp_path / "coco"
    write_png(root / "imgs" / "a.png")
    write_png(root / "imgs" / "b.png")
    write_png(root / "imgs" / "sub" / "c.png")
    images = [{"id": 10, "file_name": "a.png", "width": 50, "height": 40},
              {"id": 11, "file_name": "b.png", "width": 50, "height": 40},
              {"id": 12, "file_name": "sub/c.png", "width": 50, "height": 40}]
    anns = [{"id": 1, "image_id": 10, "category_id": 3, "bbox": [5, 5, 15, 10], "area": 150, "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 7, "bbox": [40, 30, 20, 20], "area": 400, "iscrowd": 0},  # clipped
            {"id": 3, "image_id": 10, "category_id": 7, "bbox": [20, 20, 0, 5], "area": 0, "iscrowd": 0},  # degenerate
            {"id": 4, "image_id": 12, "category_id": 7, "bbox": [1, 1, 30, 30], "area": 900, "iscrowd": 1}]
    (root / "train.json").write_text(json.dumps(coco_doc(images, anns)))
    return root
