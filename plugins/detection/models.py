"""torchvision Faster R-CNN detectors by name, with every knob from the model block and local weights only."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops.misc import FrozenBatchNorm2d

from visionpipe.engine.checkpoint import load_weights_file
from visionpipe.errors import VisionpipeError, unknown_name
from visionpipe_plugins.detection.config import DETECTION_MODELS, DetectionModelConfig

log = logging.getLogger(__name__)
DEFAULT_TRAINABLE = 3


def resnet_names() -> list[str]:
    """torchvision ResNet-family classification models usable as an FPN backbone."""
    return [n for n in torchvision.models.list_models(module=torchvision.models)
            if n.startswith(("resnet", "resnext", "wide_resnet"))]


def _rcnn_kwargs(m: DetectionModelConfig) -> dict[str, Any]:
    return {
        "min_size": m.min_size, "max_size": m.max_size, "image_mean": list(m.image_mean), "image_std": list(m.image_std),
        "rpn_pre_nms_top_n_train": m.rpn_pre_nms_top_n_train, "rpn_pre_nms_top_n_test": m.rpn_pre_nms_top_n_test,
        "rpn_post_nms_top_n_train": m.rpn_post_nms_top_n_train, "rpn_post_nms_top_n_test": m.rpn_post_nms_top_n_test,
        "rpn_nms_thresh": m.rpn_nms_thresh, "rpn_batch_size_per_image": m.rpn_batch_size_per_image,
        "box_batch_size_per_image": m.box_batch_size_per_image, "box_score_thresh": m.box_score_thresh,
        "box_nms_thresh": m.box_nms_thresh, "box_detections_per_img": m.box_detections_per_img,
    }


def uses_frozen_norm(m: DetectionModelConfig) -> bool:
    """Whether the backbone's BatchNorm is frozen (decided by the config alone, so checkpoints reload)."""
    if m.norm == "auto":
        return bool(m.weights or m.backbone_weights)
    return m.norm == "frozen"


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d inside ``module`` with a FrozenBatchNorm2d holding its statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


def _freeze_stages(body: nn.Module, trainable: int, mobilenet: bool) -> None:
    """Train only the last ``trainable`` backbone stages (torchvision's convention)."""
    if mobilenet:
        names = [n for n, _ in body.named_children()]
        blocks = list(body.children())
        stages = [0] + [i for i, b in enumerate(blocks) if getattr(b, "_is_cn", False)] + [len(blocks) - 1]
        cut = len(blocks) if trainable == 0 else stages[max(0, len(stages) - trainable)]
        frozen = set(names[:cut])
    else:
        keep = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable]
        if trainable == 5:
            keep.append("bn1")
        frozen = {n for n, _ in body.named_children() if n not in keep}
    for n, p in body.named_parameters():
        if n.split(".")[0] in frozen:
            p.requires_grad_(False)


def _named_model(m: DetectionModelConfig, num_classes: int) -> FasterRCNN:
    builder = getattr(torchvision.models.detection, m.name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return builder(weights=None, weights_backbone=None, num_classes=num_classes, **_rcnn_kwargs(m))


def _resnet_fpn(m: DetectionModelConfig, num_classes: int) -> FasterRCNN:
    names = resnet_names()
    if m.backbone not in names:
        raise VisionpipeError(unknown_name("ResNet backbone", m.backbone, names, "model.backbone"))
    frozen = uses_frozen_norm(m)
    trainable = m.trainable_backbone_layers if m.trainable_backbone_layers is not None else (
        DEFAULT_TRAINABLE if m.backbone_weights or m.weights else 5)
    backbone = resnet_fpn_backbone(backbone_name=m.backbone, weights=None, trainable_layers=min(trainable, 5),
                                   returned_layers=m.returned_layers,
                                   norm_layer=FrozenBatchNorm2d if frozen else nn.BatchNorm2d)
    if m.fpn_channels != backbone.out_channels:
        backbone = _rewidth_fpn(backbone, m.fpn_channels)
    return FasterRCNN(backbone, num_classes=num_classes, **_rcnn_kwargs(m))


def _rewidth_fpn(backbone: nn.Module, channels: int) -> nn.Module:
    """The same backbone with an FPN of ``channels`` outputs."""
    from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

    in_list = [blk[0].in_channels if isinstance(blk, nn.Sequential) else blk.in_channels
               for blk in backbone.fpn.inner_blocks]
    backbone.fpn = FeaturePyramidNetwork(in_list, channels, extra_blocks=LastLevelMaxPool())
    backbone.out_channels = channels
    return backbone


def _num_feature_maps(model: FasterRCNN) -> int:
    with torch.no_grad():
        was = model.backbone.training
        model.backbone.eval()
        n = len(model.backbone(torch.zeros(1, 3, 64, 64)))
        model.backbone.train(was)
    return n


def _set_anchors(model: FasterRCNN, m: DetectionModelConfig) -> None:
    """Replace the anchor generator (and the RPN head when anchors per location change)."""
    old = model.rpn.anchor_generator
    sizes = [tuple(s) for s in m.anchor_sizes] if m.anchor_sizes else [tuple(s) for s in old.sizes]
    ratios = tuple(m.aspect_ratios) if m.aspect_ratios else tuple(old.aspect_ratios[0])
    levels = _num_feature_maps(model)
    if len(sizes) != levels:
        raise VisionpipeError(f"model.anchor_sizes: {len(sizes)} level(s) given but {m.name} has {levels} feature "
                              f"maps; give {levels} lists, e.g. {[[16 * 2 ** i] for i in range(levels)]}")
    per_loc = {len(s) * len(ratios) for s in sizes}
    if len(per_loc) != 1:
        raise VisionpipeError("model.anchor_sizes: every level needs the same number of sizes")
    gen = AnchorGenerator(tuple(sizes), (ratios,) * levels)
    model.rpn.anchor_generator = gen
    n = gen.num_anchors_per_location()[0]
    head = model.rpn.head
    if head.cls_logits.out_channels != n:
        depth = len(head.conv) if isinstance(head.conv, nn.Sequential) else 1
        model.rpn.head = RPNHead(head.cls_logits.in_channels, n, conv_depth=depth)


def _load_backbone_weights(model: FasterRCNN, path: Path) -> None:
    body = model.backbone.body
    last: VisionpipeError | None = None
    for prefix in ("", "features.", "backbone.body.", "body."):
        try:
            rep = load_weights_file(body, path, prefix=prefix)
        except VisionpipeError as e:
            last = e
            continue
        log.info("loaded backbone weights %s (%d missing, %d shape-mismatched keys skipped)", path,
                 len(rep["missing"]), len(rep["mismatched"]))
        return
    raise VisionpipeError(f"model.backbone_weights: {last}")


def build_detector(m: DetectionModelConfig, num_classes: int, *, pretrained: bool = True) -> FasterRCNN:
    """A Faster R-CNN for ``num_classes`` object classes (+ background) as the model block describes."""
    if m.name not in DETECTION_MODELS:
        raise VisionpipeError(unknown_name("detection model", m.name, DETECTION_MODELS, "task detection"))
    k = num_classes + 1
    model = _resnet_fpn(m, k) if m.name == "resnet_fpn" else _named_model(m, k)
    if m.anchor_sizes or m.aspect_ratios:
        _set_anchors(model, m)
    if m.representation_size:
        in_ch = model.roi_heads.box_head.fc6.in_features if isinstance(model.roi_heads.box_head, TwoMLPHead) \
            else model.backbone.out_channels * 7 * 7
        model.roi_heads.box_head = TwoMLPHead(in_ch, m.representation_size)
        model.roi_heads.box_predictor = FastRCNNPredictor(m.representation_size, k)
    mobilenet = "mobilenet" in m.name
    if m.name != "resnet_fpn" and uses_frozen_norm(m):
        freeze_batchnorm(model.backbone.body)
    if pretrained and m.backbone_weights:
        _load_backbone_weights(model, _existing(m.backbone_weights, "model.backbone_weights"))
    if pretrained and m.weights:
        path = _existing(m.weights, "model.weights")
        rep = load_weights_file(model, path)
        log.info("loaded weights %s (%d missing, %d shape-mismatched keys skipped: %s)", path, len(rep["missing"]),
                 len(rep["mismatched"]), ", ".join(rep["mismatched"][:4]))
    if m.name != "resnet_fpn" and (m.weights or m.backbone_weights or m.trainable_backbone_layers is not None):
        _freeze_stages(model.backbone.body, DEFAULT_TRAINABLE if m.trainable_backbone_layers is None
                       else m.trainable_backbone_layers, mobilenet)
    return model


def _existing(value: str, what: str) -> Path:
    p = Path(value).expanduser()
    if not p.is_file():
        raise VisionpipeError(f"{what}: {p} not found (weights are never downloaded; give a local file)")
    return p
