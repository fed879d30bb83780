"""torchvision segmentation models by name, with optional local weights (whole model or backbone)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torchvision
import torchvision.models.segmentation as tvseg
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter

from visionpipe.engine.checkpoint import load_weights_file
from visionpipe.errors import VisionpipeError, unknown_name
from visionpipe_plugins.segmentation.config import MODEL_NAMES

log = logging.getLogger(__name__)



def lraspp_mobilenet_v3_small(*, weights: None = None, weights_backbone: None = None, num_classes: int = 21,
                              **kwargs: object) -> nn.Module:
    """LR-ASPP on a dilated MobileNetV3-Small: torchvision's LR-ASPP recipe with the smaller backbone."""
    if kwargs.pop("aux_loss", False):
        raise VisionpipeError("lraspp_mobilenet_v3_small has no auxiliary head")
    features = torchvision.models.mobilenet_v3_small(weights=None, dilated=True).features
    stages = [0] + [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)] + [len(features) - 1]
    low, high = stages[-4], stages[-1]
    backbone = IntermediateLayerGetter(features, {str(low): "low", str(high): "high"})
    return tvseg.LRASPP(backbone, features[low].out_channels, features[high].out_channels, num_classes)


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    name: getattr(tvseg, name, None) or globals()[name] for name in MODEL_NAMES}


def _weights_path(value: str, what: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_file():
        raise VisionpipeError(f"{what}: {path} is not a file (downloads are off; give a local weights file)")
    return path


def load_backbone_weights(model: nn.Module, name: str, path: Path) -> dict[str, list[str]]:
    """Load classification weights into ``model.backbone`` (MobileNet keys lose their 'features.' prefix)."""
    prefixes = ("features.", "backbone.") if "mobilenet" in name else ("", "backbone.")
    last: VisionpipeError | None = None
    for prefix in prefixes:
        try:
            return load_weights_file(model.backbone, path, prefix=prefix)
        except VisionpipeError as e:  # no key matched with this prefix: try the next
            last = e
    raise VisionpipeError(f"model.weights_backbone: {last}")


def set_bn_momentum(model: nn.Module, momentum: float) -> None:
    """Set the running-statistics momentum of every BatchNorm layer."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum


def build_segmenter(name: str, num_classes: int, *, aux_loss: bool = False, weights: str | None = None,
                    weights_backbone: str | None = None, bn_momentum: float | None = None) -> nn.Module:
    """Model ``name`` with ``num_classes`` outputs; local weights loaded when given (no downloads)."""
    if name not in BUILDERS:
        raise VisionpipeError(unknown_name("model", name, BUILDERS, "task segmentation"))
    kw = {"aux_loss": True} if aux_loss else {}
    model = BUILDERS[name](weights=None, weights_backbone=None, num_classes=num_classes, **kw)
    if weights:
        path = _weights_path(weights, "model.weights")
        report = load_weights_file(model, path)
        log.info("loaded model weights %s (%d missing, %d shape-mismatched keys skipped)", path,
                 len(report["missing"]), len(report["mismatched"]))
    elif weights_backbone:
        path = _weights_path(weights_backbone, "model.weights_backbone")
        report = load_backbone_weights(model, name, path)
        log.info("loaded backbone weights %s (%d backbone keys missing)", path, len(report["missing"]))
    if bn_momentum is not None:
        set_bn_momentum(model, bn_momentum)
    return model


def split_backbone_head(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(head parameters, backbone parameters), trainable ones only."""
    back_ids = {id(p) for p in model.backbone.parameters()}
    head = [p for p in model.parameters() if id(p) not in back_ids and p.requires_grad]
    back = [p for p in model.parameters() if id(p) in back_ids and p.requires_grad]
    return head, back
