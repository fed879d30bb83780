"""The classifier: local pretrained weights (the backbone must fit, the head is replaced and said so); metrics."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torchvision

from visionpipe.errors import VisionpipeError
from visionpipe_plugins.classification.models import build_classifier


@pytest.fixture(scope="module")
def resnet18_state() -> dict[str, torch.Tensor]:
    return torchvision.models.resnet18(weights=None).state_dict()


def test_torchvision_state_dict_fills_the_backbone_and_the_head_is_replaced(tmp_path, resnet18_state, caplog):
    p = tmp_path / "r18.pth"
    torch.save(resnet18_state, p)
    with caplog.at_level(logging.INFO):
        model = build_classifier("resnet18", 3, str(p))
    assert torch.equal(model.state_dict()["layer4.1.conv2.weight"], resnet18_state["layer4.1.conv2.weight"])
    assert model.fc.out_features == 3
    assert "its head fc (1000 outputs) is replaced by a new, untrained 3-class one" in caplog.text


@pytest.mark.parametrize("change", ["reshape", "extra"])
def test_weights_of_another_architecture_are_refused(tmp_path, resnet18_state, change):
    sd = dict(resnet18_state)
    if change == "reshape":  # a bottleneck block's 1x1 conv where resnet18 has a 3x3 (like resnet50's)
        sd["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    else:  # one block more per stage, like resnet34's: every shared tensor fits, some are left over
        sd.update({k.replace("layer1.1.", "layer1.2."): v for k, v in resnet18_state.items() if "layer1.1." in k})
    p = tmp_path / "other.pth"
    torch.save(sd, p)
    with pytest.raises(VisionpipeError) as e:
        build_classifier("resnet18", 3, str(p))
    message = str(e.value)
    assert message.startswith(f"model.weights: {p} does not fit resnet18: ") and "another architecture" in message
    assert ("layer1.0.conv1.weight" if change == "reshape" else "layer1.2.conv1.weight") in message


def test_the_weights_file_a_run_starts_from_is_hashed_into_its_manifest(tmp_path, tiny_pipeline, resnet18_state):
    import hashlib
    import json

    from tests.conftest import run_cli

    p = tmp_path / "r18.pth"
    torch.save(resnet18_state, p)
    run_cli("run", str(tiny_pipeline()), "--set", f"model.weights={p}", "--set", "stages=[load,model]",
            "--run-dir", "out", cwd=tmp_path)
    inputs = json.loads((tmp_path / "out" / "manifest.json").read_text())["inputs"]
    assert inputs[str(p.resolve())] == hashlib.sha256(p.read_bytes()).hexdigest()
    # a torchvision weights name read from torchvision's cache: the cached file is hashed too (it was not)
    cached = tmp_path / "hub" / "checkpoints" / Path(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url).name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(p.read_bytes())
    run_cli("run", str(tiny_pipeline()), "--set", "model.weights=IMAGENET1K_V1", "--set", "stages=[load,model]",
            "--run-dir", "cache", cwd=tmp_path, env={"TORCH_HOME": str(tmp_path)})
    inputs = json.loads((tmp_path / "cache" / "manifest.json").read_text())["inputs"]
    assert inputs[str(cached.resolve())] == hashlib.sha256(p.read_bytes()).hexdigest()


def test_macro_f1_leaves_out_a_class_absent_from_the_split_and_never_predicted():
    from torch.utils.data import DataLoader, TensorDataset

    from visionpipe_plugins.classification.config import ClassificationConfig
    from visionpipe_plugins.classification.task import ClassificationTask

    class Split(TensorDataset):
        classes = ["cat", "dog", "zebra"]  # zebra's single image went to train

    y = torch.tensor([0, 0, 1, 1])
    ds = Split(torch.nn.functional.one_hot(y, 3).float(), y)
    task = ClassificationTask(ClassificationConfig())
    res = task.evaluate(torch.nn.Identity(), DataLoader(ds, batch_size=2), device=torch.device("cpu"))
    assert res["top1"] == 1.0 and res["macro_f1"] == 1.0  # not 2/3
    assert res["f1/cat"] == res["f1/dog"] == 1.0


@pytest.mark.slow
def test_resume_does_not_need_the_weights_file_the_run_started_from(tmp_path, tiny_pipeline, resnet18_state):
    import json

    from tests.conftest import run_cli

    p = tmp_path / "downloads" / "r18.pth"
    p.parent.mkdir()
    torch.save(resnet18_state, p)
    pipeline = str(tiny_pipeline(epochs=1))
    run_cli("run", pipeline, "--set", f"model.weights={p}", "--run-dir", "out", cwd=tmp_path)
    p.unlink()  # the checkpoint holds every weight now
    run_cli("run", "--resume", "out", "--set", "train.epochs=2", cwd=tmp_path)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["train/epochs"] == 2


def test_weights_saved_from_a_ddp_or_compiled_model_load(tmp_path, resnet18_state):
    p = tmp_path / "ddp.pth"
    torch.save({"state_dict": {f"module._orig_mod.{k}": v for k, v in resnet18_state.items()}}, p)
    model = build_classifier("resnet18", 3, str(p))
    assert torch.equal(model.state_dict()["layer4.1.conv2.weight"], resnet18_state["layer4.1.conv2.weight"])
