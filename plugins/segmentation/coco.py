"""COCO instance annotations (polygons, RLE) rendered to semantic masks with pycocotools."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from visionpipe.errors import DataError
from visionpipe.paths import resolve_under


@dataclass
class CocoImage:
    """One image of a COCO file: where it is, its size, and its (class index, segmentation, crowd) shapes."""

    path: str
    height: int
    width: int
    shapes: list[tuple[int, Any, bool]] = field(default_factory=list)
    source: str = ""


def read_coco(json_path: Path, image_root: Path) -> tuple[list[CocoImage], list[dict[str, Any]]]:
    """Images (with their shapes, class index = category rank + 1) and the categories sorted by id."""
    if not json_path.is_file():
        raise DataError(f"{json_path}: COCO annotation file not found")
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{json_path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{json_path}: not a COCO file (no 'images' list)")
    cats = sorted(data.get("categories") or [], key=lambda c: c["id"])
    if not cats:
        raise DataError(f"{json_path}: no 'categories'")
    cat_index = {c["id"]: i + 1 for i, c in enumerate(cats)}
    images: dict[Any, CocoImage] = {}
    for im in data["images"]:
        try:
            p = resolve_under(image_root, im["file_name"], what=f"{json_path.name}: image {im.get('id')}")
            images[im["id"]] = CocoImage(str(p), int(im["height"]), int(im["width"]), source=str(json_path))
        except KeyError as e:
            raise DataError(f"{json_path}: image entry {im!r} lacks {e}") from None
    for a in data.get("annotations") or []:
        img = images.get(a.get("image_id"))
        if img is None:
            raise DataError(f"{json_path}: annotation {a.get('id')} refers to unknown image_id {a.get('image_id')}")
        if a.get("category_id") not in cat_index:
            raise DataError(f"{json_path}: annotation {a.get('id')} has unknown category_id {a.get('category_id')}")
        if not a.get("segmentation"):
            continue
        img.shapes.append((cat_index[a["category_id"]], a["segmentation"], bool(a.get("iscrowd", 0))))
    return list(images.values()), cats


def segmentation_to_mask(seg: Any, height: int, width: int) -> np.ndarray:
    """HxW uint8 0/1 mask of one COCO segmentation (polygon list, uncompressed or compressed RLE)."""
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):  # polygons
        polys = [p for p in seg if len(p) >= 6]
        if not polys:
            return np.zeros((height, width), np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(seg, height, width)
    elif isinstance(seg, dict):  # compressed RLE
        rle = dict(seg)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    else:
        raise ValueError(f"unsupported segmentation {type(seg).__name__}")
    m = mask_utils.decode(rle)
    return m[..., 0] if m.ndim == 3 else m


def render_mask(img: CocoImage, ignore_index: int) -> np.ndarray:
    """The semantic mask of one image: larger shapes first so small ones stay visible; crowds ignored."""
    out = np.zeros((img.height, img.width), np.uint8)
    drawn = []
    for cls, seg, crowd in img.shapes:
        try:
            m = segmentation_to_mask(seg, img.height, img.width).astype(bool)
        except Exception as e:
            raise DataError(f"{img.source}: bad segmentation for {img.path}: {e}") from None
        drawn.append((int(m.sum()), cls, m, crowd))
    for _, cls, m, crowd in sorted(drawn, key=lambda t: (not t[3], -t[0])):
        out[m] = ignore_index if crowd else cls
    return out
