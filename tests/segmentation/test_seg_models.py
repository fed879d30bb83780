"""Segmentation models by name, aux loss, local weights; metrics from a confusion matrix; ONNX parity check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from visionpipe.config import load_config
from visionpipe.errors import ConfigError
from visionpipe_plugins.segmentation.config import MODEL_NAMES
from visionpipe_plugins.segmentation.metrics import scores
from visionpipe_plugins.segmentation.models import build_segmenter
from visionpipe_plugins.segmentation.predict import compare_outputs, upsample_argmax


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_builds_with_the_data_class_count(name):
    model = build_segmenter(name, 3).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 17, 23))
    assert out["out"].shape == (1, 3, 17, 23)
    assert "aux" not in out


def test_aux_loss_on_off():
    model = build_segmenter("deeplabv3_mobilenet_v3_large", 4, aux_loss=True).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 48, 48))
    assert out["aux"].shape == (1, 4, 48, 48)
    bad = {"task": "segmentation", "model": {"name": "lraspp_mobilenet_v3_large", "aux_loss": True}}
    with pytest.raises(ConfigError, match="aux_loss"):
        load_config("x.yaml", data=bad)


def test_backbone_weights_from_a_local_classifier_file(tmp_path):
    clf = torchvision.models.mobilenet_v3_large()
    path = tmp_path / "mobilenet_v3_large.pth"
    torch.save(clf.state_dict(), path)
    model = build_segmenter("lraspp_mobilenet_v3_large", 3, weights_backbone=str(path))
    assert torch.equal(model.backbone["0"][0].weight, clf.features[0][0].weight)
    assert torch.equal(model.backbone["16"][0].weight, clf.features[16][0].weight)


def test_backbone_weights_resnet(tmp_path):
    clf = torchvision.models.resnet50()
    path = tmp_path / "resnet50.pth"
    torch.save(clf.state_dict(), path)
    model = build_segmenter("fcn_resnet50", 3, weights_backbone=str(path))
    assert torch.equal(model.backbone.conv1.weight, clf.conv1.weight)
    assert torch.equal(model.backbone.layer4[2].conv3.weight, clf.layer4[2].conv3.weight)


def test_full_model_weights_skip_a_head_of_another_class_count(tmp_path):
    src = build_segmenter("lraspp_mobilenet_v3_small", 5)
    path = tmp_path / "seg.pt"
    torch.save({"model": src.state_dict()}, path)
    model = build_segmenter("lraspp_mobilenet_v3_small", 3, weights=str(path))
    assert torch.equal(model.backbone["1"].block[0][0].weight, src.backbone["1"].block[0][0].weight)
    assert torch.equal(model.classifier.cbr[0].weight, src.classifier.cbr[0].weight)
    assert model.classifier.high_classifier.weight.shape[0] == 3


def test_bn_momentum_is_applied():
    model = build_segmenter("lraspp_mobilenet_v3_small", 3, bn_momentum=0.1)
    moms = {m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert moms == {0.1}


def test_scores_from_a_known_confusion_matrix():
    cm = np.array([[50, 10, 0], [5, 30, 0], [0, 0, 0]])  # class 2 absent from truth and prediction
    s = scores(cm, ["bg", "a", "b"])
    iou_bg, iou_a = 50 / (60 + 55 - 50), 30 / (35 + 40 - 30)
    assert s["mIoU"] == pytest.approx((iou_bg + iou_a) / 2)
    assert s["IoU/bg"] == pytest.approx(iou_bg) and "IoU/b" not in s
    assert s["pixel_acc"] == pytest.approx(80 / 95)
    assert s["mDice"] == pytest.approx((100 / 115 + 60 / 75) / 2)


def test_parity_compare_allows_only_near_ties():
    logits = np.zeros((1, 2, 1, 2), np.float32)
    logits[0, 0, 0, 0], logits[0, 1, 0, 1] = 1.0, 1e-7  # pixel 1 is a near tie
    mask = logits.argmax(1)
    noisy = logits.copy()
    noisy[0, 0, 0, 1] += 2e-7
    assert compare_outputs([logits, mask], [noisy, noisy.argmax(1)]) == pytest.approx(2e-7, rel=1e-3)
    wrong = mask.copy()
    wrong[0, 0, 0] = 1  # a clear decision flipped
    assert compare_outputs([logits, mask], [logits, wrong]) == float("inf")


def test_upsample_argmax_back_to_the_original_size():
    logits = np.zeros((3, 4, 4), np.float32)
    logits[1, :, :2] = 1
    logits[2, :, 2:] = 1
    m = upsample_argmax(logits, (10, 30))
    assert m.shape == (10, 30) and set(np.unique(m)) == {1, 2}
    assert (m[:, :12] == 1).all() and (m[:, -12:] == 2).all()


def test_training_step_with_aux_and_dice_terms():
    from visionpipe_plugins.segmentation.task import SegmentationTask, soft_dice_loss

    data = {"task": "segmentation", "load": {"root": "unused"}, "model": {"name": "deeplabv3_mobilenet_v3_large", "aux_loss": True},
            "train": {"aux_weight": 0.4, "dice_weight": 0.5}}
    task = SegmentationTask(load_config("x.yaml", data=data).config)
    model = build_segmenter("deeplabv3_mobilenet_v3_large", 3, aux_loss=True)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    y[:, 0] = 255
    losses = task.training_step(model, (x, y))
    expected = losses["ce"] + 0.4 * losses["aux"] + 0.5 * losses["dice"]
    assert torch.isclose(losses["loss"], expected)
    losses["loss"].backward()
    assert model.aux_classifier[-1].weight.grad is not None
    perfect = torch.nn.functional.one_hot(y.clamp(0, 2), 3).permute(0, 3, 1, 2).float() * 50
    assert float(soft_dice_loss(perfect, y, 255)) < 1e-3
