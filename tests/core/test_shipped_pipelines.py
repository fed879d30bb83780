"""Every pipeline shipped in pipelines/ validates against its task's schema."""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import REPO, run_cli
from visionpipe.config import load_config

SHIPPED = sorted((REPO / "pipelines").glob("*.yaml"))


def test_pipelines_folder_holds_every_builtin_task():
    tasks = {yaml.safe_load(p.read_text())["task"] for p in SHIPPED}
    assert tasks >= {"classification", "detection", "segmentation", "dcgan", "charrnn_classify", "charrnn_generate"}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_pipeline_validates(path):
    loaded = load_config(path)
    assert loaded.config.task == yaml.safe_load(path.read_text())["task"]
    stages = loaded.config.stage_list(loaded.extra_stages)
    assert stages[:1] == ["load"] and "model" in stages


def test_validate_command_prints_the_resolved_config(tmp_path):
    out = run_cli("validate", str(REPO / "pipelines" / "classify.yaml"), cwd=tmp_path).stdout
    resolved = yaml.safe_load(out)
    assert resolved["train"]["epochs"] == 12 and resolved["train"]["optimizer"]["name"] == "adamw"
    assert resolved["export"]["opset"] == 17, "defaults are filled in"
