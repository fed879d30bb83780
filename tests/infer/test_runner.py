"""The predict engine: bad files, deterministic order, resume after a kill, sharding and merge."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import run_cli
from tests.infer.conftest import write_bad_files, write_images
from visionpipe.errors import VisionpipeError
from visionpipe.infer.backends import open_backend
from visionpipe.infer.runner import merge_outputs, predict_images
from visionpipe.infer.sources import iter_sources
from visionpipe_plugins.classification.task import ClassificationPredictor, ClassificationTask


@pytest.fixture(scope="module")
def onnx_backend(tiny_model):
    return open_backend(str(tiny_model.onnx), "cpu")


def predict(onnx_backend, source: Path, out: Path, predictor: Any = None, **opts: Any) -> dict[str, Any]:
    backend, meta = onnx_backend
    predictor = predictor or ClassificationTask.predictor(meta, {"top_k": 2})
    return predict_images(backend, predictor, str(source), out, {"batch_size": 4, **opts})


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def test_bad_files_go_to_errors_and_the_rest_is_predicted(onnx_backend, tmp_path):
    good = write_images(tmp_path / "in", 7)
    bad = write_bad_files(tmp_path / "in" / "bad")
    summary = predict(onnx_backend, tmp_path / "in", tmp_path / "out")
    preds, errs = lines(tmp_path / "out" / "predictions.jsonl"), lines(tmp_path / "out" / "errors.jsonl")
    assert summary["images"] == 7 and summary["errors"] == len(bad) == 5
    assert [r["path"] for r in preds] == [str(p) for p in iter_sources(str(tmp_path / "in")) if p in good]
    assert {r["path"] for r in errs} == {str(p) for p in bad.values()}
    reasons = {Path(r["path"]).name: r["error"] for r in errs}
    assert "too small" in reasons["tiny.png"] and "not a recognised image" in reasons["notes.png"]
    assert all(r["error"] for r in errs)
    for r in preds:
        assert set(r["labels"]) == {"blue", "red"} and abs(sum(r["scores"]) - 1) < 1e-4
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["images"] == 7 and saved["errors"] == 5
    assert set(saved["time_percent"]) == {"model", "decode", "postprocess_and_write"}
    assert saved["engine"]["batch_size"] == 4 and saved["engine"]["spinning"] is False


def test_output_is_identical_for_any_decoder_count_and_pool(onnx_backend, tmp_path):
    write_images(tmp_path / "in", 11)
    write_bad_files(tmp_path / "in" / "bad")
    outs = {}
    for name, opts in {"main": {"workers": 0}, "threads3": {"workers": 3, "batch_size": 3},
                       "processes": {"workers": 2, "decode": "processes"}}.items():
        predict(onnx_backend, tmp_path / "in", tmp_path / name, **opts)
        outs[name] = ((tmp_path / name / "predictions.jsonl").read_text(), (tmp_path / name / "errors.jsonl").read_text())
    assert outs["main"] == outs["threads3"] == outs["processes"]
    assert len(outs["main"][0].splitlines()) == 11


def test_output_is_identical_for_any_number_of_model_streams(tiny_model, tmp_path):
    """Several batches in flight at once (one model run per core) change speed, not the files."""
    write_images(tmp_path / "in", 13)
    write_bad_files(tmp_path / "in" / "bad")
    outs = []
    for streams in (1, 3):
        backend = open_backend(str(tiny_model.onnx), "cpu", streams=streams)
        summary = predict(backend, tmp_path / "in", tmp_path / f"s{streams}", batch_size=2, workers=0)
        assert summary["engine"]["streams"] == streams
        outs.append(((tmp_path / f"s{streams}" / "predictions.jsonl").read_text(),
                     (tmp_path / f"s{streams}" / "errors.jsonl").read_text()))
    assert outs[0] == outs[1] and len(outs[0][0].splitlines()) == 13


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="thread affinity is Linux-only")
def test_pinned_model_runners_each_keep_one_core_and_change_nothing(tiny_model, tmp_path):
    from visionpipe.infer.runner import runner_cores

    write_images(tmp_path / "in", 13)
    cores = sorted(os.sched_getaffinity(0))
    backend, meta = open_backend(str(tiny_model.onnx), "cpu", streams=len(cores), threads=1)
    assert runner_cores(backend, len(cores), None) == (cores if len(cores) > 1 else [])  # auto: one runner per core
    assert runner_cores(backend, len(cores), False) == []
    assert runner_cores(open_backend(str(tiny_model.onnx), "cpu", streams=1)[0], 1, None) == []  # threads share
    seen: list[set[int]] = []
    real_run = backend.run

    def run(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        seen.append(os.sched_getaffinity(0))  # the calling runner thread's cores
        return real_run(feed)

    backend.run = run
    pinned = predict((backend, meta), tmp_path / "in", tmp_path / "pinned", batch_size=2, workers=0, pin=True)
    assert pinned["engine"]["runners_pinned"] is True
    assert seen and all(len(c) == 1 and c <= set(cores) for c in seen)
    assert os.sched_getaffinity(0) == set(cores)  # only the runner threads were pinned
    seen.clear()
    free = predict((backend, meta), tmp_path / "in", tmp_path / "free", batch_size=2, workers=0, pin=False)
    assert free["engine"]["runners_pinned"] is False and all(c == set(cores) for c in seen)
    assert (tmp_path / "pinned" / "predictions.jsonl").read_text() == (tmp_path / "free" / "predictions.jsonl").read_text()


def test_resume_skips_done_inputs_and_cuts_a_torn_line(onnx_backend, tmp_path):
    write_images(tmp_path / "in", 10)
    write_bad_files(tmp_path / "in" / "bad")
    out = tmp_path / "out"
    predict(onnx_backend, tmp_path / "in", tmp_path / "ref")
    reference = (tmp_path / "ref" / "predictions.jsonl").read_text().splitlines()
    # a run killed mid-write: 4 complete lines and half of the 5th
    out.mkdir()
    (out / "predictions.jsonl").write_text("\n".join(reference[:4]) + "\n" + reference[4][: len(reference[4]) // 2])
    summary = predict(onnx_backend, tmp_path / "in", out)
    assert summary["skipped_already_done"] == 4 and summary["images"] == 6 and summary["errors"] == 5
    got = (out / "predictions.jsonl").read_text().splitlines()
    assert got == reference, "same records, same order, no duplicates, no torn line"
    again = predict(onnx_backend, tmp_path / "in", out)
    assert again["images"] == 0 and again["errors"] == 0 and again["skipped_already_done"] == 15
    assert (out / "predictions.jsonl").read_text().splitlines() == reference
    assert len(lines(out / "errors.jsonl")) == 5


def test_shards_then_merge_equal_one_unsharded_run(onnx_backend, tmp_path):
    write_images(tmp_path / "in", 13)
    write_bad_files(tmp_path / "in" / "bad")
    predict(onnx_backend, tmp_path / "in", tmp_path / "whole")
    shards = tmp_path / "shards"
    with pytest.raises(VisionpipeError, match="no predictions.shard"):
        merge_outputs(shards)
    for i in (0, 2):
        predict(onnx_backend, tmp_path / "in", shards, shard=f"{i}/3")
    with pytest.raises(VisionpipeError, match="1/3"):
        merge_outputs(shards)
    partial = merge_outputs(shards, tmp_path / "partial", partial=True)
    assert partial["missing_shards"] == [1]
    predict(onnx_backend, tmp_path / "in", shards, shard="1/3")
    sharded = [lines(shards / f"predictions.shard{i}of3.jsonl") for i in range(3)]
    paths = [r["path"] for s in sharded for r in s]
    assert len(paths) == len(set(paths)) == 13, "shards are disjoint and complete"
    result = merge_outputs(shards)
    assert result["predictions"]["records"] == 13 and result["errors"]["records"] == 5
    for kind in ("predictions", "errors"):
        assert (shards / f"{kind}.jsonl").read_text() == (tmp_path / "whole" / f"{kind}.jsonl").read_text(), kind
    merged_summary = json.loads((shards / "summary.json").read_text())
    assert merged_summary["images"] == 13 and merged_summary["errors"] == 5 and merged_summary["shards"] == 3


def test_merged_summary_counts_the_records_of_a_resumed_shard(onnx_backend, tmp_path):
    write_images(tmp_path / "in", 8)
    shards = tmp_path / "shards"
    predict(onnx_backend, tmp_path / "in", shards, shard="0/2")
    part = shards / "predictions.shard0of2.jsonl"
    part.write_text("".join(part.read_text().splitlines(keepends=True)[:1]))  # killed after its first record
    resumed = predict(onnx_backend, tmp_path / "in", shards, shard="0/2")
    assert resumed["images"] == 3 and resumed["skipped_already_done"] == 1
    predict(onnx_backend, tmp_path / "in", shards, shard="1/2")
    result = merge_outputs(shards)
    merged = json.loads((shards / "summary.json").read_text())
    assert result["predictions"]["records"] == len(lines(shards / "predictions.jsonl")) == 8
    assert merged["images"] == 8 and merged["errors"] == 0


def test_an_out_folder_inside_the_source_is_not_read_back_as_input(onnx_backend, tmp_path, monkeypatch):
    """`predict model.onnx .` from the images' folder: the default --out (predictions/) is inside the source."""
    write_images(tmp_path / "in", 6)
    monkeypatch.chdir(tmp_path / "in")
    first = predict(onnx_backend, Path("."), Path("predictions"), save_images=True)
    assert first["images"] == 6, "its own drawings are no inputs"
    again = predict(onnx_backend, Path("."), Path("predictions"), save_images=True)
    assert again["images"] == 0 and again["skipped_already_done"] == 6
    assert len(list(Path("predictions/images").rglob("*.png"))) == 6
    for i in (0, 1):  # shards drawing into the folder meanwhile still split the same inputs
        predict(onnx_backend, Path("."), Path("predictions"), shard=f"{i}/2", save_images=True)
    paths = [r["path"] for i in (0, 1) for r in lines(Path(f"predictions/predictions.shard{i}of2.jsonl"))]
    assert sorted(paths) == sorted(r["path"] for r in lines(Path("predictions/predictions.jsonl")))


@pytest.mark.parametrize("out", [".", "..", "../in"])
def test_an_out_folder_that_is_the_source_or_above_it_excludes_nothing(onnx_backend, tmp_path, monkeypatch, out):
    """--out is the source folder (spelt '.' or by its path) or above it: every input is under it, none is an output."""
    write_images(tmp_path / "in", 4)
    monkeypatch.chdir(tmp_path / "in")
    assert predict(onnx_backend, Path("."), Path(out))["images"] == 4  # was 0: all inputs excluded
    assert predict(onnx_backend, Path("**/*.png"), Path(out) / "g")["images"] == 4  # a glob of the folder too


def test_resume_with_the_source_spelled_another_way_adds_no_duplicates(onnx_backend, tmp_path, monkeypatch):
    write_images(tmp_path / "in", 5)
    monkeypatch.chdir(tmp_path)
    predict(onnx_backend, Path("in"), tmp_path / "out")
    again = predict(onnx_backend, tmp_path / "in", tmp_path / "out")  # absolute this time
    assert again["images"] == 0 and again["skipped_already_done"] == 5
    assert len(lines(tmp_path / "out" / "predictions.jsonl")) == 5


def test_torchrun_environment_shards_automatically(onnx_backend, tmp_path, monkeypatch):
    write_images(tmp_path / "in", 6)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    summary = predict(onnx_backend, tmp_path / "in", tmp_path / "out")
    assert summary["shard"] == "1/2" and summary["images"] == 3
    assert (tmp_path / "out" / "predictions.shard1of2.jsonl").is_file()
    assert all(r["index"] % 2 == 1 for r in lines(tmp_path / "out" / "predictions.shard1of2.jsonl"))


class _WrongSizeFor(ClassificationPredictor):
    """A predictor whose preprocessing yields an input the model cannot take for some files."""

    def __init__(self, metadata: dict[str, Any], options: dict[str, Any], bad: set[str]) -> None:
        super().__init__(metadata, options)
        self.bad = bad
        self.batchable = True

    def preprocess(self, image: np.ndarray) -> tuple[dict[str, np.ndarray], Any]:
        feed, state = super().preprocess(image)
        if int(image[0, 0, 0]) in self.bad:  # marked by its first pixel
            return {"images": np.zeros((2, 32, 32), np.float32)}, state  # 2 channels: the model needs 3
        return feed, state


def test_merge_refuses_a_shard_that_did_not_finish(onnx_backend, tmp_path):
    write_images(tmp_path / "in", 6)
    shards = tmp_path / "shards"
    for i in (0, 1):
        predict(onnx_backend, tmp_path / "in", shards, shard=f"{i}/2")
    write_images(tmp_path / "in" / "more", 40, seed=1)  # new inputs, on which the model fails: the run stops
    with pytest.raises(VisionpipeError, match="model failed on the first 16 inputs"):
        predict(onnx_backend, tmp_path / "in", shards, shard="1/2",
                predictor=_WrongSizeFor(onnx_backend[1], {}, set(range(256))))
    assert not (shards / "summary.shard1of2.json").exists(), "the finished run's summary is gone"
    with pytest.raises(VisionpipeError, match=r"shard\(s\) 1/2 have not finished"):
        merge_outputs(shards)
    assert merge_outputs(shards, tmp_path / "partial", partial=True)["unfinished_shards"] == [1]
    predict(onnx_backend, tmp_path / "in", shards, shard="1/2", workers=0)
    predict(onnx_backend, tmp_path / "in", shards, shard="0/2")
    assert merge_outputs(shards)["unfinished_shards"] == []


def test_an_input_the_model_fails_on_is_isolated(onnx_backend, tmp_path):
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(6):
        img = np.full((32, 32, 3), 100, np.uint8)
        img[0, 0, 0] = 7 if i == 3 else 0
        Image.fromarray(img).save(folder / f"{i}.png")
    meta = onnx_backend[1]
    summary = predict(onnx_backend, folder, tmp_path / "out", predictor=_WrongSizeFor(meta, {}, {7}),
                      batch_size=6)
    assert summary["images"] == 5 and summary["errors"] == 1
    (err,) = lines(tmp_path / "out" / "errors.jsonl")
    assert err["path"].endswith("3.png") and err["error"].startswith("model failed")
    # a model that fails on everything stops the run early with one clear error
    write_images(tmp_path / "many", 20)
    with pytest.raises(VisionpipeError, match="model failed on the first 16 inputs"):
        predict(onnx_backend, tmp_path / "many", tmp_path / "all-bad", predictor=_WrongSizeFor(meta, {}, set(range(256))))


def test_save_images_draws_each_prediction(onnx_backend, tmp_path):
    write_images(tmp_path / "in", 3)
    predict(onnx_backend, tmp_path / "in", tmp_path / "out", save_images=True)
    drawn = sorted(p.relative_to(tmp_path / "out" / "images") for p in (tmp_path / "out" / "images").rglob("*.png"))
    assert [str(p) for p in drawn] == ["a/img0000.png", "a/img0002.png", "b/img0001.png"]


def test_resume_refuses_a_broken_line_in_the_middle_instead_of_cutting_the_records_after_it(onnx_backend, tmp_path):
    write_images(tmp_path / "in", 6)
    out = tmp_path / "out"
    predict(onnx_backend, tmp_path / "in", out)
    pred_file = out / "predictions.jsonl"
    reference = pred_file.read_text().splitlines()
    damaged = "\n".join([*reference[:2], "{not json", *reference[2:]]) + "\n"
    pred_file.write_text(damaged)
    with pytest.raises(VisionpipeError, match=r"predictions.jsonl:3: not a predict record .* more records follow"):
        predict(onnx_backend, tmp_path / "in", out)
    assert pred_file.read_text() == damaged, "no record after the broken line was cut off"
    pred_file.write_text("\n".join([*reference[:2], "", *reference[2:4]]) + "\n")  # a blank line is no record
    again = predict(onnx_backend, tmp_path / "in", out)
    assert again["skipped_already_done"] == 4 and again["images"] == 2
    got = [json.loads(x)["path"] for x in pred_file.read_text().splitlines() if x]
    assert got == [json.loads(x)["path"] for x in reference]
    pred_file.write_text("\n".join([*reference[:3], "{torn", "", ""]) + "\n")  # only blank lines after it
    again = predict(onnx_backend, tmp_path / "in", out)  # was: refused as "more records follow"
    assert again["skipped_already_done"] == 3 and again["images"] == 3


@pytest.mark.slow
def test_cli_killed_mid_run_resumes_without_duplicates(tiny_model, tmp_path):
    """SIGKILL while predicting; the re-run completes the output with each input exactly once."""
    src = write_images(tmp_path / "seed", 4)
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(600):  # hard links: many inputs, little disk
        os.link(src[i % 4], folder / f"{i:04d}.png")
    out = tmp_path / "out"
    env = {**os.environ, "VISIONPIPE_PROGRESS": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "visionpipe", "predict", str(tiny_model.onnx), str(folder),
                             "--out", str(out), "-b", "2", "--workers", "1"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pred_file = out / "predictions.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if pred_file.is_file() and pred_file.stat().st_size > 2000:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "killed mid-run"
    before = len(pred_file.read_text().splitlines())
    assert 0 < before < 600
    done = run_cli("predict", str(tiny_model.onnx), str(folder), "--out", str(out), "-b", "16", cwd=tmp_path)
    summary = json.loads(done.stdout)
    assert summary["skipped_already_done"] >= before - 1 and summary["images"] + summary["skipped_already_done"] == 600
    paths = [r["path"] for r in lines(pred_file)]
    assert len(paths) == len(set(paths)) == 600
    assert paths == sorted(paths), "input order kept across the kill"


def _descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            continue
        for k in kids:
            found += [k, *_descendants(k)]
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_decoder_processes_exit_when_predict_is_killed(tiny_model, tmp_path):
    """SIGKILL leaves no decoder process behind (each held ~750 MB and waited forever)."""
    src = write_images(tmp_path / "seed", 4)
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(2000):
        os.link(src[i % 4], folder / f"{i:04d}.png")
    out = tmp_path / "out"
    env = {**os.environ, "VISIONPIPE_PROGRESS": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "visionpipe", "predict", str(tiny_model.onnx), str(folder),
                             "--out", str(out), "-b", "2", "--workers", "2", "--decode", "processes"], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pred_file = out / "predictions.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (pred_file.is_file() and pred_file.stat().st_size > 2000):
        time.sleep(0.01)
    family = _descendants(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and len(family) >= 2, "killed mid-run, with decoder processes"
    deadline = time.time() + 60
    while time.time() < deadline and any(_alive(p) for p in family):
        time.sleep(0.2)
    left = [p for p in family if _alive(p)]
    for p in left:  # do not leak them into the rest of the test session
        os.kill(p, signal.SIGKILL)
    assert not left, "decoder processes outlived the killed predict"


def test_merge_skips_a_torn_last_line_and_names_a_broken_one(onnx_backend, tmp_path):
    write_images(tmp_path / "in", 6)
    shards = tmp_path / "shards"
    for i in (0, 1):
        predict(onnx_backend, tmp_path / "in", shards, shard=f"{i}/2")
    part = shards / "predictions.shard1of2.jsonl"
    whole = part.read_bytes()
    part.write_bytes(whole[:-40])  # a killed shard: its last record is cut mid-line
    result = merge_outputs(shards, tmp_path / "merged", partial=True)
    assert result["predictions"]["records"] == 5
    assert len(lines(tmp_path / "merged" / "predictions.jsonl")) == 5
    part.write_bytes(b"{not json}\n" + whole)
    with pytest.raises(VisionpipeError, match=r"predictions.shard1of2.jsonl:1: not a JSON record"):
        merge_outputs(shards, tmp_path / "merged2", partial=True)


def test_a_missing_source_leaves_no_output_folder_and_an_empty_glob_is_warned(onnx_backend, tmp_path, caplog):
    from visionpipe.infer.runner import run_predict

    backend, meta = onnx_backend
    with pytest.raises(VisionpipeError, match="nothere: no such file, folder or glob"):
        run_predict(ClassificationTask, backend, meta, str(tmp_path / "nothere"), tmp_path / "out", {})
    assert not (tmp_path / "out").exists()  # was: made, with fingerprint.json, before the error
    with caplog.at_level("WARNING"):
        summary = run_predict(ClassificationTask, backend, meta, str(tmp_path / "*.jpg"), tmp_path / "out", {})
    assert summary["images"] == 0 and "*.jpg: no image files; nothing was predicted" in caplog.text
