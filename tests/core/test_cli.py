"""The command line's contract: exit codes, Ctrl-C, machine-readable output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import yaml

from tests.conftest import REPO, run_cli


def test_usage_errors_exit_2_with_one_line(tmp_path):
    for args, message in ((("run",), "give a PIPELINE file, or --resume RUN_DIR"),
                          (("export", "missing.pt", "--quantize", "int4"), "--quantize int4: only 'int8'"),
                          (("export", "missing.pt", "--format", "torchscript"), "--format torchscript"),
                          (("export", "model.int8.onnx", "--quantize", "int8"),
                           "model.int8.onnx: already an exported ONNX model; export takes the run folder")):
        proc = run_cli(*args, cwd=tmp_path, check=False)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr


def test_export_takes_a_run_folder_even_one_named_like_a_model(tmp_path):
    (tmp_path / "resnet.onnx").mkdir()  # a run folder, not an exported model
    proc = run_cli("export", "resnet.onnx", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "resnet.onnx/checkpoints/best.pt: checkpoint not found" in proc.stderr


def test_ctrl_c_stops_a_run_with_exit_130_and_a_message(tiny_pipeline, tmp_path):
    pipeline = tiny_pipeline(epochs=500)
    env = {**os.environ, "VISIONPIPE_PROGRESS": "0", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "visionpipe", "run", str(pipeline), "--run-dir", "run"],
                            cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    seen = []
    deadline = time.monotonic() + 300
    for line in proc.stderr:  # wait until training is under way
        seen.append(line)
        if "epoch 1/500" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=120)[1]
    stderr = "".join(seen) + rest
    assert proc.returncode == 130, stderr[-3000:]
    assert "interrupted" in rest and "Traceback" not in stderr
    manifest = yaml.safe_load((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] != "finished"


def test_validate_output_is_yaml_even_with_long_values(tmp_path):
    long_root = "/data/" + "/".join(["a-rather-long-folder-name"] * 8)
    proc = run_cli("validate", str(REPO / "pipelines" / "classify.yaml"), "--set", f"load.root={long_root}",
                   cwd=tmp_path)
    assert yaml.safe_load(proc.stdout)["load"]["root"] == long_root
