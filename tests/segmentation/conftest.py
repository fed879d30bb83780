"""Tiny segmentation datasets written the way users keep them: index PNGs, palette PNGs, lists, COCO."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CLASSES = ["background", "red", "blue"]
COLORS = {1: (230, 30, 30), 2: (30, 30, 230)}


def make_pair(rng: np.random.Generator, h: int = 24, w: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """An image with a red rectangle on the left and a blue one on the right, and its mask (0, 1, 2)."""
    img = rng.integers(90, 140, (h, w, 3)).astype(np.uint8)
    mask = np.zeros((h, w), np.uint8)
    y0, y1 = int(rng.integers(0, h // 3)), int(rng.integers(2 * h // 3, h))
    mask[y0:y1, 2: w // 2 - 2] = 1
    mask[y0:y1, w // 2 + 2: w - 2] = 2
    for cls, color in COLORS.items():
        img[mask == cls] = color
    return img, mask


def save_mask(path: Path, mask: np.ndarray, palette: bool) -> None:
    """Write ``mask`` as an index PNG (mode L) or a palette PNG (mode P, VOC-like colours)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(mask, mode="L")
    if palette:
        im = im.convert("P")
        im.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (768 - 9))
    im.save(path)


def make_mask_folder(root: Path, *, n_train: int = 6, n_val: int = 3, palette: bool = False, seed: int = 0,
                     size: tuple[int, int] = (24, 32)) -> Path:
    """root/{train,val}/{images,masks}/NNN.png."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            img, mask = make_pair(rng, *size)
            (root / split / "images").mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / split / "images" / f"{i:03d}.png")
            save_mask(root / split / "masks" / f"{i:03d}.png", mask, palette)
    return root


@pytest.fixture
def index_data(tmp_path: Path) -> Path:
    """A tiny dataset with index (mode L) masks."""
    return make_mask_folder(tmp_path / "idx")


@pytest.fixture
def palette_data(tmp_path: Path) -> Path:
    """A tiny dataset with palette (mode P) masks."""
    return make_mask_folder(tmp_path / "pal", palette=True)


def make_coco(root: Path, n: int = 3, seed: int = 0) -> tuple[Path, list[np.ndarray]]:
    """root/images/*.png and root/ann.json with one polygon, one compressed RLE and one uncompressed RLE
    annotation per image (plus a crowd box); returns the json and the masks they must render to."""
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(seed)
    h, w = 24, 32
    images, anns, expected = [], [], []
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, _ = make_pair(rng, h, w)
        Image.fromarray(img).save(root / "images" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": h, "width": w})
        exp = np.zeros((h, w), np.uint8)
        # polygon: a rectangle covering pixels x 2..9, y 2..9 -> category 7 ("red", class 1)
        anns.append({"id": 10 * i + 1, "image_id": i + 1, "category_id": 7, "iscrowd": 0,
                     "segmentation": [[2, 2, 10, 2, 10, 10, 2, 10]]})
        poly = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([[2, 2, 10, 2, 10, 10, 2, 10]], h, w)))
        exp[poly.astype(bool)] = 1
        # compressed RLE -> category 9 ("blue", class 2)
        m = np.zeros((h, w), np.uint8, order="F")
        m[12:20, 14:26] = 1
        rle = mask_utils.encode(np.asfortranarray(m))
        anns.append({"id": 10 * i + 2, "image_id": i + 1, "category_id": 9, "iscrowd": 0,
                     "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")}})
        exp[m.astype(bool)] = 2
        # uncompressed RLE (column-major run lengths) -> "red": the column x=30, y 0..23
        u = np.zeros((h, w), np.uint8)
        u[:, 30] = 1
        counts = [30 * h, h, w * h - 31 * h]
        anns.append({"id": 10 * i + 3, "image_id": i + 1, "category_id": 7, "iscrowd": 0,
                     "segmentation": {"size": [h, w], "counts": counts}})
        exp[u.astype(bool)] = 1
        # a crowd region -> ignore_index
        c = np.zeros((h, w), np.uint8, order="F")
        c[20:24, 0:4] = 1
        crle = mask_utils.encode(np.asfortranarray(c))
        anns.append({"id": 10 * i + 4, "image_id": i + 1, "category_id": 9, "iscrowd": 1,
                     "segmentation": {"size": [h, w], "counts": crle["counts"].decode("ascii")}})
        exp[c.astype(bool)] = 255
        expected.append(exp)
    cats = [{"id": 9, "name": "blue"}, {"id": 7, "name": "red"}]
    ann = root / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return ann, expected
