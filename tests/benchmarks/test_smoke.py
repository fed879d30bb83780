"""The benchmark suite runs end to end from a clean checkout (its --quick smoke version: tiny counts, no goals)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from visionpipe.export.onnx import read_metadata

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_benchmark_prints_and_records_all_five_figures(tmp_path):
    out = tmp_path / "results.json"
    env = {**os.environ, "VISIONPIPE_PROGRESS": "0"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--check",
                           "--workdir", str(tmp_path / "work"), "--json", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln[:2] in {f"{k}." for k in range(1, 6)}]
    assert [ln[:2] for ln in lines] == ["1.", "2.", "3.", "4.", "5."], proc.stdout
    assert all("smoke" in ln for ln in lines), "a quick run judges no goal"
    res = json.loads(out.read_text())
    assert res["quick"] is True and [f["number"] for f in res["figures"]] == [1, 2, 3, 4, 5]
    for f in res["figures"]:
        assert f["ratio"] > 0, f
    cap = res["figures"][0]["data"]["ceiling"]  # figure 1 measures what predict can reach on this machine
    assert cap["model_cpu_ms"] > 0 and cap["host_cpu_ms"] > 0 and 0 < cap["ceiling"] < 1
    assert res["figures"][1]["data"]["raw_over_eager"] > 0
    int8 = res["figures"][2]["data"]["accuracy"]
    assert 0.0 <= int8["top1_fp32"] <= 1.0 and 0.0 <= int8["top1_int8"] <= 1.0
    assert res["figures"][4]["data"]["rss"]["1000"]["peak_rss_mb"] > 0

    # figures 1-2 at another input size reuse the trained model, re-exported at that size
    out96 = tmp_path / "results-96.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--only", "1,2",
                           "--input-size", "96", "--images", "64", "--workdir", str(tmp_path / "work"),
                           "--json", str(out96)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "96x96 (figures 1-2)" in proc.stdout and "training the benchmark model" not in proc.stderr
    res = json.loads(out96.read_text())
    assert res["input_size_figures_1_2"] == 96 and res["images"] == 64
    assert [f["number"] for f in res["figures"]] == [1, 2] and all(f["ratio"] > 0 for f in res["figures"])
    pictures = sorted((tmp_path / "work" / "images" / "predict-64-96px").rglob("*.png"))
    assert len(pictures) == 64 and cv2.imread(str(pictures[0])).shape == (96, 96, 3)
    assert read_metadata(tmp_path / "work" / "runs" / "pc40-ep1-bs32" / "model-96px.onnx")["input_size"] == [96, 96]
