"""ONNX export (dynamic batch, parity on real images, zero-proposal safety), batched predict, and COCO
results through pycocotools."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from tests.detection.conftest import tiny_shapes
from visionpipe.cli import app
from visionpipe.errors import DataError
from visionpipe.export.onnx import export_onnx, read_metadata
from visionpipe.infer.backends import Backend, TorchBackend, open_backend
from visionpipe.task import DataBundle
from visionpipe_plugins.detection import cli as det_cli
from visionpipe_plugins.detection.config import DetectionConfig, LoadConfig
from visionpipe_plugins.detection.data import DetectionDataset, load_splits
from visionpipe_plugins.detection.export import ExportedDetector, make_compare, split_detections
from visionpipe_plugins.detection.formats import coco_index, load_coco_json
from visionpipe_plugins.detection.metrics import coco_evaluate
from visionpipe_plugins.detection.predict import DetectionPredictor
from visionpipe_plugins.detection.task import DetectionTask

MODEL = {"name": "resnet_fpn", "backbone": "resnet18", "returned_layers": [3, 4], "fpn_channels": 32,
         "representation_size": 32, "min_size": 64, "max_size": 64, "anchor_sizes": [[16], [32], [64]],
         "box_score_thresh": 0.0}


def _task(root: Path) -> DetectionTask:
    split = {s: {"annotations": f"annotations/{s}.json", "images": "images"} for s in ("train", "val", "test")}
    cfg = DetectionConfig.model_validate({"task": "detection", "load": {"root": str(root), **split},
                                          "model": MODEL})
    return DetectionTask(cfg, None)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DetectionTask, DataBundle, torch.nn.Module, Path]:
    """One tiny detector, exported once for the module: (model.onnx, task, data, model, dataset root)."""
    tmp_path = tmp_path_factory.mktemp("exported")
    root = tiny_shapes(tmp_path / "shapes")
    torch.manual_seed(0)
    task = _task(root)
    data = task.build_data()
    model = task.build_model(data.info).eval()
    spec = task.export_spec(model, data, data.info, 3)
    assert [args[0].shape[0] for args in spec.parity_inputs] == [3, 1]  # a real batch, then one image alone
    report = export_onnx(spec, tmp_path / "model.onnx", opset=17, tolerance=1e-3)
    assert report["parity_inputs"] == 2 and report["max_abs_diff"] <= 1e-3
    return tmp_path / "model.onnx", task, data, model, root


def test_onnx_export_has_a_dynamic_batch_and_matches_pytorch_on_any_size(exported) -> None:
    path, task, data, model, _ = exported
    onnx.checker.check_model(str(path), full_check=True)
    meta = read_metadata(path)
    assert meta["class_names"] == ["circle", "square", "triangle", "cross"] and meta["category_ids"] == [1, 2, 3, 4]
    assert meta["score_threshold"] == 0.0 and meta["preprocess"]["min_size"] == 64
    assert meta["outputs"] == ["boxes", "labels", "scores", "num_detections"] and meta["max_detections"] == 100
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.shape for i in sess.get_inputs()] == [["batch", 3, "height", "width"]]
    assert [o.shape for o in sess.get_outputs()] == [["batch", 100, 4], ["batch", 100], ["batch", 100], ["batch"]]
    compare = make_compare(0.0)
    torch.manual_seed(1)
    # 37 x 81: a size never seen at export time; 194 x 438 and 377 x 460: sizes torchvision's traced resize made one
    # pixel narrower in onnxruntime (63 columns, not 64) than in PyTorch
    for shape in [(1, 3, 48, 48), (3, 3, 48, 48), (3, 3, 37, 81), (1, 3, 194, 438), (1, 3, 377, 460)]:
        x = torch.rand(*shape)
        got = sess.run(None, {"images": x.numpy()})
        with torch.no_grad():
            ref = [t.numpy() for t in ExportedDetector(model).eval()(x)]
            plain = model(list(x))
        assert [g.shape for g in got] == [(shape[0], 100, 4), (shape[0], 100), (shape[0], 100), (shape[0],)]
        assert got[1].dtype == np.int64 and got[3].dtype == np.int64
        assert compare(ref, got) < 1e-3
        singles = [sess.run(None, {"images": x[i:i + 1].numpy()}) for i in range(shape[0])]
        for j in range(4):  # image i of a batch gets what it gets alone
            np.testing.assert_allclose(got[j], np.concatenate([s[j] for s in singles]), atol=1e-4)
        for (boxes, labels, scores), p in zip(split_detections(ref), plain, strict=True):
            assert len(scores) == len(p["scores"])  # the export guard and the padding change nothing
            np.testing.assert_allclose(boxes, p["boxes"].numpy(), atol=1e-4)
            np.testing.assert_array_equal(labels, p["labels"].numpy())
        assert not got[2][0, got[3][0]:].any() and not got[1][0, got[3][0]:].any()  # padding is zeros


def test_onnx_model_with_zero_proposals_still_runs(shapes_root: Path, tmp_path: Path) -> None:
    task = _task(shapes_root)
    data = task.build_data()
    model = task.build_model(data.info).eval()
    model.rpn.score_thresh = 1.5  # no proposal survives: the traced graph must cope with none
    spec = task.export_spec(model, data, data.info, 2)
    export_onnx(spec, tmp_path / "m.onnx", opset=17)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    boxes, labels, scores, counts = sess.run(None, {"images": np.random.rand(2, 3, 50, 60).astype(np.float32)})
    assert boxes.shape == (2, 100, 4) and counts.tolist() == [0, 0] and not scores.any()
    assert [len(d[0]) for d in split_detections([boxes, labels, scores, counts])] == [0, 0]


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
    # padded batches: rows past num_detections are ignored, images are compared one by one
    padded = [np.concatenate([ref[0], np.zeros((1, 2, 4), np.float32)], 1), np.array([[1, 2, 0, 0]]),
              np.array([[0.9, 0.8, 0, 0]]), np.array([2])]
    assert make_compare(0.05)(padded, [a.copy() for a in padded]) == 0.0
    junk = [a.copy() for a in padded]
    junk[0][0, 3], junk[1][0, 3], junk[2][0, 3] = [50, 50, 60, 60], 4, 0.99  # beyond num_detections
    assert make_compare(0.05)(padded, junk) == 0.0
    batch = [np.concatenate([a, a]) for a in padded]
    swapped = [a.copy() for a in batch]
    swapped[3] = np.array([2, 1])  # the second image lost a strong detection
    assert make_compare(0.05)(batch, [a.copy() for a in batch]) == 0.0
    assert make_compare(0.05)(batch, swapped) == float("inf")
    assert make_compare(0.05)(batch, padded) == float("inf")  # different number of images


def test_parity_compare_allows_a_near_tie_at_the_detection_cap() -> None:
    """With as many detections as the model keeps (k), a near-tie at the lowest score may fall either side of the
    cap in ONNX and PyTorch: that is float noise, not a missing detection; a strong one missing still fails."""
    boxes = np.array([[[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]]], np.float32)
    ref = [boxes, np.array([[1, 2, 1]]), np.array([[0.9, 0.8, 0.300001]], np.float32), np.array([3])]
    other = boxes.copy()
    other[0, 2] = [60, 0, 70, 10]  # the fourth candidate, scoring 0.3 in both, took the last row
    got = [other, np.array([[1, 2, 2]]), np.array([[0.9, 0.8, 0.3]], np.float32), np.array([3])]
    assert make_compare(0.05)(ref, got) == pytest.approx(0.0, abs=1e-5)
    strong = [boxes, np.array([[1, 2, 1]]), np.array([[0.9, 0.8, 0.7]], np.float32), np.array([3])]
    lost = [other, np.array([[1, 2, 1]]), np.array([[0.9, 0.8, 0.2]], np.float32), np.array([3])]
    assert make_compare(0.05)(strong, lost) >= 1.0  # 0.7 is above the other side's lowest score: required
    not_full = [a[:, :2] if a.ndim > 1 else np.array([2]) for a in got]  # room for more: all strong ones required
    assert make_compare(0.05)(ref, not_full) > 0.5
    # every score tied (an untrained model): no detection is required, but the scores kept must still agree
    tied = [boxes, np.array([[1, 1, 1]]), np.full((1, 3), 0.2, np.float32), np.array([3])]
    reordered = [boxes[:, ::-1].copy(), tied[1], tied[2], tied[3]]
    assert make_compare(0.05)(tied, reordered) == 0.0
    assert make_compare(0.05)(tied, [reordered[0], tied[1], tied[2] + 0.01, tied[3]]) == pytest.approx(0.01)


def _predict_folder(backend: Backend, meta: dict, folder: Path, out: Path, batch_size: int) -> tuple[list[dict], list[int]]:
    """Predict a folder as `visionpipe predict` does; (records, the batch sizes the model was fed)."""
    fed: list[int] = []
    run = backend.run
    backend.run = lambda feed: fed.append(len(feed["images"])) or run(feed)
    DetectionTask.predict(backend, meta, str(folder), out, {"batch_size": batch_size, "workers": 0})
    backend.run = run
    recs = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return recs, fed


@pytest.mark.parametrize("kind", ["onnxruntime", "torch"])
def test_predict_in_batches_gives_the_single_image_predictions(exported, tmp_path: Path, kind: str) -> None:
    path, task, data, model, root = exported
    if kind == "onnxruntime":
        backend, meta = open_backend(str(path), device="cpu")
    else:  # what `predict` builds from a .pt checkpoint: the export module, run eagerly
        spec = task.export_spec(model, None, data.info, 0)
        backend, meta = TorchBackend(spec.module, spec.input_names, "cpu"), {**spec.metadata, "outputs": spec.output_names}
    folder = tmp_path / "photos"
    folder.mkdir()
    images = sorted((root / "images").rglob("*.png"))[:5]
    for i, p in enumerate(images):  # in name order: three 48 x 48, one 40 x 56, then 48 x 48 again
        img = cv2.imread(str(p))
        cv2.imwrite(str(folder / f"{i}.png"), cv2.resize(img, (56, 40)) if i == 3 else img)
    one, fed_one = _predict_folder(backend, meta, folder, tmp_path / "one", 1)
    many, fed_many = _predict_folder(backend, meta, folder, tmp_path / "many", 8)
    assert fed_one == [1] * 5 and fed_many == [3, 1, 1]  # consecutive images of one size share a batch
    assert [r["path"] for r in one] == [r["path"] for r in many] and len(one) == 5
    for a, b in zip(one, many, strict=True):
        assert (a["width"], a["height"]) == (b["width"], b["height"])
        assert a["labels"] == b["labels"] and len(a["boxes"]) == len(b["boxes"]) > 0
        np.testing.assert_allclose(a["boxes"], b["boxes"], atol=1e-2)
        np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-4)


def test_predictor_reads_models_exported_with_a_batch_of_one(exported) -> None:
    meta = {**read_metadata(exported[0]), "outputs": ["boxes", "labels", "scores"]}
    pred = DetectionPredictor(meta, {"score_threshold": 0.5})
    assert not pred.batchable  # an old model takes one image per run
    rec = pred.postprocess([np.array([[1, 2, 30, 40], [0, 0, 5, 5]], np.float32), np.array([2, 1]),
                            np.array([0.9, 0.4], np.float32)], (48, 64))
    assert rec["boxes"] == [[1, 2, 30, 40]] and rec["labels"] == ["square"] and rec["scores"] == [0.9]


def test_a_score_threshold_below_the_models_own_is_warned_about(exported, caplog) -> None:
    meta = {**read_metadata(exported[0]), "score_threshold": 0.3}
    with caplog.at_level("WARNING"):
        DetectionPredictor(meta, {"score_threshold": 0.5})
        assert not caplog.records
        DetectionPredictor(meta, {})
        assert not caplog.records
        DetectionPredictor(meta, {"score_threshold": 0.1})
    assert "score_threshold 0.1 is below the model's box_score_thresh 0.3" in caplog.text


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


def test_no_detections_on_some_images_scores_the_classes_pycocotools_would(shapes_root: Path) -> None:
    """Without any detection the per-class keys must be those pycocotools reports for the same images."""
    gt_file = shapes_root / "annotations" / "train.json"
    gt = coco_index(load_coco_json(gt_file))
    doc = json.loads(gt_file.read_text())
    first = doc["annotations"][0]["image_id"]
    ours, _ = coco_evaluate(gt, [], image_ids=[first])
    # one far-away, low-scoring detection on an image outside the subset: pycocotools runs, nothing is found
    miss = [{"image_id": doc["images"][-1]["id"], "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.01}]
    theirs, _ = coco_evaluate(gt, miss, image_ids=[first])
    names = {c["id"]: c["name"] for c in doc["categories"]}
    on_first = {f"AP/{names[a['category_id']]}" for a in doc["annotations"] if a["image_id"] == first}
    assert {k for k in ours if k.startswith("AP/")} == {k for k in theirs if k.startswith("AP/")} == on_first
    assert all(ours[k] == 0.0 for k in ours)


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


def test_predictor_records_drawing_and_coco_results_that_load(exported, tmp_path: Path) -> None:
    path, *_, shapes_root = exported
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


def test_evaluating_a_split_without_boxes_is_a_clear_error(shapes_root: Path) -> None:
    """No ground truth: pycocotools gives no AP (-1); it was reported as 0 without detections and left out
    with some, which the trainer then took for a mistyped train.monitor."""
    import dataclasses

    from visionpipe.errors import VisionpipeError
    from visionpipe_plugins.detection.data import collate

    task = _task(shapes_root)
    records, cats, *_ = load_splits(task.cfg.load)
    model = task.build_model({"class_names": cats.names}).eval()
    empty = [dataclasses.replace(r, boxes=r.boxes[:0], labels=r.labels[:0], crowd=r.crowd[:0], areas=r.areas[:0])
             for r in records["val"]]
    crowd_only = [dataclasses.replace(r, crowd=np.ones_like(r.crowd)) for r in records["val"]]
    for recs in (empty, crowd_only):
        loader = torch.utils.data.DataLoader(DetectionDataset(recs, categories=cats), batch_size=2, collate_fn=collate)
        with pytest.raises(VisionpipeError, match=r"evaluation split has no boxes to find \(3 image\(s\)"):
            task.evaluate(model, loader, device=torch.device("cpu"), epoch=1)


def _gt_variant(gt_file: Path, out: Path, *drop: str) -> Path:
    """``gt_file`` with the annotation fields ``drop`` removed from every annotation."""
    doc = json.loads(gt_file.read_text())
    for a in doc["annotations"]:
        for k in drop:
            a.pop(k)
    out.write_text(json.dumps(doc))
    return out


@pytest.mark.parametrize("drop", [("area",), ("iscrowd",), ("id",), ("area", "iscrowd", "id")])
def test_evaluate_coco_fills_ground_truth_defaults_as_training_does(shapes_root: Path, tmp_path: Path,
                                                                   drop: tuple[str, ...]) -> None:
    gt_file = shapes_root / "annotations" / "val.json"
    res_file = tmp_path / "results.json"
    res_file.write_text(json.dumps(_perfect_results(gt_file)))
    plain = _gt_variant(gt_file, tmp_path / "plain.json", *drop)
    assert det_cli.evaluate_coco_files(res_file, plain)["AP50"] == pytest.approx(1.0)
    records, *_ = load_splits(LoadConfig(root=str(tmp_path), val={"annotations": "plain.json", "images": "shapes/images"}))
    assert len(records["val"]) == 3  # training reads the same file


@pytest.mark.parametrize("change, message", [
    ({"bbox": [1, 2, 3]}, r"bbox: must be 4 finite numbers \[x, y, width, height\] \(got \[1, 2, 3\]\)"),
    ({"bbox": "abc"}, r"bbox: must be 4 finite numbers \[x, y, width, height\] \(got 'abc'\)"),
    ({"bbox": [1, 2, float("nan"), 4]}, r"bbox: must be 4 finite numbers"),
    ({"bbox": [1, 2, -3, 4]}, r"bbox: width and height must be >= 0"),
    ({"score": "high"}, r"score: must be a finite number \(got 'high'\)"),
    ({"score": float("inf")}, r"score: must be a finite number"),
    ({"score": None}, r"score: must be a finite number \(got None\)"),
    ({"image_id": 999}, r"image_id 999 is not in the ground truth .*val\.json"),
    ({"image_id": [1]}, r"image_id \[1\] is not in the ground truth"),
    ({"category_id": "1"}, r"category_id '1' is not in the ground truth"),
    ({"score": ...}, r"score: missing"),
])
def test_evaluate_coco_bad_results_name_file_entry_and_field(shapes_root: Path, tmp_path: Path, change: dict,
                                                             message: str) -> None:
    gt_file = shapes_root / "annotations" / "val.json"
    results = _perfect_results(gt_file)
    results[1] = {k: v for k, v in {**results[1], **change}.items() if v is not ...}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(results))
    with pytest.raises(DataError, match=rf"^{re.escape(str(bad))}: entry 1: {message}"):
        det_cli.evaluate_coco_files(bad, gt_file)


def test_evaluate_coco_command_reports_a_bad_ground_truth_in_one_line(shapes_root: Path, tmp_path: Path) -> None:
    gt_file = shapes_root / "annotations" / "val.json"
    res_file = tmp_path / "results.json"
    res_file.write_text(json.dumps(_perfect_results(gt_file)))
    doc = json.loads(gt_file.read_text())
    doc["annotations"][0].pop("category_id")
    (tmp_path / "gt.json").write_text(json.dumps(doc))
    det_cli.register(app)
    result = CliRunner().invoke(app, ["evaluate-coco", str(res_file), "--gt", str(tmp_path / "gt.json")])
    assert result.exit_code == 1 and isinstance(result.exception, DataError)
    assert str(result.exception) == f"{tmp_path / 'gt.json'}: annotations[0] (id {doc['annotations'][0]['id']}): " \
                                    "category_id: missing"


def _perfect_records(gt_file: Path, image_dir: Path) -> list[dict]:
    """Prediction records (as predictions.jsonl holds them) that find every ground-truth box."""
    doc = json.loads(gt_file.read_text())
    recs = {im["id"]: {"path": str(image_dir / im["file_name"]), "width": im["width"], "height": im["height"],
                       "boxes": [], "labels": [], "category_ids": [], "scores": []} for im in doc["images"]}
    for a in doc["annotations"]:
        x, y, w, h = a["bbox"]
        r = recs[a["image_id"]]
        r["boxes"].append([x, y, x + w, y + h])
        r["labels"].append("x")
        r["category_ids"].append(a["category_id"])
        r["scores"].append(0.9)
    return list(recs.values())


def test_predict_scores_against_a_given_ground_truth_without_area_or_ids(shapes_root: Path, tmp_path: Path) -> None:
    gt_file = shapes_root / "annotations" / "test.json"
    plain = _gt_variant(gt_file, tmp_path / "plain.json", "area", "iscrowd", "id")
    meta = {"class_names": ["circle", "square", "triangle", "cross"], "category_ids": [1, 2, 3, 4]}
    pred = DetectionPredictor(meta, {"gt": str(plain)})
    files = pred.write_extra(tmp_path / "out", iter(_perfect_records(gt_file, shapes_root / "images")))
    assert files[-1].name == "coco_metrics.json"
    assert json.loads(files[-1].read_text())["AP50"] == pytest.approx(1.0)


def test_predict_skips_a_training_ground_truth_that_no_longer_loads(shapes_root: Path, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    gt_file = shapes_root / "annotations" / "test.json"
    (tmp_path / "broken.json").write_text(json.dumps({"images": [{"id": 1}], "categories": [{"id": 1, "name": "a"}]}))
    meta = {"class_names": ["circle", "square", "triangle", "cross"], "category_ids": [1, 2, 3, 4],
            "ground_truth": [{"annotations": str(tmp_path / "broken.json"), "images": str(shapes_root / "images")}]}
    files = DetectionPredictor(meta, {}).write_extra(tmp_path / "out",
                                                     iter(_perfect_records(gt_file, shapes_root / "images")))
    assert [f.name for f in files] == ["coco_results.json", "coco_images.json"]
    assert "broken.json: images[0] (id 1): file_name: missing" in caplog.text


def test_predict_with_a_bad_ground_truth_fails_before_predicting(exported, tmp_path: Path) -> None:
    path, *_, shapes_root = exported
    doc = json.loads((shapes_root / "annotations" / "test.json").read_text())
    doc["annotations"][0]["bbox"] = "abc"
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    result = CliRunner().invoke(app, ["predict", str(path), str(shapes_root / "images" / "test"), "-o",
                                      f"gt={tmp_path / 'bad.json'}", "--out", str(tmp_path / "out")])
    assert isinstance(result.exception, DataError), result.output
    assert str(result.exception).startswith(f"{tmp_path / 'bad.json'}: annotations[0] "
                                            f"(id {doc['annotations'][0]['id']}): bbox: must be")
    assert not (tmp_path / "out" / "predictions.jsonl").exists()


def test_predict_refuses_a_ground_truth_without_the_models_category_ids(exported, tmp_path: Path, caplog) -> None:
    """Another dataset's ids: pycocotools ignores every detection and predict reported AP 0 as a result."""
    path, *_, shapes_root = exported
    doc = json.loads((shapes_root / "annotations" / "test.json").read_text())
    for c in doc["categories"]:
        c["id"] += 10
    for a in doc["annotations"]:
        a["category_id"] += 10
    (tmp_path / "other.json").write_text(json.dumps(doc))
    meta = read_metadata(path)
    with pytest.raises(DataError, match=r"other\.json: none of the model's category ids \(1, 2, 3, 4\) is among the "
                                        r"file's categories \(11, 12, 13, 14\)"):
        DetectionPredictor(meta, {"gt": str(tmp_path / "other.json")})
    doc = json.loads((shapes_root / "annotations" / "test.json").read_text())
    doc["categories"][0]["name"] = "person"
    (tmp_path / "renamed.json").write_text(json.dumps(doc))
    with caplog.at_level("WARNING"):
        DetectionPredictor(meta, {"gt": str(tmp_path / "renamed.json")})
    assert "1 is 'circle' in the model, 'person' there" in caplog.text


def test_opsets_onnxruntime_cannot_run_are_refused_before_export(shapes_root: Path, tmp_path: Path) -> None:
    from visionpipe.config import load_config
    from visionpipe.errors import ConfigError, ExportError

    task = _task(shapes_root)
    data = task.build_data()
    spec = task.export_spec(task.build_model(data.info).eval(), data, data.info, 1)
    for opset, why in ((22, "exports up to opset 21"), (9, "exports opsets 11-23")):
        with pytest.raises(ExportError, match=why):  # was: exported, then onnxruntime NOT_IMPLEMENTED RoiAlign(22)
            export_onnx(spec, tmp_path / "m.onnx", opset=opset)
    assert not (tmp_path / "m.onnx").exists()
    p = tmp_path / "det.yaml"
    p.write_text(f"task: detection\nload: {{root: {shapes_root}, train: train}}\nexport:\n  opset: 22\n")
    with pytest.raises(ConfigError, match=r"det\.yaml:4: export\.opset: .*21"):  # at validate, not after training
        load_config(p)


def test_sharded_predict_gets_its_coco_files_from_merge(exported, tmp_path: Path) -> None:
    from visionpipe.infer.runner import merge_predictions, run_predict

    path, _, _, _, root = exported
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, p in enumerate(sorted((root / "images").rglob("*.png"))[:5]):
        (folder / f"{i}.png").write_bytes(p.read_bytes())

    def predict(out: Path, shard: str | None) -> None:
        backend, meta = open_backend(str(path), device="cpu")
        opts = {"batch_size": 2, "score_threshold": 0.0, **({"shard": shard} if shard else {})}
        run_predict(DetectionTask, backend, meta, str(folder), out, opts)

    predict(tmp_path / "one", None)
    for shard in ("0/2", "1/2"):
        predict(tmp_path / "sharded", shard)
    # each shard used to write coco_results.json for its own images, numbered 1.. again, the last one winning
    assert not (tmp_path / "sharded" / "coco_results.json").exists()
    result = merge_predictions(tmp_path / "sharded")
    assert sorted(Path(p).name for p in result["extra"]) == ["coco_images.json", "coco_results.json"]
    for name in ("coco_results.json", "coco_images.json"):
        assert json.loads((tmp_path / "sharded" / name).read_text()) == json.loads((tmp_path / "one" / name).read_text())
    assert len(json.loads((tmp_path / "one" / "coco_images.json").read_text())["images"]) == 5


def test_merge_without_the_shards_model_merges_the_records_and_says_what_is_missing(exported, tmp_path: Path,
                                                                                    caplog) -> None:
    from visionpipe.infer.runner import merge_predictions, run_predict

    model = tmp_path / "model.onnx"
    model.write_bytes(exported[0].read_bytes())
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, p in enumerate(sorted((exported[4] / "images").rglob("*.png"))[:3]):
        (folder / f"{i}.png").write_bytes(p.read_bytes())
    for shard in ("0/2", "1/2"):
        backend, meta = open_backend(str(model), device="cpu")
        run_predict(DetectionTask, backend, meta, str(folder), tmp_path / "out", {"shard": shard})
    model.unlink()
    with caplog.at_level("WARNING"):
        result = merge_predictions(tmp_path / "out")
    assert result["predictions"]["records"] == 3 and "extra" not in result
    assert "the records are merged, but not the files built from all of them" in caplog.text
    assert "gone or changed since the shards ran" in caplog.text
    assert not (tmp_path / "out" / "coco_results.json").exists()
