"""The classification task: what differs from the shared engine, and nothing more."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from visionpipe.augment import (
    AugmentConfig,
    EvalTransform,
    apply_transforms,
    compose,
    deserialize,
    resize_normalize,
    serialize,
)
from visionpipe.errors import VisionpipeError
from visionpipe.plots import plot_confusion
from visionpipe.task import DataBundle, ExportSpec, PredictOption, Predictor, Task
from visionpipe_plugins.classification.config import ClassificationConfig, ModelConfig
from visionpipe_plugins.classification.data import ClassificationDataset, load_splits
from visionpipe_plugins.classification.models import build_classifier, model_names, split_head_backbone

log = logging.getLogger(__name__)


class _Registry(dict):
    """Lazy name list for `visionpipe plugins`."""

    def __iter__(self):
        return iter(model_names())


class ClassificationTask(Task):
    """Single-label image classification with any torchvision classification model."""

    name = "classification"
    Config = ClassificationConfig
    description = "image classification (ResNet and any torchvision classifier)"
    monitor = "val/top1"
    monitor_mode = "max"
    models: ClassVar[dict] = _Registry()
    predict_options: ClassVar[dict[str, PredictOption]] = {
        "top_k": PredictOption(5, "classes per record, likeliest first", int, low=1)}

    cfg: ClassificationConfig

    # -- load / augment -------------------------------------------------------------------
    def build_data(self) -> DataBundle:
        """Datasets for each split, images checked up front."""
        if self.cfg.load is None:
            raise VisionpipeError("classification needs a 'load' block")
        samples, classes, bad, inputs = load_splits(self.cfg.load, self.cfg.seed)
        bundle = DataBundle(info={"class_names": classes}, skipped=bad, inputs=inputs)
        for split, items in samples.items():
            setattr(bundle, split, ClassificationDataset(items))
        self.augment(bundle)
        return bundle

    def _augment_cfg(self) -> AugmentConfig:
        return self.cfg.augment or AugmentConfig()

    def augment(self, data: DataBundle) -> dict[str, Any]:
        """Train transforms on train; eval transforms (resize + normalize) on val/test."""
        cfg = self._augment_cfg()
        return apply_transforms(data, cfg, compose(cfg.train, resize_normalize(cfg)), self.eval_transform())

    def eval_transform(self) -> Any:
        """The eval/predict preprocessing (recorded in the exported model)."""
        cfg = self._augment_cfg()
        return compose(cfg.eval, resize_normalize(cfg))

    # -- model ----------------------------------------------------------------------------
    def build_model(self, info: dict[str, Any], *, pretrained: bool = True) -> nn.Module:
        """torchvision model with a head for the dataset's classes."""
        m = self.cfg.model or ModelConfig()
        classes = info.get("class_names")
        if not classes:
            raise VisionpipeError("classification: the model stage needs class names (run 'load' first)")
        return build_classifier(m.name, len(classes), m.weights if pretrained else None, m.freeze_backbone, m.dropout)

    def param_groups(self, model: nn.Module, base_lr: float) -> list[dict[str, Any]]:
        """Head at the base LR, backbone at ``optimizer.backbone_lr_mult`` × LR (0 freezes it)."""
        mult = self.cfg.train.optimizer.backbone_lr_mult if self.cfg.train else 1.0
        head, back = split_head_backbone(model)
        if mult == 0:
            for p in back:
                p.requires_grad_(False)
            return [{"params": head, "lr": base_lr}]
        return [{"params": back, "lr": base_lr * mult}, {"params": head, "lr": base_lr}]

    # -- train / evaluate --------------------------------------------------------------------
    def training_step(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """Cross-entropy (with label smoothing) on one batch."""
        x, y = batch
        logits = model(x)
        ls = self.cfg.train.label_smoothing if self.cfg.train else 0.0
        loss = F.cross_entropy(logits.float(), y, label_smoothing=ls)
        acc = (logits.argmax(1) == y).float().mean()
        return {"loss": loss, "acc": acc}

    def evaluate(self, model: nn.Module, loader: Any, *, device: torch.device, out_dir: Path | None = None,
                 epoch: int | None = None) -> dict[str, Any]:
        """Loss, top-1/top-5, per-class precision/recall/F1, confusion matrix (PNG on the final pass)."""
        classes = self.ctx.info["class_names"] if self.ctx else loader.dataset.classes
        n = len(classes)
        cm = torch.zeros(n, n, dtype=torch.long)
        loss_sum, top1, topk, count = 0.0, 0, 0, 0
        k = min(5, n)
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = model(x).float()
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            pred = logits.argmax(1)
            top1 += int((pred == y).sum())
            topk += int((logits.topk(k, 1).indices == y[:, None]).any(1).sum())
            count += len(y)
            cm += torch.bincount(y.cpu() * n + pred.cpu(), minlength=n * n).reshape(n, n)
        if count == 0:
            raise VisionpipeError("evaluation split is empty")
        tp = cm.diag().double()
        precision = tp / cm.sum(0).clamp(min=1)
        recall = tp / cm.sum(1).clamp(min=1)
        f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
        seen = (cm.sum(0) + cm.sum(1)) > 0  # a class with no image in the split and never predicted has no F1
        res: dict[str, Any] = {"loss": loss_sum / count, "top1": top1 / count, f"top{k}": topk / count,
                               "macro_f1": float(f1[seen].mean())}
        if k != 5:
            res["top5"] = topk / count  # with fewer than 5 classes top-5 is top-n (always 1.0)
        for i, c in enumerate(classes):
            res[f"precision/{c}"] = float(precision[i])
            res[f"recall/{c}"] = float(recall[i])
            res[f"f1/{c}"] = float(f1[i])
        if epoch is None:
            res["confusion_matrix"] = cm.tolist()
            if out_dir is not None:
                plot_confusion(cm.numpy(), classes, Path(out_dir) / "plots" / "confusion_matrix.png",
                               title=f"confusion matrix (top-1 {top1 / count:.3f})")
        return res

    # -- export / predict -----------------------------------------------------------------------
    def export_spec(self, model: nn.Module, data: DataBundle | None, info: dict[str, Any],
                    num_parity: int) -> ExportSpec:
        """Logits and softmax probabilities, dynamic batch; eval preprocessing in the metadata."""
        cfg = self._augment_cfg()
        h, w = cfg.image_size
        parity: list[tuple[torch.Tensor, ...]] = []
        ds = (data.val or data.test or data.train) if data else None
        if ds is not None and num_parity:
            eval_ds = type(ds)(ds.samples[: num_parity * 2], self.eval_transform())
            xs = torch.stack([eval_ds[i][0] for i in range(min(len(eval_ds), num_parity * 2))])
            parity = [(xs[:num_parity],), (xs[num_parity:],)] if len(xs) > num_parity else [(xs,)]
        example = parity[0] if parity else (torch.randn(2, 3, h, w),)
        meta = {"task": self.name, "class_names": info["class_names"], "input_size": [h, w],
                "mean": list(cfg.mean), "std": list(cfg.std), "model": (self.cfg.model or ModelConfig()).name,
                "preprocess": serialize(self.eval_transform())}
        return ExportSpec(_WithProbs(model), example, ["images"], ["logits", "probs"],
                          {"images": {0: "batch"}, "logits": {0: "batch"}, "probs": {0: "batch"}}, meta,
                          parity_inputs=parity)

    @classmethod
    def predictor(cls, metadata: dict[str, Any], options: dict[str, Any]) -> Predictor:
        """Top-k labels and scores for each image."""
        return ClassificationPredictor(metadata, options)


class _WithProbs(nn.Module):
    """Model → (logits, softmax probabilities)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        return logits, logits.softmax(-1)


class ClassificationPredictor(Predictor):
    """Exact eval preprocessing from the model's metadata; top-k output."""

    def __init__(self, metadata: dict[str, Any], options: dict[str, Any]) -> None:
        super().__init__(metadata, options)
        self.transform = EvalTransform(deserialize(metadata["preprocess"]))
        self.names = metadata["class_names"]
        self.k = min(int(options.get("top_k") or 5), len(self.names))

    def preprocess(self, image: np.ndarray) -> tuple[dict[str, np.ndarray], Any]:
        x = self.transform(image)
        return {"images": x}, None

    def postprocess(self, outputs: list[np.ndarray], state: Any) -> dict[str, Any]:
        probs = outputs[1]
        idx = (-probs).argsort()[: self.k]
        names = self.names
        return {"labels": [names[i] for i in idx.tolist()], "scores": [round(v, 6) for v in probs[idx].tolist()]}

    def draw(self, image: np.ndarray, record: dict[str, Any]) -> np.ndarray:
        import cv2

        out = image.copy()
        text = f"{record['labels'][0]} {record['scores'][0]:.2f}"
        scale = max(0.35, out.shape[1] / 400)
        cv2.putText(out, text, (3, int(14 * scale + 4)), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 2)
        cv2.putText(out, text, (3, int(14 * scale + 4)), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1)
        return out
