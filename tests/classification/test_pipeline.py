"""The classification pipeline end to end on tiny data: run folder, ONNX, predict, resume."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import run_cli
from visionpipe.engine.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One full tiny run (train 2 epochs, evaluate, export, predict) shared by the tests below."""
    from tests.conftest import TINY_CLASSIFY, make_color_folder

    tmp = tmp_path_factory.mktemp("cls")
    data = make_color_folder(tmp / "data")
    p = tmp / "tiny.yaml"
    p.write_text(TINY_CLASSIFY.format(root=data, epochs=2)
                 + f"evaluate: {{split: val}}\npredict: {{source: {data / 'val'}, batch_size: 4}}\n")
    proc = run_cli("run", str(p), cwd=tmp)
    return tmp / "runs" / "tiny", tmp, data, proc


def test_run_folder_has_everything(finished_run):
    run, _, _, proc = finished_run
    for rel in ("config.yaml", "manifest.json", "metrics.json", "metrics.jsonl", "checkpoints/last.pt",
                "checkpoints/best.pt", "plots/curves.png", "plots/confusion_matrix.png", "model.onnx",
                "predictions/predictions.jsonl", "run.log"):
        assert (run / rel).is_file(), rel
    assert list((run / "tb").glob("events.out.tfevents.*")), "TensorBoard event file"
    assert not list(run.rglob(".vp-tmp-*")), "no temporary files left"
    assert "val/top1" in proc.stdout  # the summary table


def test_metrics_files(finished_run):
    run = finished_run[0]
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("val/top1", "val/top5", "val/loss", "val/precision/red", "val/recall/blue", "val/f1/red",
                "export/max_abs_diff"):
        assert key in metrics, key
    cm = np.array(metrics["val/confusion_matrix"])
    assert cm.shape == (2, 2) and cm.sum() == 8
    assert metrics["val/top1"] == pytest.approx(np.trace(cm) / cm.sum())
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert all("train/loss" in e and "val/top1" in e for e in epochs)


def test_manifest_records_versions_hashes_and_parity(finished_run):
    run = finished_run[0]
    m = json.loads((run / "manifest.json").read_text())
    assert m["status"] == "finished" and m["seed"] == 0 and m["device"] == "cpu"
    assert m["versions"]["torch"] and m["versions"]["visionpipe"]
    assert m["stages_done"] == ["load", "augment", "model", "train", "evaluate", "export", "predict"]
    assert m["export"]["max_abs_diff"] <= m["export"]["tolerance"] and m["export"]["checker"] == "passed"
    digest = hashlib.sha256((run / "model.onnx").read_bytes()).hexdigest()
    assert m["outputs"]["model.onnx"] == digest
    assert any(k.endswith("tiny.yaml") for k in m["inputs"])


def test_config_yaml_is_resolved_and_reloadable(finished_run, tmp_path):
    run = finished_run[0]
    proc = run_cli("validate", str(run / "config.yaml"), cwd=tmp_path)
    assert "batch_size: 8" in proc.stdout and "momentum: 0.9" in proc.stdout


def test_onnx_matches_pytorch_on_real_images(finished_run):
    import onnxruntime as ort

    from visionpipe.export.checkpoint_model import task_and_model_from_checkpoint
    from visionpipe.export.onnx import read_metadata

    run, _, data, _ = finished_run
    meta = read_metadata(run / "model.onnx")
    assert meta["task"] == "classification" and meta["class_names"] == ["blue", "red"]
    assert meta["input_size"] == [32, 32] and meta["mean"] == [0.5, 0.5, 0.5]
    task, model, _ = task_and_model_from_checkpoint(run / "checkpoints" / "best.pt")
    sess = ort.InferenceSession(str(run / "model.onnx"))
    t = task.eval_transform()
    from visionpipe.images import read_image
    imgs = sorted((data / "val").rglob("*.png"))[:5]
    x = np.stack([t(image=read_image(p))["image"].transpose(2, 0, 1) for p in imgs]).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = sess.run(["logits"], {"images": x})[0]
    assert np.abs(ref - got).max() < 1e-3


def _write_odd_images(folder: Path) -> dict[str, str]:
    """Good images in odd modes plus corrupt ones; returns kind → path."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    base = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
    paths = {}
    Image.fromarray(base).save(paths.setdefault("rgb", str(folder / "rgb.png")))
    Image.fromarray(base[..., 0]).save(paths.setdefault("gray", str(folder / "gray.png")))
    Image.fromarray(np.dstack([base, np.full((40, 48), 128, np.uint8)])).save(paths.setdefault("rgba", str(folder / "rgba.png")))
    (folder / "sub").mkdir()
    paths["16bit"] = str(folder / "sub" / "deep.png")
    Image.fromarray(base[..., 0].astype(np.uint16) * 257).save(paths["16bit"])
    img = Image.fromarray(base)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(paths.setdefault("exif", str(folder / "exif.jpg")), exif=exif)
    (folder / "empty.jpg").write_bytes(b"")
    paths["empty"] = str(folder / "empty.jpg")
    (folder / "text.png").write_bytes(b"hello, not a png")
    paths["text"] = str(folder / "text.png")
    good = (folder / "rgb.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 3])
    paths["truncated"] = str(folder / "truncated.png")
    return paths


def test_predict_folder_with_corrupt_files(finished_run, tmp_path):
    run = finished_run[0]
    paths = _write_odd_images(tmp_path / "in")
    before = {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths.values()}
    out = tmp_path / "out"
    proc = run_cli("predict", str(run / "model.onnx"), str(tmp_path / "in"), "--out", str(out), "--top-k", "2",
                   "--save-images", cwd=tmp_path)
    summary = json.loads(proc.stdout)
    assert summary["images"] == 5 and summary["errors"] == 3
    preds = {json.loads(x)["path"]: json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()}
    errors = {json.loads(x)["path"]: json.loads(x)["error"] for x in (out / "errors.jsonl").read_text().splitlines()}
    assert set(preds) == {paths[k] for k in ("rgb", "gray", "rgba", "16bit", "exif")}
    assert set(errors) == {paths[k] for k in ("empty", "text", "truncated")}
    assert all(errors.values())
    for rec in preds.values():
        assert len(rec["labels"]) == 2 and set(rec["labels"]) == {"blue", "red"}
        assert abs(sum(rec["scores"]) - 1.0) < 1e-4
    assert (out / "images" / "sub" / "deep.png").is_file()
    after = {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths.values()}
    assert before == after, "inputs are never rewritten"
    # a second run of the same command resumes: nothing is predicted twice
    proc = run_cli("predict", str(run / "model.onnx"), str(tmp_path / "in"), "--out", str(out), "--top-k", "2",
                   cwd=tmp_path)
    assert json.loads(proc.stdout)["images"] == 0
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 5


def test_predict_with_checkpoint_matches_onnx(finished_run, tmp_path):
    run, _, data, _ = finished_run
    a = run_cli("predict", str(run / "model.onnx"), str(data / "val"), "--out", "a", cwd=tmp_path)
    b = run_cli("predict", str(run / "checkpoints" / "best.pt"), str(data / "val"), "--out", "b", cwd=tmp_path)
    assert json.loads(a.stdout)["images"] == json.loads(b.stdout)["images"] == 8
    ra = [json.loads(x) for x in (tmp_path / "a" / "predictions.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (tmp_path / "b" / "predictions.jsonl").read_text().splitlines()]
    for x, y in zip(ra, rb, strict=False):
        assert x["path"] == y["path"] and x["labels"] == y["labels"]
        assert np.allclose(x["scores"], y["scores"], atol=1e-4)


def test_export_command_from_run_folder(finished_run, tmp_path):
    run = finished_run[0]
    out = tmp_path / "again.onnx"
    proc = run_cli("export", str(run), "--opset", "18", "--out", str(out), cwd=finished_run[1])
    assert out.is_file() and "parity max abs diff" in proc.stdout
    import onnx
    assert onnx.load(str(out)).opset_import[0].version == 18


def test_export_of_a_checkpoint_outside_a_run_writes_next_to_it(finished_run, tmp_path):
    """Without --out, a .pt that is not in a run's checkpoints/ gets its model.onnx beside it, not two levels up."""
    keep = tmp_path / "keep"
    keep.mkdir()
    shutil.copy(finished_run[0] / "checkpoints" / "best.pt", keep / "best.pt")
    run_cli("export", str(keep / "best.pt"), cwd=finished_run[1])
    assert (keep / "model.onnx").is_file() and not (tmp_path / "model.onnx").exists()


def test_resume_of_finished_run_says_so(finished_run):
    run, tmp = finished_run[0], finished_run[1]
    before = (run / "checkpoints" / "last.pt").stat().st_mtime_ns
    proc = run_cli("run", "--resume", str(run), cwd=tmp)
    assert "already finished" in proc.stderr
    assert (run / "checkpoints" / "last.pt").stat().st_mtime_ns == before


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def test_resume_continues_exactly(tmp_path, tiny_pipeline):
    """2 epochs + resume to 4 == 4 epochs straight: model, optimizer, RNG and data order restored."""
    p = tiny_pipeline(epochs=4)
    run_cli("run", str(p), "--run-dir", "straight", cwd=tmp_path)
    run_cli("run", str(p), "--run-dir", "split", "--set", "train.epochs=2", cwd=tmp_path)
    run_cli("run", "--resume", "split", "--set", "train.epochs=4", cwd=tmp_path)
    a, b = _weights(tmp_path / "straight/checkpoints/last.pt"), _weights(tmp_path / "split/checkpoints/last.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3, 4]


def test_kill_and_resume(tmp_path, tiny_pipeline):
    """SIGKILL mid-run leaves a loadable last.pt; --resume finishes from it."""
    p = tiny_pipeline(epochs=8)
    env = {**os.environ, "VISIONPIPE_PROGRESS": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "visionpipe", "run", str(p), "--run-dir", "r"], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "r" / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        if last.is_file():
            try:
                epoch = load_checkpoint(last)["epoch"]
            except Exception:
                epoch = 0
            if epoch >= 1:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed_at = epoch
                break
        time.sleep(0.05)
    assert killed_at is not None and killed_at < 8, "the run was killed mid-training"
    state = load_checkpoint(last)
    assert 1 <= state["epoch"] < 8 and not state["finished"]
    done = run_cli("run", "--resume", "r", cwd=tmp_path)
    assert "resumed at epoch" in done.stderr
    final = load_checkpoint(last)
    assert final["epoch"] == 8 and final["finished"]
    epochs = [json.loads(x)["epoch"] for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert epochs[-1] == 8 and len(set(epochs)) == len(epochs), "no epoch logged twice"
    assert not list((tmp_path / "r").rglob(".vp-tmp-*"))


def test_stages_without_their_blocks_run_with_defaults(tmp_path, color_data):
    """A stage listed in `stages:` with no block of its own runs with that block's defaults."""
    p = tmp_path / "bare.yaml"
    p.write_text(f"task: classification\nname: bare\nload: {{root: {color_data}}}\n"
                 "augment: {image_size: [32, 32]}\nmodel: {name: resnet18}\n"
                 "stages: [load, augment, model, train, export]\n")
    run_cli("run", str(p), "--set", "train.epochs=2", cwd=tmp_path)
    run = tmp_path / "runs" / "bare"
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 2
    report = json.loads((run / "manifest.json").read_text())["export"]
    assert (run / "model.onnx").is_file() and report["opset"] == 17 and report["max_abs_diff"] < 1e-3


def test_predictions_are_redone_when_resume_changes_the_model(tmp_path, tiny_pipeline, color_data):
    p = tiny_pipeline(epochs=1, extra=f"predict: {{source: {color_data / 'val'}, batch_size: 4, streams: 2}}\n")
    always_better = ["--set", "train.monitor=epoch", "--set", "train.monitor_mode=max"]  # best.pt = last epoch
    run_cli("run", str(p), "--run-dir", "r", *always_better, cwd=tmp_path)
    preds = tmp_path / "r" / "predictions"
    model_sha = lambda: json.loads((preds / "fingerprint.json").read_text())["model_sha256"]  # noqa: E731
    first = model_sha()
    assert json.loads((preds / "summary.json").read_text())["engine"]["streams"] == 2  # the predict block's setting
    assert first == hashlib.sha256((tmp_path / "r" / "model.onnx").read_bytes()).hexdigest()
    run_cli("run", "--resume", "r", "--set", "train.epochs=2", *always_better, cwd=tmp_path)
    assert model_sha() == hashlib.sha256((tmp_path / "r" / "model.onnx").read_bytes()).hexdigest() != first
    records = [json.loads(x) for x in (preds / "predictions.jsonl").read_text().splitlines()]
    n_images = len(list((color_data / "val").rglob("*.png")))
    assert len(records) == n_images == len({r["path"] for r in records}), "every image once, from the new model"
    # the same model with other record options (was: silently resumed with the old top_k)
    run_cli("run", "--resume", "r", "--set", "train.epochs=2", "--set", "predict.top_k=1", *always_better, cwd=tmp_path)
    assert "holds predictions made with other settings (top_k 5 → 1); predicting again" in \
        (tmp_path / "r" / "run.log").read_text()
    records = [json.loads(x) for x in (preds / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == n_images == len({r["path"] for r in records})
    assert all(len(r["labels"]) == 1 for r in records), "every record with the new top_k"


def test_a_monitor_that_is_no_metric_is_a_clear_error(tmp_path, tiny_pipeline):
    proc = run_cli("run", str(tiny_pipeline(epochs=1)), "--set", "train.monitor=val/top_1", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "train.monitor: 'val/top_1' is not a metric of this task; did you mean 'val/top1'?" in proc.stderr
