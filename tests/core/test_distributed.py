"""torchrun with 2 CPU processes (gloo): completes, only rank 0 writes, metrics match, resume works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "VISIONPIPE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "0",
           "-m", "visionpipe", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc


def test_ddp_two_cpu_processes(tmp_path, tiny_pipeline):
    p = tiny_pipeline(epochs=3, extra="evaluate: {split: val}\n")
    torchrun("run", str(p), "--set", "train.batch_size=4", cwd=tmp_path)
    runs = sorted((tmp_path / "runs").iterdir())
    assert [r.name for r in runs] == ["tiny"], "one run folder, written by rank 0 only"
    run = runs[0]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["status"] == "finished"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3], "each epoch logged once"
    assert (run / "model.onnx").is_file()
    ddp = json.loads((run / "metrics.json").read_text())

    # single process, same global batch (2 ranks x 4 = 8)
    run_cli("run", str(p), "--run-dir", "single", "--set", "train.batch_size=8", cwd=tmp_path)
    single = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert abs(ddp["val/top1"] - single["val/top1"]) <= 0.25
    assert ddp["val/top1"] >= 0.75 and single["val/top1"] >= 0.75


def test_resume_under_torchrun(tmp_path, tiny_pipeline):
    p = tiny_pipeline(epochs=1)
    torchrun("run", str(p), "--run-dir", "r", "--set", "train.batch_size=4", cwd=tmp_path)
    out = torchrun("run", "--resume", "r", "--set", "train.epochs=2", cwd=tmp_path)
    assert "resumed at epoch 1/2" in out.stderr
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]
