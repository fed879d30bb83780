"""The segmentation task: what differs from the shared engine, and nothing more."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import albumentations as A
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from visionpipe.augment import AugmentConfig, apply_transforms, compose, resize_normalize, serialize
from visionpipe.errors import VisionpipeError
from visionpipe.plots import plot_confusion, save_image_grid
from visionpipe.task import DataBundle, ExportSpec, PredictOption, Predictor, Task
from visionpipe_plugins.segmentation.config import ModelConfig, SegmentationConfig
from visionpipe_plugins.segmentation.data import SegmentationDataset, load_splits
from visionpipe_plugins.segmentation.masks import colorize, voc_palette
from visionpipe_plugins.segmentation.metrics import scores, update_confusion
from visionpipe_plugins.segmentation.models import BUILDERS, build_segmenter, split_backbone_head
from visionpipe_plugins.segmentation.predict import SegmentationExport, SegmentationPredictor, compare_outputs

if TYPE_CHECKING:
    from visionpipe.infer.backends import Backend

log = logging.getLogger(__name__)
GRID_SAMPLES = 6


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """1 − mean soft Dice over classes, ignored pixels left out."""
    n = logits.shape[1]
    valid = (target != ignore_index).unsqueeze(1).float()
    probs = logits.float().softmax(1) * valid
    onehot = F.one_hot(target.clamp(0, n - 1), n).permute(0, 3, 1, 2).float() * valid
    inter = (probs * onehot).sum((0, 2, 3))
    denom = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    return 1 - ((2 * inter + 1) / (denom + 1)).mean()


class SegmentationTask(Task):
    """Semantic segmentation with torchvision FCN, DeepLabV3 and LR-ASPP models."""

    name = "segmentation"
    Config = SegmentationConfig
    description = "semantic segmentation (FCN, DeepLabV3, LR-ASPP) from index/palette masks or COCO"
    monitor = "val/mIoU"
    monitor_mode = "max"
    models: ClassVar[dict] = BUILDERS
    predict_options: ClassVar[dict[str, PredictOption]] = {
        "alpha": PredictOption(0.5, "opacity of the class colours in the overlay PNGs", float, records=False,
                               low=0, high=1)}

    cfg: SegmentationConfig

    # -- load / augment -------------------------------------------------------------------
    def build_data(self) -> DataBundle:
        """Datasets for each split; images decoded and mask sizes checked up front."""
        if self.cfg.load is None:
            raise VisionpipeError("segmentation needs a 'load' block")
        samples, info, bad, inputs = load_splits(self.cfg.load)
        bundle = DataBundle(info=info, skipped=bad, inputs=inputs)
        for split, items in samples.items():
            setattr(bundle, split, SegmentationDataset(items, len(info["class_names"]), info["ignore_index"]))
        self.augment(bundle)
        return bundle

    def _augment_cfg(self) -> AugmentConfig:
        return self.cfg.augment or AugmentConfig()

    def augment(self, data: DataBundle) -> dict[str, Any]:
        """Train transforms on train; eval transforms (resize + normalize) on val/test. Masks follow each one."""
        cfg = self._augment_cfg()
        return apply_transforms(data, cfg, compose(cfg.train, resize_normalize(cfg)), self.eval_transform())

    def eval_transform(self, size: tuple[int, int] | None = None) -> A.Compose:
        """The eval/predict preprocessing (recorded in the exported model); ``size`` overrides image_size."""
        cfg = self._augment_cfg()
        if size is not None:
            cfg = cfg.model_copy(update={"image_size": size})
        return compose(cfg.eval, resize_normalize(cfg))

    # -- model ----------------------------------------------------------------------------
    def build_model(self, info: dict[str, Any], *, pretrained: bool = True) -> nn.Module:
        """torchvision segmentation model with one output per class of the data."""
        m = self.cfg.model or ModelConfig()
        classes = info.get("class_names")
        if not classes:
            raise VisionpipeError("segmentation: the model stage needs class names (run 'load' first)")
        return build_segmenter(m.name, len(classes), aux_loss=m.aux_loss,
                               weights=m.weights if pretrained else None,
                               weights_backbone=m.weights_backbone if pretrained else None,
                               bn_momentum=m.bn_momentum)

    def param_groups(self, model: nn.Module, base_lr: float) -> list[dict[str, Any]]:
        """Heads at the base LR, backbone at ``optimizer.backbone_lr_mult`` × LR (0 freezes it)."""
        mult = self.cfg.train.optimizer.backbone_lr_mult if self.cfg.train else 1.0
        head, back = split_backbone_head(model)
        if mult == 0:
            for p in back:
                p.requires_grad_(False)
            return [{"params": head, "lr": base_lr}]
        return [{"params": back, "lr": base_lr * mult}, {"params": head, "lr": base_lr}]

    # -- train / evaluate --------------------------------------------------------------------
    def _ignore_index(self) -> int:
        if self.ctx is not None and "ignore_index" in self.ctx.info:
            return int(self.ctx.info["ignore_index"])
        return self.cfg.load.ignore_index if self.cfg.load else 255

    def training_step(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """Cross-entropy (ignore_index left out) + auxiliary and Dice terms when configured."""
        x, y = batch
        out = model(x)
        ignore = self._ignore_index()
        tc = self.cfg.train
        logits = out["out"].float()
        main = F.cross_entropy(logits, y, ignore_index=ignore)
        losses = {"ce": main}
        total = main
        if "aux" in out and tc is not None and tc.aux_weight > 0:
            losses["aux"] = F.cross_entropy(out["aux"].float(), y, ignore_index=ignore)
            total = total + tc.aux_weight * losses["aux"]
        if tc is not None and tc.dice_weight > 0:
            losses["dice"] = soft_dice_loss(logits, y, ignore)
            total = total + tc.dice_weight * losses["dice"]
        with torch.no_grad():
            valid = y != ignore
            losses["pixel_acc"] = ((logits.argmax(1) == y) & valid).sum() / valid.sum().clamp(min=1)
        return {"loss": total, **losses}

    def evaluate(self, model: nn.Module, loader: Any, *, device: torch.device, out_dir: Path | None = None,
                 epoch: int | None = None) -> dict[str, Any]:
        """Loss, mIoU, per-class IoU/Dice, pixel accuracy, mDice; at the final pass a confusion matrix and a
        PNG grid (image / ground truth / prediction) of a few samples."""
        info = self.ctx.info if self.ctx else {}
        n = loader.dataset.num_classes
        names = info.get("class_names") or [f"class_{i}" for i in range(n)]
        ignore = loader.dataset.ignore_index
        cm = torch.zeros(n, n, dtype=torch.long, device=device)
        loss_sum, pixels = 0.0, 0
        shown: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = model(x)["out"].float()
            loss_sum += float(F.cross_entropy(logits, y, ignore_index=ignore, reduction="sum"))
            pixels += int((y != ignore).sum())
            pred = logits.argmax(1)
            update_confusion(cm, pred, y, ignore)
            if epoch is None and len(shown) < GRID_SAMPLES:
                shown += list(zip(x.cpu(), y.cpu(), pred.cpu(), strict=True))[: GRID_SAMPLES - len(shown)]
        if pixels == 0:
            raise VisionpipeError("evaluation split has no labelled pixels (empty, or every pixel is ignore_index)")
        cm_np = cm.cpu().numpy()
        res: dict[str, Any] = {"loss": loss_sum / pixels, **scores(cm_np, names)}
        if epoch is None:
            res["confusion_matrix"] = cm_np.tolist()
            if out_dir is not None:
                plots = Path(out_dir) / "plots"
                plot_confusion(cm_np, names, plots / "confusion_matrix.png",
                               title=f"pixel confusion matrix (mIoU {res['mIoU']:.3f})")
                self._plot_samples(shown, info, ignore, plots / "predictions.png")
        return res

    def _plot_samples(self, shown: list, info: dict[str, Any], ignore: int, path: Path) -> None:
        cfg = self._augment_cfg()
        palette = info.get("palette") or voc_palette(256)
        mean, std = np.array(cfg.mean) * 255, np.array(cfg.std) * 255
        tiles, titles = [], []
        for i, (x, y, p) in enumerate(shown):
            img = np.clip(x.numpy().transpose(1, 2, 0) * std + mean, 0, 255).astype(np.uint8)
            tiles += [img, colorize(y.numpy().astype(np.uint8), palette, ignore),
                      colorize(p.numpy().astype(np.uint8), palette)]
            titles += [f"image {i}", "ground truth", "prediction"]
        if tiles:
            save_image_grid(tiles, path, cols=3, titles=titles)

    # -- export / predict -----------------------------------------------------------------------
    def export_spec(self, model: nn.Module, data: DataBundle | None, info: dict[str, Any],
                    num_parity: int) -> ExportSpec:
        """Logits and argmax mask with dynamic batch, height and width; classes, palette, preprocessing in
        the metadata; parity on real images, one batch at another resolution."""
        cfg = self._augment_cfg()
        h, w = cfg.image_size
        parity: list[tuple[torch.Tensor, ...]] = []
        ds = (data.val or data.test or data.train) if data else None
        if ds is not None and num_parity:
            k = min(len(ds), num_parity * 2)
            items = ds.samples[:k]
            eval_ds = SegmentationDataset(items, ds.num_classes, ds.ignore_index, self.eval_transform())
            xs = torch.stack([eval_ds[i][0] for i in range(k)])
            parity = [(xs[:num_parity],), (xs[num_parity:],)] if k > num_parity else [(xs,)]
            other = (h + h // 2, w + w // 4)
            big = SegmentationDataset(items[:2], ds.num_classes, ds.ignore_index, self.eval_transform(other))
            parity.append((torch.stack([big[i][0] for i in range(len(big))]),))
        example = parity[0] if parity else (torch.randn(2, 3, h, w),)
        names = info["class_names"]
        meta = {"task": self.name, "class_names": names, "palette": info.get("palette") or voc_palette(len(names)),
                "ignore_index": info.get("ignore_index", 255), "input_size": [h, w], "mean": list(cfg.mean),
                "std": list(cfg.std), "model": (self.cfg.model or ModelConfig()).name,
                "preprocess": serialize(self.eval_transform()),
                "output_info": {"logits": "N x C x H x W class scores", "mask": "N x H x W class indices (argmax)"}}
        axes = {"images": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch", 2: "height", 3: "width"},
                "mask": {0: "batch", 1: "height", 2: "width"}}
        return ExportSpec(SegmentationExport(model), example, ["images"], ["logits", "mask"], axes, meta,
                          parity_inputs=parity, compare=compare_outputs)

    @classmethod
    def predictor(cls, metadata: dict[str, Any], options: dict[str, Any]) -> Predictor:
        """Class shares per image; with ``out_dir`` in options also mask and overlay PNGs."""
        return SegmentationPredictor(metadata, options)

    @classmethod
    def predict(cls, backend: Backend, metadata: dict[str, Any], source: str | None, out_dir: Path,
                options: dict[str, Any]) -> dict[str, Any]:
        """Stream images through the model; write predictions.jsonl, errors.jsonl, masks/ and overlays/."""
        from visionpipe.infer.runner import predict_images

        if source is None:
            raise VisionpipeError(f"task {cls.name}: predict needs a SOURCE (file, folder or glob)")
        opts = {**options, "save_images": True, "out_dir": str(out_dir),
                "source_root": source if Path(source).is_dir() else None}
        return predict_images(backend, cls.build_predictor(metadata, opts), source, out_dir, opts)
