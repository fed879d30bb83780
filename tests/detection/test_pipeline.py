"""The detection main job end to end on tiny data, through the CLI as a user runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.slow

TINY = [
    "--set", "load.generate.train=8", "--set", "load.generate.val=4", "--set", "load.generate.test=4",
    "--set", "load.generate.image_size=64", "--set", "model.min_size=64", "--set", "model.max_size=64",
    "--set", "model.returned_layers=[3,4]", "--set", "model.fpn_channels=32", "--set", "model.representation_size=32",
    "--set", "model.anchor_sizes=[[16],[32],[64]]", "--set", "train.epochs=2", "--set", "train.batch_size=4",
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """pipelines/detect.yaml from a clean folder: data generated, trained 2 epochs, evaluated, exported, predicted."""
    cwd = tmp_path_factory.mktemp("det")
    proc = run_cli("run", str(REPO / "pipelines" / "detect.yaml"), *TINY, cwd=cwd)
    return cwd, cwd / "runs" / "detect", proc


def test_run_folder_has_every_output(finished_run) -> None:
    cwd, run, proc = finished_run
    assert (cwd / "data" / "shapes-det" / "annotations" / "test.json").is_file()
    for rel in ("config.yaml", "manifest.json", "metrics.json", "metrics.jsonl", "checkpoints/best.pt",
                "plots/curves.png", "plots/pr_curve.png", "eval/ground_truth.json", "eval/detections.json",
                "model.onnx", "predictions/predictions.jsonl", "predictions/coco_results.json",
                "predictions/coco_images.json", "predictions/coco_metrics.json", "predictions/preview.png", "run.log"):
        assert (run / rel).is_file(), rel
    assert len(list((run / "predictions" / "images").rglob("*.png"))) == 4  # --save-images drawings
    assert "test/AP50" in proc.stdout and "onnx:" in proc.stdout


def test_metrics_keys(finished_run) -> None:
    _, run, _ = finished_run
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("test/AP", "test/AP50", "test/AP75", "test/AR100", "train/best_val/AP50", "export/max_abs_diff"):
        assert key in metrics, key
    assert any(k.startswith("test/AP/") for k in metrics)  # per class
    assert 0.0 <= metrics["test/AP50"] <= 1.0
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert all("val/AP50" in e and "train/loss_objectness" in e for e in epochs)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["stages_done"][-1] == "predict"


def test_predictions_and_coco_results(finished_run) -> None:
    cwd, run, _ = finished_run
    recs = [json.loads(line) for line in (run / "predictions" / "predictions.jsonl").read_text().splitlines()]
    assert len(recs) == 4
    for r in recs:
        assert {"path", "boxes", "labels", "scores", "category_ids", "width", "height"} <= set(r)
        assert all(len(b) == 4 and b[0] <= b[2] <= r["width"] for b in r["boxes"])
    results = json.loads((run / "predictions" / "coco_results.json").read_text())
    gt = json.loads((cwd / "data" / "shapes-det" / "annotations" / "test.json").read_text())
    assert {x["image_id"] for x in results} <= {im["id"] for im in gt["images"]}  # ids of the test split
    proc = run_cli("evaluate-coco", str(run / "predictions" / "coco_results.json"), "--gt",
                   str(cwd / "data" / "shapes-det" / "annotations" / "test.json"), cwd=cwd)
    assert "AP50" in proc.stdout


def test_predict_command_on_a_folder_with_a_corrupt_file(finished_run) -> None:
    cwd, run, _ = finished_run
    folder = cwd / "mixed"
    folder.mkdir()
    for p in sorted((cwd / "data" / "shapes-det" / "images" / "val").glob("*.png"))[:2]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    run_cli("predict", str(run / "model.onnx"), str(folder), "--out", str(cwd / "out"), "--save-images",
            "--option", "draw_threshold=0.0", cwd=cwd)
    errors = [json.loads(line) for line in (cwd / "out" / "errors.jsonl").read_text().splitlines()]
    assert [Path(e["path"]).name for e in errors] == ["broken.png"]
    assert len((cwd / "out" / "predictions.jsonl").read_text().splitlines()) == 2
    images = json.loads((cwd / "out" / "coco_images.json").read_text())["images"]
    assert [im["id"] for im in images] == [1, 2]  # no ground truth for this folder: 1-based order
    assert len(list((cwd / "out" / "images").glob("*.png"))) == 2


def test_export_command_rebuilds_from_the_checkpoint(finished_run) -> None:
    cwd, run, _ = finished_run
    proc = run_cli("export", str(run), "--out", str(cwd / "again.onnx"), cwd=cwd)
    assert (cwd / "again.onnx").is_file() and "parity" in proc.stdout
