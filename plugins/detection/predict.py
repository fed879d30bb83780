"""Detection predictions: records with boxes in original pixels, drawings, and a COCO results file."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from visionpipe.errors import DataError
from visionpipe.io import write_json
from visionpipe.task import Predictor
from visionpipe_plugins.detection.export import split_detections
from visionpipe_plugins.detection.formats import load_coco_json

log = logging.getLogger(__name__)
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]


class DetectionPredictor(Predictor):
    """Images at their own size; the model resizes and normalizes each one inside, so consecutive images of one
    size run as one batch and get exactly the detections they get alone (models exported before the batch axis
    was dynamic, without ``num_detections``, run one image at a time).

    Options: ``score_threshold`` (records keep detections at or above it; default the model's
    ``box_score_thresh``), ``draw_threshold`` (boxes drawn by ``--save-images``), ``gt`` (a COCO
    annotation file whose image ids the COCO results file should use, and which scores them; it is read and
    checked here, so a bad file fails before any image is predicted).
    """

    batchable = False

    def __init__(self, metadata: dict[str, Any], options: dict[str, Any]) -> None:
        super().__init__(metadata, options)
        self.names: list[str] = metadata["class_names"]
        self.cat_ids: list[Any] = metadata["category_ids"]
        thr = options.get("score_threshold")
        self.score_thr = float(thr if thr is not None else metadata.get("score_threshold", 0.0))
        floor = metadata.get("score_threshold")
        if thr is not None and floor is not None and self.score_thr < float(floor):
            log.warning("score_threshold %g is below the model's box_score_thresh %g: the model has already dropped "
                        "detections under %g (export with a lower model.box_score_thresh to keep them)",
                        self.score_thr, float(floor), float(floor))
        dthr = options.get("draw_threshold")
        self.draw_thr = float(dthr if dthr is not None else metadata.get("draw_threshold", 0.5))
        self.batchable = "num_detections" in metadata.get("outputs", [])
        self.gt: str | None = str(options["gt"]) if options.get("gt") else None
        # read and checked now, so that a bad file fails before any image is predicted
        self._gt_data: dict[str, Any] | None = load_coco_json(Path(self.gt)) if self.gt else None
        if self._gt_data is not None:
            self._check_gt_categories(self._gt_data)

    def _check_gt_categories(self, data: dict[str, Any]) -> None:
        """The ground truth must know the model's category ids (else every detection is silently ignored)."""
        gt_names = {c["id"]: str(c["name"]) for c in data["categories"]}
        if not any(c in gt_names for c in self.cat_ids):
            raise DataError(f"{self.gt}: none of the model's category ids ({', '.join(map(repr, self.cat_ids[:12]))}) "
                            f"is among the file's categories ({', '.join(map(repr, list(gt_names)[:12]))}); scoring would "
                            "ignore every detection")
        clash = [f"{c!r} is '{n}' in the model, '{gt_names[c]}' there" for c, n in zip(self.cat_ids, self.names,
                                                                                    strict=True)
                 if c in gt_names and gt_names[c] != n]
        if clash:
            log.warning("%s: category ids name other classes than the model's: %s", self.gt, "; ".join(clash[:4]))

    def __getstate__(self) -> dict[str, Any]:
        """What decoder processes get: not the ground truth (only the main process scores)."""
        return {**self.__dict__, "_gt_data": None}

    def preprocess(self, image: np.ndarray) -> tuple[dict[str, np.ndarray], Any]:
        x = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)
        return {"images": x}, image.shape[:2]

    def postprocess(self, outputs: list[np.ndarray], state: Any) -> dict[str, Any]:
        boxes, labels, scores = split_detections([np.asarray(o)[None] for o in outputs])[0]
        keep = scores >= self.score_thr
        boxes, labels, scores = boxes.reshape(-1, 4)[keep], labels[keep], scores[keep]
        h, w = state
        idx = [int(k) - 1 for k in labels]
        return {"width": int(w), "height": int(h),
                "boxes": [[round(float(v), 2) for v in b] for b in boxes],
                "labels": [self.names[i] if 0 <= i < len(self.names) else str(i + 1) for i in idx],
                "category_ids": [self.cat_ids[i] if 0 <= i < len(self.cat_ids) else i + 1 for i in idx],
                "scores": [round(float(s), 5) for s in scores]}

    def draw(self, image: np.ndarray, record: dict[str, Any]) -> np.ndarray:
        out = image.copy()
        scale = max(out.shape[:2]) / 400
        thick = max(1, round(2 * scale))
        font = max(0.35, 0.5 * scale)
        for b, name, s in zip(record["boxes"], record["labels"], record["scores"], strict=True):
            if s < self.draw_thr:
                continue
            color = PALETTE[self.names.index(name) % len(PALETTE)] if name in self.names else (255, 255, 255)
            x1, y1, x2, y2 = (round(v) for v in b)
            cv2.rectangle(out, (x1, y1), (x2, y2), color, thick)
            text = f"{name} {s:.2f}"
            (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font, 1)
            ty = y1 - 2 if y1 - th - base - 2 >= 0 else y1 + th + 2
            tx = max(0, min(x1, out.shape[1] - tw - 3))  # keep the label inside the image
            cv2.rectangle(out, (tx, ty - th - base + 1), (tx + tw + 2, ty + base - 1), color, -1)
            cv2.putText(out, text, (tx + 1, ty - 1), cv2.FONT_HERSHEY_SIMPLEX, font, (0, 0, 0), 1, cv2.LINE_AA)
        return out

    def write_extra(self, out_dir: Path, records: Iterator[dict[str, Any]]) -> list[Path]:
        """coco_results.json (for pycocotools ``loadRes``), coco_images.json (the image ids used) and, when a
        ground truth is known, coco_metrics.json."""
        recs = list(records)
        gt_path, gt_data, ids = self._image_ids([r["path"] for r in recs])
        results, images, unmatched = [], [], 0
        for i, r in enumerate(recs):
            image_id = ids.get(r["path"]) if gt_path else i + 1
            if image_id is None:
                unmatched += 1
                continue
            images.append({"id": image_id, "file_name": r["path"], "width": r["width"], "height": r["height"]})
            for b, c, s in zip(r["boxes"], r["category_ids"], r["scores"], strict=True):
                results.append({"image_id": image_id, "category_id": c,
                                "bbox": [b[0], b[1], round(b[2] - b[0], 2), round(b[3] - b[1], 2)], "score": s})
        out_dir = Path(out_dir)
        written = [out_dir / "coco_results.json", out_dir / "coco_images.json"]
        write_json(written[0], results)
        cats = [{"id": c, "name": n} for c, n in zip(self.cat_ids, self.names, strict=True)]
        write_json(written[1], {"images": images, "annotations": [], "categories": cats,
                                "info": {"image_ids": f"from {gt_path}" if gt_path else "1-based order of "
                                         "predictions.jsonl (no ground truth known)"}})
        if self.options.get("save_images") and recs:
            written.append(self._preview(recs[:16], out_dir / "preview.png"))
        if unmatched:
            log.warning("%d image(s) are not in %s and are left out of coco_results.json", unmatched, gt_path)
        if gt_path and gt_data and images:
            from visionpipe_plugins.detection.formats import coco_index
            from visionpipe_plugins.detection.metrics import coco_evaluate

            gt = coco_index(gt_data)
            metrics, _ = coco_evaluate(gt, results, image_ids=[im["id"] for im in images])
            write_json(out_dir / "coco_metrics.json", {"ground_truth": str(gt_path), "images": len(images),
                                                       **metrics})
            written.append(out_dir / "coco_metrics.json")
            log.info("predictions scored against %s on %d image(s): AP %.3f, AP50 %.3f", gt_path, len(images),
                     metrics.get("AP", 0.0), metrics.get("AP50", 0.0))
        return written

    def _preview(self, recs: list[dict[str, Any]], path: Path) -> Path:
        """A grid of the first drawings (the picture to show someone)."""
        from visionpipe.images import read_image
        from visionpipe.plots import save_image_grid

        drawn, titles = [], []
        for r in recs:
            try:
                drawn.append(self.draw(read_image(r["path"]), r))
            except Exception:  # a file gone since it was predicted: leave it out of the picture
                continue
            titles.append(Path(r["path"]).name)
        save_image_grid(drawn, path, cols=4, titles=titles)
        return path

    def _image_ids(self, paths: list[str]) -> tuple[str | None, dict[str, Any] | None, dict[str, Any]]:
        """(ground-truth file, its checked content, path → image id): from the ``gt`` option, else the
        best-covering split the model was trained with (a file that is gone or no longer loads is skipped)."""
        if self.gt:
            given, data = self.gt, self._gt_data or load_coco_json(Path(self.gt))
            by_suffix = {tuple(Path(str(im["file_name"])).parts): im["id"] for im in data["images"]}
            ids = {}
            for p in paths:
                parts = Path(p).parts
                for k in range(len(parts), 0, -1):
                    if parts[-k:] in by_suffix:
                        ids[p] = by_suffix[parts[-k:]]
                        break
            return given, data, ids
        best: tuple[str | None, dict[str, Any] | None, dict[str, Any]] = (None, None, {})
        wanted = {str(Path(p).resolve()): p for p in paths}
        for entry in self.metadata.get("ground_truth", []):
            ann = Path(entry["annotations"])
            if not ann.is_file():
                continue
            try:
                data = load_coco_json(ann)
            except DataError as e:
                log.warning("not scoring against the training ground truth: %s", e)
                continue
            root = Path(entry["images"])
            ids = {}
            for im in data["images"]:
                full = str((root / str(im["file_name"])).resolve())
                if full in wanted:
                    ids[wanted[full]] = im["id"]
            if len(ids) > len(best[2]):
                best = (str(ann), data, ids)
        return best
