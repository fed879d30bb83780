"""Detectors by name, resnet_fpn variants, anchors, local weights and the training step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d

from visionpipe.config import load_config
from visionpipe.errors import ConfigError, VisionpipeError
from visionpipe_plugins.detection.config import DETECTION_MODELS, DetectionModelConfig
from visionpipe_plugins.detection.models import build_detector
from visionpipe_plugins.detection.task import DetectionTask

TINY = {"min_size": 64, "max_size": 64, "rpn_pre_nms_top_n_test": 50, "rpn_post_nms_top_n_test": 20}


def _targets() -> list[dict[str, torch.Tensor]]:
    return [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([2])},
            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]  # an empty image


@pytest.mark.parametrize("name", [n for n in DETECTION_MODELS if n != "resnet_fpn"])
def test_every_named_model_builds_without_downloads_and_predicts(name: str) -> None:
    model = build_detector(DetectionModelConfig(name=name, **TINY), 3).eval()
    assert model.roi_heads.box_predictor.cls_score.out_features == 4
    with torch.no_grad():
        out = model([torch.rand(3, 50, 70)])[0]
    assert set(out) == {"boxes", "labels", "scores"}


@pytest.mark.parametrize("backbone", ["resnet18", "resnet34"])
def test_resnet_fpn_any_resnet_trains_one_step_with_an_empty_image(backbone: str) -> None:
    cfg = DetectionModelConfig(name="resnet_fpn", backbone=backbone, returned_layers=[3, 4], fpn_channels=32,
                               representation_size=64, anchor_sizes=[[16], [32], [64]], aspect_ratios=[1.0], **TINY)
    model = build_detector(cfg, 2)
    assert model.backbone.out_channels == 32
    assert model.rpn.head.cls_logits.out_channels == 1
    assert model.roi_heads.box_head.fc7.out_features == 64
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())  # from scratch: BN is trained
    task = DetectionTask.__new__(DetectionTask)
    model.train()
    losses = task.training_step(model, ([torch.rand(3, 48, 48), torch.rand(3, 48, 48)], _targets()))
    assert {"loss", "loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"} <= set(losses)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])


def test_anchor_levels_must_match_feature_maps() -> None:
    cfg = DetectionModelConfig(name="fasterrcnn_mobilenet_v3_large_320_fpn", anchor_sizes=[[16], [32]], **TINY)
    with pytest.raises(VisionpipeError, match=r"2 level\(s\) given but .* has 3 feature maps"):
        build_detector(cfg, 2)


def test_unknown_names_are_config_errors_with_suggestions(tmp_path: Path) -> None:
    p = tmp_path / "p.yaml"
    p.write_text("task: detection\nmodel:\n  name: fasterrcnn_resnet50_fpm\n")
    with pytest.raises(ConfigError, match=r"p.yaml:3: model.name: unknown detection model.*did you mean "
                                          r"'fasterrcnn_resnet50_fpn'"):
        load_config(p)
    with pytest.raises(VisionpipeError, match=r"unknown ResNet backbone 'resnet19'.*did you mean"):
        build_detector(DetectionModelConfig(name="resnet_fpn", backbone="resnet19", **TINY), 2)


def test_backbone_weights_load_freeze_bn_and_trainable_layers(tmp_path: Path) -> None:
    src = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        src.conv1.weight.fill_(0.123)
    wfile = tmp_path / "resnet18.pth"
    torch.save(src.state_dict(), wfile)
    cfg = DetectionModelConfig(name="resnet_fpn", backbone="resnet18", backbone_weights=str(wfile),
                               trainable_backbone_layers=2, **TINY)
    model = build_detector(cfg, 2)
    body = model.backbone.body
    assert torch.allclose(body.conv1.weight, torch.full_like(body.conv1.weight, 0.123))
    assert isinstance(body.bn1, FrozenBatchNorm2d)
    assert not body.layer2[0].conv1.weight.requires_grad and body.layer4[0].conv1.weight.requires_grad
    # pretrained=False (rebuilding for a checkpoint) skips the file: it may be gone by then
    wfile.unlink()
    rebuilt = build_detector(cfg, 2, pretrained=False)
    assert isinstance(rebuilt.backbone.body.bn1, FrozenBatchNorm2d)
    with pytest.raises(VisionpipeError, match="model.backbone_weights: .* not found"):
        build_detector(cfg, 2)


def test_full_model_weights_with_a_different_class_count(tmp_path: Path) -> None:
    cfg = DetectionModelConfig(name="fasterrcnn_mobilenet_v3_large_320_fpn", **TINY)
    donor = build_detector(cfg, 5)
    with torch.no_grad():
        donor.rpn.head.conv[0][0].weight.fill_(0.5)
    wfile = tmp_path / "det.pth"
    torch.save({"model": donor.state_dict()}, wfile)
    model = build_detector(cfg.model_copy(update={"weights": str(wfile)}), 2)
    assert torch.allclose(model.rpn.head.conv[0][0].weight, torch.tensor(0.5))
    assert model.roi_heads.box_predictor.cls_score.out_features == 3  # new head kept
    assert isinstance(model.backbone.body["0"][1], FrozenBatchNorm2d)  # auto: frozen BN with weights
