"""The detection task: what differs from the shared engine, and nothing more."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from visionpipe.errors import VisionpipeError
from visionpipe.io import write_json
from visionpipe.plots import plot_curves
from visionpipe.task import DataBundle, ExportSpec, PredictOption, Predictor, Task
from visionpipe_plugins.detection.config import (
    DETECTION_MODELS,
    DetectionAugmentConfig,
    DetectionConfig,
    DetectionModelConfig,
)
from visionpipe_plugins.detection.data import (
    DetectionDataset,
    build_train_transform,
    collate,
    dataset_root,
    load_splits,
)
from visionpipe_plugins.detection.export import MAX_OPSET, OUTPUTS, ExportedDetector, make_compare, pad_stack
from visionpipe_plugins.detection.metrics import coco_evaluate, coco_gt, to_coco_results
from visionpipe_plugins.detection.models import build_detector
from visionpipe_plugins.detection.predict import DetectionPredictor

log = logging.getLogger(__name__)


class DetectionTask(Task):
    """Object detection with torchvision's Faster R-CNN family; COCO metrics."""

    name = "detection"
    Config = DetectionConfig
    description = "object detection (torchvision Faster R-CNN; COCO, VOC and YOLO data; COCO metrics)"
    monitor = "val/AP50"
    monitor_mode = "max"
    models: ClassVar[dict] = dict.fromkeys(DETECTION_MODELS)
    predict_options: ClassVar[dict[str, PredictOption]] = {
        "score_threshold": PredictOption(None, "records keep detections scoring at least this (default: the model's "
                                                "box_score_thresh)", float, low=0, high=1),
        "draw_threshold": PredictOption(None, "--save-images draws boxes scoring at least this (default 0.5)", float,
                                        records=False, low=0, high=1),
        "gt": PredictOption(None, "COCO annotation file whose image ids coco_results.json uses (and scores against)",
                            str, records=False),
    }

    cfg: DetectionConfig

    # -- load / augment -------------------------------------------------------------------
    def build_data(self) -> DataBundle:
        """Datasets for each split, images checked up front, boxes clipped, labels contiguous."""
        if self.cfg.load is None:
            raise VisionpipeError("detection needs a 'load' block")
        records, cats, bad, inputs, stats = load_splits(self.cfg.load)
        info = {"class_names": cats.names, "category_ids": cats.ids, "data": stats,
                "ground_truth": self._gt_files()}
        bundle = DataBundle(info=info, collate_fn=collate, skipped=bad, inputs=inputs)
        for split, recs in records.items():
            setattr(bundle, split, DetectionDataset(recs, train=split == "train", categories=cats))
        self.augment(bundle)
        return bundle

    def _gt_files(self) -> list[dict[str, str]]:
        """COCO annotation files of the evaluation splits (predict maps image ids through them)."""
        load = self.cfg.load
        if load is None or load.format != "coco":
            return []
        root = dataset_root(load)
        out = []
        for split in ("test", "val", "train"):
            spec = getattr(load, split)
            if spec is not None and spec.annotations:
                out.append({"split": split, "annotations": str(root / spec.annotations),
                            "images": str(root / (spec.images or "."))})
        return out

    def augment(self, data: DataBundle) -> dict[str, Any]:
        """Train transforms (boxes follow) on train; val/test stay as they are."""
        cfg = self.cfg.augment or DetectionAugmentConfig()
        if data.train is not None:
            data.train.transform = build_train_transform(cfg)
        return {"train": [t.get("name") for t in cfg.train]}

    # -- model ----------------------------------------------------------------------------
    def _model_cfg(self) -> DetectionModelConfig:
        return self.cfg.model or DetectionModelConfig()

    def build_model(self, info: dict[str, Any], *, pretrained: bool = True) -> nn.Module:
        """A Faster R-CNN for the dataset's classes; local weights only when ``pretrained``."""
        names = info.get("class_names")
        if not names:
            raise VisionpipeError("detection: the model stage needs class names (run 'load' first)")
        return build_detector(self._model_cfg(), len(names), pretrained=pretrained)

    # -- train / evaluate --------------------------------------------------------------------
    def training_step(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """torchvision's four losses and their sum under ``loss``."""
        images, targets = batch
        losses = model(images, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
        out = {k: v.float() for k, v in losses.items()}
        out["loss"] = sum(out.values())
        return out

    def batch_size_of(self, batch: Any) -> int:
        """Images in a batch."""
        return len(batch[0])

    def evaluate(self, model: nn.Module, loader: Any, *, device: torch.device, out_dir: Path | None = None,
                 epoch: int | None = None) -> dict[str, Any]:
        """COCO metrics (AP, AP50, AP75, by size, AR, per class); PR curves and COCO files on the final pass."""
        ds: DetectionDataset = loader.dataset
        info = self.ctx.info if self.ctx else {}
        cats = getattr(ds, "categories", None)
        cat_ids = info.get("category_ids") or (cats.ids if cats else None)
        if not cat_ids:
            top = max((int(r.labels.max(initial=0)) for r in ds.records), default=0)
            cat_ids = list(range(1, top + 1))
        names = info.get("class_names") or (cats.names if cats else [str(c) for c in cat_ids])
        if ds.records and not any((~r.crowd).any() for r in ds.records):
            raise VisionpipeError(f"the evaluation split has no boxes to find ({len(ds.records)} image(s), none with "
                                  "a non-crowd box): COCO AP is undefined; evaluate on annotated images")
        gt_images, results = [], []
        for images, targets in loader:
            outputs = model([im.to(device) for im in images])
            for t, o in zip(targets, outputs, strict=True):
                rec = ds.records[int(t["index"])]
                labels = t["labels"].cpu().numpy()
                gt_images.append({"id": rec.image_id, "width": rec.width, "height": rec.height,
                                  "file_name": rec.path, "boxes": t["boxes"].cpu().numpy(),
                                  "category_ids": [cat_ids[k - 1] for k in labels],
                                  "iscrowd": t["iscrowd"].cpu().numpy(),
                                  "areas": rec.areas if len(rec.areas) == len(labels) else None})
                lab = o["labels"].cpu().numpy()
                results += to_coco_results(rec.image_id, o["boxes"].float().cpu().numpy(),
                                           o["scores"].float().cpu().numpy(), [cat_ids[k - 1] for k in lab])
        if not gt_images:
            raise VisionpipeError("evaluation split is empty")
        categories = [{"id": c, "name": n} for c, n in zip(cat_ids, names, strict=True)]
        gt = coco_gt(gt_images, categories)
        metrics, extra = coco_evaluate(gt, results, dict(zip(cat_ids, names, strict=True)))
        res: dict[str, Any] = dict(metrics)
        res["detections"] = len(results)
        if epoch is None:
            log.info("COCO box metrics on %d image(s): AP %.3f, AP50 %.3f, AP75 %.3f, AR100 %.3f", len(gt_images),
                     metrics.get("AP", 0.0), metrics.get("AP50", 0.0), metrics.get("AP75", 0.0),
                     metrics.get("AR100", 0.0))
            log.debug("pycocotools summary:\n%s", extra["summary"])
            if out_dir is not None:
                self._write_final(Path(out_dir), gt, results, extra, metrics)
        return res

    def _write_final(self, out_dir: Path, gt: Any, results: list[dict], extra: dict[str, Any],
                     metrics: dict[str, float]) -> None:
        """plots/pr_curve.png and eval/{ground_truth,detections}.json (re-scorable with evaluate-coco)."""
        if extra["pr"]:
            title = f"precision–recall at IoU 0.5 (AP50 {metrics.get('AP50', 0.0):.3f})"
            plot_curves(extra["pr"], out_dir / "plots" / "pr_curve.png", "recall", "precision", title)
        write_json(out_dir / "eval" / "ground_truth.json", gt.dataset)
        write_json(out_dir / "eval" / "detections.json", results)

    # -- export / predict -----------------------------------------------------------------------
    def export_spec(self, model: nn.Module, data: DataBundle | None, info: dict[str, Any],
                    num_parity: int) -> ExportSpec:
        """Images (N, 3, H, W) in, padded boxes/labels/scores and counts out; dynamic N, H and W; parity on a
        batch of real val images, on the first alone and on any whose size differs from the batch's."""
        m = self._model_cfg()
        parity: list[tuple[torch.Tensor, ...]] = []
        ds = (data.val or data.test or data.train) if data else None
        if ds is not None and num_parity:
            plain = DetectionDataset(ds.records)
            images = [plain[i][0] for i in range(min(len(plain), num_parity))]
            batch = pad_stack(images)  # padding only when sizes differ: the alone ones check those unpadded
            alone = [im for i, im in enumerate(images) if i == 0 or im.shape != batch.shape[1:]]
            parity = ([(batch,)] if len(images) > 1 else []) + [(im[None],) for im in alone]
        example = parity[-1] if parity else (torch.rand(1, 3, m.min_size, m.min_size),)
        module = ExportedDetector(model.eval())
        meta = {"task": self.name, "class_names": info["class_names"], "category_ids": info["category_ids"],
                "model": m.name if m.name != "resnet_fpn" else f"resnet_fpn({m.backbone})",
                "preprocess": {"input": "RGB float32 0..1, shape (N, 3, H, W): any N, H and W, one size per batch",
                               "inside_the_model": f"each image on its own: resize to min_size {m.min_size} / "
                                                   f"max_size {m.max_size}, normalize with image_mean/image_std",
                               "min_size": m.min_size, "max_size": m.max_size,
                               "image_mean": list(m.image_mean), "image_std": list(m.image_std)},
                "output_layout": f"boxes (N, K, 4) xyxy in input pixels, labels (N, K) int64 (1..C, see "
                                 f"class_names), scores (N, K), num_detections (N,) int64; K = max_detections = "
                                 f"{module.max_detections}: image i's detections are its first num_detections[i] "
                                 "rows, the rest is zero padding",
                "max_detections": module.max_detections,
                "score_threshold": m.box_score_thresh, "nms_threshold": m.box_nms_thresh,
                "draw_threshold": m.draw_score_thresh, "ground_truth": info.get("ground_truth", [])}
        axes = {"images": {2: "height", 3: "width"}}  # traced on one image; the batch axis comes from the Loop
        return ExportSpec(module, example, ["images"], list(OUTPUTS), axes, meta, parity_inputs=parity,
                          compare=make_compare(m.box_score_thresh), postprocess_onnx=module.batched_onnx,
                          max_opset=MAX_OPSET)

    @classmethod
    def predictor(cls, metadata: dict[str, Any], options: dict[str, Any]) -> Predictor:
        """Boxes, labels and scores for each image."""
        return DetectionPredictor(metadata, options)
