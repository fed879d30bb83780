"""The segmentation pipeline end to end on tiny built-in data: run folder, metrics, ONNX, predict outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import run_cli

pytestmark = pytest.mark.slow

TINY_SEGMENT = """\
task: segmentation
name: tiny
seed: 0
load:
  root: data/shapes
  classes_file: classes.txt
  test: test
  generate: {train: 8, val: 4, test: 4, image_size: 48, max_shapes: 2}
augment:
  image_size: [48, 48]
  mean: [0.5, 0.5, 0.5]
  std: [0.25, 0.25, 0.25]
  train:
    - {name: HorizontalFlip, p: 0.5}
model: {name: lraspp_mobilenet_v3_small, bn_momentum: 0.1}
train:
  epochs: 1
  batch_size: 4
  optimizer: {name: adamw, lr: 0.001}
  tensorboard: false
evaluate: {split: val}
export: {opset: 17}
predict: {source: data/shapes/test/images, batch_size: 4}
"""
CLASSES = ["background", "circle", "square", "triangle", "cross"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One full tiny run (generate, train 1 epoch, evaluate, export, predict) shared by the tests below."""
    tmp = tmp_path_factory.mktemp("seg")
    (tmp / "tiny.yaml").write_text(TINY_SEGMENT)
    proc = run_cli("run", "tiny.yaml", cwd=tmp)
    return tmp / "runs" / "tiny", tmp, proc


def test_run_folder_has_everything(finished_run):
    run, tmp, proc = finished_run
    for rel in ("config.yaml", "manifest.json", "metrics.json", "metrics.jsonl", "checkpoints/best.pt",
                "plots/curves.png", "plots/confusion_matrix.png", "plots/predictions.png", "model.onnx",
                "predictions/predictions.jsonl", "predictions/errors.jsonl"):
        assert (run / rel).is_file(), rel
    assert (tmp / "data" / "shapes" / "classes.txt").read_text().split() == CLASSES
    assert len(list((tmp / "data" / "shapes" / "train" / "masks").glob("*.png"))) == 8
    grid = Image.open(run / "plots" / "predictions.png")
    assert grid.size[0] > 100 and grid.size[1] > 100
    assert "val/mIoU" in proc.stdout


def test_metrics_json_keys_and_consistency(finished_run):
    run = finished_run[0]
    m = json.loads((run / "metrics.json").read_text())
    for key in ("val/mIoU", "val/pixel_acc", "val/mDice", "val/mAcc", "val/loss", "val/confusion_matrix",
                "train/best_val/mIoU", "export/max_abs_diff"):
        assert key in m, key
    cm = np.array(m["val/confusion_matrix"])
    assert cm.shape == (5, 5) and cm.sum() == 4 * 48 * 48
    assert m["val/pixel_acc"] == pytest.approx(np.trace(cm) / cm.sum())
    ious = [m[f"val/IoU/{c}"] for c in CLASSES if f"val/IoU/{c}" in m]
    assert ious and m["val/mIoU"] == pytest.approx(np.mean(ious))
    history = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert history[0]["epoch"] == 1 and "val/mIoU" in history[0] and "train/loss" in history[0]


def test_onnx_metadata_and_dynamic_batch_height_width(finished_run):
    import onnxruntime as ort

    from visionpipe.export.checkpoint_model import task_and_model_from_checkpoint
    from visionpipe.export.onnx import read_metadata

    run = finished_run[0]
    meta = read_metadata(run / "model.onnx")
    assert meta["task"] == "segmentation" and meta["class_names"] == CLASSES
    assert len(meta["palette"]) == 5 and meta["ignore_index"] == 255 and meta["input_size"] == [48, 48]
    assert meta["preprocess"] and meta["outputs"] == ["logits", "mask"]
    _, model, _ = task_and_model_from_checkpoint(run / "checkpoints" / "best.pt")
    sess = ort.InferenceSession(str(run / "model.onnx"))
    for shape in ((1, 3, 48, 48), (3, 3, 64, 80), (2, 3, 37, 51)):
        x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
        logits, mask = sess.run(None, {"images": x})
        with torch.no_grad():
            ref = model(torch.from_numpy(x))["out"].numpy()
        assert logits.shape == (shape[0], 5, *shape[2:]) and mask.shape == (shape[0], *shape[2:])
        assert np.abs(ref - logits).max() < 1e-3
        assert (mask == ref.argmax(1)).mean() > 0.999


def test_pipeline_predict_writes_masks_overlays_and_shares(finished_run):
    run, tmp, _ = finished_run
    out = run / "predictions"
    recs = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(recs) == 4
    for r in recs:
        assert set(r["class_share"]) == set(CLASSES)
        assert sum(r["class_share"].values()) == pytest.approx(1.0, abs=1e-5)
        mask = np.array(Image.open(out / r["mask"]))
        assert mask.shape == (48, 48) and mask.max() < 5
        assert r["class_share"]["background"] == pytest.approx((mask == 0).mean(), abs=1e-5)
        overlay = Image.open(out / r["overlay"])
        assert overlay.mode == "RGB" and overlay.size == (48, 48)
    assert (out / "errors.jsonl").read_text() == ""


def _write_inputs(folder: Path) -> dict[str, Path]:
    rng = np.random.default_rng(2)
    (folder / "sub").mkdir(parents=True)
    paths = {"wide": folder / "wide.png", "gray": folder / "sub" / "gray.jpg", "corrupt": folder / "broken.png",
             "empty": folder / "empty.jpg"}
    Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(paths["wide"])
    Image.fromarray(rng.integers(0, 255, (33, 41), dtype=np.uint8)).save(paths["gray"])
    paths["corrupt"].write_bytes(paths["wide"].read_bytes()[:60])
    paths["empty"].write_bytes(b"")
    return paths


def test_predict_command_any_size_and_corrupt_inputs(finished_run, tmp_path):
    run = finished_run[0]
    paths = _write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    proc = run_cli("predict", str(run / "model.onnx"), str(tmp_path / "in"), "--out", str(out),
                   "--option", "alpha=0.7", cwd=tmp_path)
    summary = json.loads(proc.stdout)
    assert summary["images"] == 2 and summary["errors"] == 2
    errors = {json.loads(x)["path"] for x in (out / "errors.jsonl").read_text().splitlines()}
    assert errors == {str(paths["corrupt"]), str(paths["empty"])}
    recs = {json.loads(x)["path"]: json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()}
    wide, gray = recs[str(paths["wide"])], recs[str(paths["gray"])]
    assert wide["size"] == [50, 70] and gray["size"] == [33, 41]
    assert gray["mask"] == "masks/sub/gray.png" and gray["overlay"] == "overlays/sub/gray.png"
    for rec, (h, w) in ((wide, (50, 70)), (gray, (33, 41))):
        mask = np.array(Image.open(out / rec["mask"]))
        assert mask.shape == (h, w), "mask back at the original size"
        shares = np.bincount(mask.ravel(), minlength=5) / mask.size
        assert np.allclose([rec["class_share"][c] for c in CLASSES], shares, atol=1e-5)
        assert Image.open(out / rec["overlay"]).size == (w, h)


def test_predict_with_checkpoint_matches_onnx(finished_run, tmp_path):
    run, tmp, _ = finished_run
    src = str(tmp / "data" / "shapes" / "val" / "images")
    run_cli("predict", str(run / "model.onnx"), src, "--out", "a", cwd=tmp_path)
    run_cli("predict", str(run / "checkpoints" / "best.pt"), src, "--out", "b", cwd=tmp_path)
    ra = [json.loads(x) for x in (tmp_path / "a" / "predictions.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (tmp_path / "b" / "predictions.jsonl").read_text().splitlines()]
    assert len(ra) == len(rb) == 4
    for x, y in zip(ra, rb, strict=True):
        assert x["path"] == y["path"]
        assert all(abs(x["class_share"][c] - y["class_share"][c]) < 1e-3 for c in CLASSES)


def test_export_command_checks_parity_on_real_images(finished_run, tmp_path):
    run, tmp, _ = finished_run
    out = tmp_path / "again.onnx"
    proc = run_cli("export", str(run), "--out", str(out), cwd=tmp)
    assert out.is_file() and "parity max abs diff" in " ".join(proc.stdout.split())
    from visionpipe.export.onnx import read_metadata
    assert read_metadata(out)["class_names"] == CLASSES


def test_export_int8_calibrates_on_training_images_and_compares_on_val(finished_run, tmp_path):
    """Segmentation samples name their image in ``.image``: static int8 calibrates and compares without extra flags."""
    run, tmp, _ = finished_run
    proc = run_cli("export", str(run), "--out", str(tmp_path / "m.onnx"), "--quantize", "int8", cwd=tmp)
    report = json.loads((tmp_path / "m.int8.json").read_text())
    assert report["mode"] == "static" and report["calibration_images"] == 8, "the 8 training images"
    acc = report["accuracy"]
    assert acc["images"] == 4 and 0 <= acc["max_abs_diff"] < 1, "the 4 val images, int8 against fp32"
    assert "outputs vs fp32 on 4 images" in " ".join(proc.stdout.split())
