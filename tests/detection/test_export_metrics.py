"""ONNX export parity on real images, zero-proposal safety, and COCO results through pycocotools."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner
from visionpipe_plugins.detection import cli as det_cli
from visionpipe_plugins.detection.config import DetectionConfig
from visionpipe_plugins.detection.data import DetectionDataset, load_splits
from visionpipe_plugins.detection.export import ExportedDetector, make_compare
from visionpipe_plugins.detection.formats import coco_index, load_coco_json
from visionpipe_plugins.detection.metrics import coco_evaluate
from visionpipe_plugins.detection.predict import DetectionPredictor
from visionpipe_plugins.detection.task import DetectionTask

from visionpipe.cli import app
from visionpipe.export.onnx import export_onnx, read_metadata
from visionpipe.task import DataBundle

MODEL = {"name": "resnet_fpn", "backbone": "resnet18", "returned_layers": [3, 4], "fpn_channels": 32,
         "representation_size": 32, "min_size": 64, "max_size": 64, "anchor_sizes": [[16], [32], [64]],
         "box_score_thresh": 0.0}


def _task(root: Path) -> DetectionTask:
    split = {s: {"annotations": f"annotations/{s}.json", "images": "images"} for s in ("train", "val", "test")}
    cfg = DetectionConfig.model_validate({"task": "detection", "load": {"root": str(root), **split},
                                          "model": MODEL})
    return DetectionTask(cfg, None)


@pytest.fixture
def exported(shapes_root: Path, tmp_path: Path) -> tuple[Path, DetectionTask, DataBundle, torch.nn.Module]:
    torch.manual_seed(0)
    task = _task(shapes_root)
    data = task.build_data()
    model = task.build_model(data.info).eval()
    spec = task.export_spec(model, data, data.info, 3)
    report = export_onnx(spec, tmp_path / "model.onnx", opset=17, tolerance=1e-3)
    assert report["parity_inputs"] == 3 and report["max_abs_diff"] <= 1e-3
    return tmp_path / "model.onnx", task, data, model


def test_onnx_export_matches_pytorch_on_real_images_of_any_size(exported) -> None:
    path, task, data, model = exported
    meta = read_metadata(path)
    assert meta["class_names"] == ["circle", "square", "triangle", "cross"] and meta["category_ids"] == [1, 2, 3, 4]
    assert meta["score_threshold"] == 0.0 and meta["preprocess"]["min_size"] == 64
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    compare = make_compare(0.0)
    for shape in [(1, 3, 48, 48), (1, 3, 37, 81)]:  # a size never seen at export time
        x = torch.rand(*shape)
        got = sess.run(None, {"images": x.numpy()})
        with torch.no_grad():
            ref = [t.numpy() for t in ExportedDetector(model).eval()(x)]
            plain = model([x[0]])[0]
        assert got[0].shape[0] == 1 and got[0].shape[2] == 4 and got[1].dtype == np.int64
        assert compare(ref, got) < 1e-3
        assert len(plain["scores"]) == ref[2].shape[1]  # the export guard changes nothing
        if len(plain["boxes"]):
            np.testing.assert_allclose(plain["boxes"].numpy(), ref[0][0], atol=1e-4)


def test_onnx_model_with_zero_proposals_still_runs(shapes_root: Path, tmp_path: Path) -> None:
    task = _task(shapes_root)
    data = task.build_data()
    model = task.build_model(data.info).eval()
    model.rpn.score_thresh = 1.5  # no proposal survives: the traced graph must cope with none
    spec = task.export_spec(model, data, data.info, 2)
    export_onnx(spec, tmp_path / "m.onnx", opset=17)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    boxes, labels, scores = sess.run(None, {"images": np.random.rand(1, 3, 50, 60).astype(np.float32)})
    assert boxes.shape == (1, 0, 4) and labels.shape == (1, 0) and scores.shape == (1, 0)


def test_parity_compare_catches_missing_and_moved_detections() -> None:
    ref = [np.array([[[0, 0, 10, 10], [20, 20, 30, 30]]], np.float32), np.array([[1, 2]]), np.array([[0.9, 0.8]])]
    assert make_compare(0.05)(ref, [a.copy() for a in ref]) == 0.0
    moved = [ref[0] + np.array([0, 0, 1, 0], np.float32), ref[1], ref[2]]
    assert 0.05 < make_compare(0.05)(ref, moved) < 0.2
    assert make_compare(0.05)(ref, [a[:, :1] for a in ref]) == float("inf")
    relabeled = [ref[0], np.array([[2, 1]]), ref[2]]
    assert make_compare(0.05)(ref, relabeled) >= 1.0  # same-label partner does not overlap
    weak = [np.concatenate([ref[0], [[[40, 40, 45, 45]]]], 1), np.array([[1, 2, 3]]), np.array([[0.9, 0.8, 0.051]])]
    assert make_compare(0.05)(ref, weak) == 0.0  # near-threshold detections may differ


def _perfect_results(gt_file: Path) -> list[dict]:
    doc = json.loads(gt_file.read_text())
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
            for a in doc["annotations"]]


def test_coco_results_round_trip_through_pycocotools(shapes_root: Path, tmp_path: Path) -> None:
    gt_file = shapes_root / "annotations" / "val.json"
    results = _perfect_results(gt_file)
    res_file = tmp_path / "results.json"
    res_file.write_text(json.dumps(results))
    gt = coco_index(load_coco_json(gt_file))
    metrics, extra = coco_evaluate(gt, json.loads(res_file.read_text()))
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)
    doc = json.loads(gt_file.read_text())
    present = {c["name"] for c in doc["categories"] if any(a["category_id"] == c["id"] for a in doc["annotations"])}
    assert {k for k in metrics if k.startswith("AP/")} == {f"AP/{n}" for n in present}  # absent classes: no AP
    assert all(metrics[f"AP/{n}"] == pytest.approx(1.0) for n in present)
    assert extra["pr"] and "Average Precision" in extra["summary"]
    assert coco_evaluate(gt, [])[0]["AP50"] == 0.0  # nothing detected
    # a wrong class on every box scores zero
    wrong = [dict(r, category_id=(r["category_id"] % 4) + 1) for r in results]
    assert coco_evaluate(gt, wrong)[0]["AP50"] == pytest.approx(0.0)


def test_evaluate_coco_command(shapes_root: Path, tmp_path: Path) -> None:
    gt_file = shapes_root / "annotations" / "val.json"
    res_file = tmp_path / "results.json"
    res_file.write_text(json.dumps(_perfect_results(gt_file)))
    runner = CliRunner()
    det_cli.register(app)
    out = tmp_path / "m.json"
    result = runner.invoke(app, ["evaluate-coco", str(res_file), "--gt", str(gt_file), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "AP50" in result.output and json.loads(out.read_text())["AP50"] == pytest.approx(1.0)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image_id": 999, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1}]))
    with pytest.raises(Exception, match=r"bad\.json: entry 0: image_id 999 is not in the ground truth"):
        det_cli.evaluate_coco_files(bad, gt_file)


def test_predictor_records_drawing_and_coco_results_that_load(exported, shapes_root: Path, tmp_path: Path) -> None:
    path, *_ = exported
    meta = read_metadata(path)
    pred = DetectionPredictor(meta, {"draw_threshold": 0.0})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    from visionpipe.images import read_image

    images = sorted((shapes_root / "images" / "test").glob("*.png"))
    recs = []
    for p in images:
        img = read_image(p)
        feed, state = pred.preprocess(img)
        outs = sess.run(None, {"images": feed["images"][None]})
        rec = {"path": str(p), **pred.postprocess([o[0] for o in outs], state)}
        assert len(rec["boxes"]) == len(rec["labels"]) == len(rec["scores"]) == len(rec["category_ids"])
        assert all(0 <= b[0] <= b[2] <= img.shape[1] for b in rec["boxes"])
        drawn = pred.draw(img, rec)
        assert drawn.shape == img.shape and (len(rec["boxes"]) == 0 or not np.array_equal(drawn, img))
        recs.append(rec)
    files = pred.write_extra(tmp_path, iter(recs))
    assert [f.name for f in files] == ["coco_results.json", "coco_images.json", "coco_metrics.json"]
    results = json.loads((tmp_path / "coco_results.json").read_text())
    gt = coco_index(load_coco_json(shapes_root / "annotations" / "test.json"))  # the ids come from this file
    assert {r["image_id"] for r in results} <= set(gt.getImgIds())
    metrics, _ = coco_evaluate(gt, results)
    assert "AP50" in metrics
    # without a known ground truth the ids are the 1-based order, listed in coco_images.json
    pred2 = DetectionPredictor({**meta, "ground_truth": []}, {})
    pred2.write_extra(tmp_path / "plain", iter(recs))
    table = json.loads((tmp_path / "plain" / "coco_images.json").read_text())
    assert [im["id"] for im in table["images"]] == list(range(1, len(recs) + 1))
    plain_gt = coco_index(table)
    plain_results = json.loads((tmp_path / "plain" / "coco_results.json").read_text())
    if plain_results:
        assert len(plain_gt.loadRes(plain_results).getAnnIds()) == len(plain_results)


def test_evaluate_returns_coco_keys_and_writes_final_files(shapes_root: Path, tmp_path: Path) -> None:
    from visionpipe_plugins.detection.data import collate

    task = _task(shapes_root)
    records, cats, *_ = load_splits(task.cfg.load)
    model = task.build_model({"class_names": cats.names}).eval()
    loader = torch.utils.data.DataLoader(DetectionDataset(records["val"], categories=cats), batch_size=2, collate_fn=collate)
    with torch.no_grad():
        res = task.evaluate(model, loader, device=torch.device("cpu"), out_dir=tmp_path, epoch=None)
    assert {"AP", "AP50", "AP75", "detections"} <= set(res) and any(k.startswith("AP/") for k in res)
    assert (tmp_path / "eval" / "ground_truth.json").is_file() and (tmp_path / "eval" / "detections.json").is_file()
    metrics = det_cli.evaluate_coco_files(tmp_path / "eval" / "detections.json", tmp_path / "eval" / "ground_truth.json")
    assert metrics["AP50"] == pytest.approx(res["AP50"])
