"""COCO box metrics through pycocotools: AP, AP50, AP75, AP by size, AR, per-class AP and PR curves."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def coco_gt(images: Sequence[dict[str, Any]], categories: Sequence[dict[str, Any]]) -> Any:
    """A pycocotools COCO ground truth from ``images``: ``{id, width, height, boxes, category_ids, iscrowd, areas}``."""
    from visionpipe_plugins.detection.formats import coco_index

    anns, ann_id, imgs = [], 1, []
    for im in images:
        imgs.append({"id": im["id"], "width": im.get("width", 0), "height": im.get("height", 0),
                     "file_name": im.get("file_name", "")})
        areas = im.get("areas")
        for j, (b, c) in enumerate(zip(im["boxes"], im["category_ids"], strict=True)):
            x1, y1, x2, y2 = (float(v) for v in b)
            area = float(areas[j]) if areas is not None and len(areas) > j else (x2 - x1) * (y2 - y1)
            anns.append({"id": ann_id, "image_id": im["id"], "category_id": c, "bbox": [x1, y1, x2 - x1, y2 - y1],
                         "area": area, "iscrowd": int(im["iscrowd"][j]) if "iscrowd" in im else 0})
            ann_id += 1
    return coco_index({"images": imgs, "annotations": anns, "categories": list(categories)})


def to_coco_results(image_id: Any, boxes: np.ndarray, scores: np.ndarray, category_ids: Sequence[Any]) -> list[dict]:
    """COCO results entries (``bbox`` as x, y, w, h) for one image's detections."""
    out = []
    for b, s, c in zip(np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(scores).reshape(-1), category_ids,
                       strict=True):
        x1, y1, x2, y2 = (float(v) for v in b)
        out.append({"image_id": image_id, "category_id": c, "bbox": [round(x1, 3), round(y1, 3),
                    round(x2 - x1, 3), round(y2 - y1, 3)], "score": round(float(s), 5)})
    return out


def coco_evaluate(gt: Any, results: list[dict], class_names: dict[Any, str] | None = None,
                  image_ids: Sequence[Any] | None = None) -> tuple[dict[str, float], dict[str, Any]]:
    """(metrics, extras) of ``results`` against ``gt``; pycocotools' prints are captured, not shown.

    Metrics: AP (IoU .50:.95), AP50, AP75, APs/APm/APl, AR1/AR10/AR100, ARs/ARm/ARl and ``AP/<class>``;
    a value pycocotools reports as -1 (no ground truth of that size) is left out. Extras hold the
    precision–recall curves at IoU 0.5 per class and pycocotools' printed summary.
    """
    from pycocotools.cocoeval import COCOeval

    names = class_names or {c["id"]: c["name"] for c in gt.dataset["categories"]}
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        dt = gt.loadRes(results) if results else None
        if dt is None:  # pycocotools cannot load an empty results list: nothing found scores zero
            wanted = None if image_ids is None else set(image_ids)
            present = {a["category_id"] for a in gt.dataset["annotations"]
                       if not a.get("iscrowd") and (wanted is None or a["image_id"] in wanted)}
            return {k: 0.0 for k in ("AP", "AP50", "AP75")} | {f"AP/{n}": 0.0 for c, n in names.items()
                                                               if c in present}, {"pr": {}, "summary": "no detections"}
        ev = COCOeval(gt, dt, "bbox")
        if image_ids is not None:
            ev.params.imgIds = list(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    metrics: dict[str, float] = {}
    for name, v in zip(STAT_NAMES, ev.stats, strict=False):
        if v >= 0:
            metrics[name] = float(v)
    precision = ev.eval["precision"]  # [T IoUs, R recall steps, K classes, A areas, M max-dets]
    recall_steps = np.asarray(ev.params.recThrs)
    pr: dict[str, tuple[list[float], list[float]]] = {}
    for k, cat_id in enumerate(ev.params.catIds):
        name = names.get(cat_id, str(cat_id))
        p_all = precision[:, :, k, 0, -1]
        valid = p_all[p_all > -1]
        if valid.size:  # no ground truth of this class: no AP (pycocotools' -1)
            metrics[f"AP/{name}"] = float(valid.mean())
        p50 = precision[0, :, k, 0, -1]
        if (p50 > -1).any():
            pr[name] = (recall_steps.tolist(), np.where(p50 > -1, p50, 0.0).tolist())
    return metrics, {"pr": pr, "summary": buf.getvalue()}


def check_coco_results(gt: Any, results: list[Any], source: str, gt_source: str = "the ground truth") -> None:
    """Raise a DataError naming ``source``, the entry and the field of the first malformed results entry.

    Each entry needs ``bbox`` as 4 finite numbers with width and height >= 0, a finite number ``score``,
    and an ``image_id`` and ``category_id`` that the ground truth ``gt`` (a pycocotools COCO, read from
    ``gt_source``) has.
    """
    from visionpipe.errors import DataError
    from visionpipe_plugins.detection.formats import is_coco_id, is_finite_number

    imgs, cats = set(gt.getImgIds()), set(gt.getCatIds())

    for i, r in enumerate(results):
        at = f"{source}: entry {i}"
        if not isinstance(r, dict):
            raise DataError(f"{at}: must be an object {{image_id, category_id, bbox, score}} (got {str(r)[:80]})")
        for key in ("image_id", "category_id", "bbox", "score"):
            if key not in r:
                raise DataError(f"{at}: {key}: missing")
        for key, known in (("image_id", imgs), ("category_id", cats)):
            v = r[key]
            if not is_coco_id(v) or v not in known:
                raise DataError(f"{at}: {key} {v!r:.40} is not in {gt_source}")
        b = r["bbox"]
        if not isinstance(b, (list, tuple)) or len(b) != 4 or not all(is_finite_number(v) for v in b):
            raise DataError(f"{at}: bbox: must be 4 finite numbers [x, y, width, height] (got {b!r:.80})")
        if b[2] < 0 or b[3] < 0:
            raise DataError(f"{at}: bbox: width and height must be >= 0 (got {b})")
        if not is_finite_number(r["score"]):
            raise DataError(f"{at}: score: must be a finite number (got {r['score']!r:.40})")
