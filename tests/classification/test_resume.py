"""Resume on tiny data: exact with EMA, a new epoch count, the run's own folder and pipeline, refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_CLASSIFY, make_color_folder, run_cli
from visionpipe.engine.checkpoint import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.slow

TRAIN_ONLY = "stages: [load, augment, model, train]\n"


def _squash(text: str) -> str:
    """Text without whitespace: log lines wrap anywhere, even inside a path."""
    return "".join(text.split())


def _history(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_state(a: Path, b: Path, *, count: bool = True) -> None:
    sa, sb = load_checkpoint(a / "checkpoints" / "last.pt"), load_checkpoint(b / "checkpoints" / "last.pt")
    for key in ("model", "ema"):
        assert sa[key].keys() == sb[key].keys()
        for k in sa[key]:
            assert torch.equal(sa[key][k], sb[key][k]), f"{key}.{k}"
    if count:  # EMA ignores the count once it is above 0: a checkpoint without it restarts it at 1
        assert sa["ema_n_averaged"] == sb["ema_n_averaged"] > 0


def test_resume_with_ema_is_exact(tmp_path, tiny_pipeline):
    """3 epochs straight == 1 epoch + resume to 3 with train.ema: the EMA's update count is restored too."""
    p = tiny_pipeline(epochs=3, extra=TRAIN_ONLY)
    ema = ["--set", "train.ema=0.9"]
    run_cli("run", str(p), "--run-dir", "straight", *ema, cwd=tmp_path)
    run_cli("run", str(p), "--run-dir", "split", *ema, "--set", "train.epochs=1", cwd=tmp_path)
    # a checkpoint written before the update count was saved still resumes exactly
    (tmp_path / "old").mkdir()
    state = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    state.pop("ema_n_averaged")
    save_checkpoint(state, tmp_path / "old" / "checkpoints" / "last.pt")
    for name in ("config.yaml", "manifest.json"):
        (tmp_path / "old" / name).write_bytes((tmp_path / "split" / name).read_bytes())
    for run in ("split", "old"):
        run_cli("run", "--resume", run, "--set", "train.epochs=3", cwd=tmp_path)
        _assert_same_state(tmp_path / "straight", tmp_path / run, count=run == "split")
        assert _history(tmp_path / run) == [
            {**h, "train/seconds": g["train/seconds"]}
            for h, g in zip(_history(tmp_path / "straight"), _history(tmp_path / run), strict=True)]


def test_extending_a_run_follows_the_schedule_of_the_new_total(tmp_path, tiny_pipeline):
    """2 epochs of cosine, then --set train.epochs=4: epochs 3 and 4 train at the 4-epoch schedule's LR."""
    p = tiny_pipeline(epochs=2, extra=TRAIN_ONLY)
    cosine = ["--set", "train.scheduler.name=cosine"]
    run_cli("run", str(p), "--run-dir", "r", *cosine, cwd=tmp_path)
    proc = run_cli("run", "--resume", "r", "--set", "train.epochs=4", cwd=tmp_path)
    assert _squash("schedule is recomputed for 4 epochs") in _squash(proc.stderr)
    lrs = [h["lr"] for h in _history(tmp_path / "r")]
    base = 0.001
    assert lrs[:2] == pytest.approx([base, base * (1 + math.cos(math.pi / 2)) / 2])  # the 2-epoch schedule
    assert lrs[2:] == pytest.approx([base * (1 + math.cos(math.pi * e / 4)) / 2 for e in (2, 3)], rel=1e-9)


def test_resume_runs_in_the_folder_the_run_started_in(tmp_path):
    """Relative paths (load.root: data) mean the run's data from anywhere; the manifest keeps the origin."""
    work, other = tmp_path / "work", tmp_path / "other"
    make_color_folder(work / "data")
    other.mkdir()
    (work / "tiny.yaml").write_text(TINY_CLASSIFY.format(root="data", epochs=1) + TRAIN_ONLY)
    run_cli("run", "tiny.yaml", "--run-dir", "r", cwd=work)
    first = json.loads((work / "r" / "manifest.json").read_text())
    proc = run_cli("run", "--resume", str(work / "r"), "--set", "train.epochs=2", cwd=other)
    assert _squash(f"resuming in {work}") in _squash(proc.stderr)
    assert load_checkpoint(work / "r" / "checkpoints" / "last.pt")["epoch"] == 2
    assert not (other / "data").exists()
    m = json.loads((work / "r" / "manifest.json").read_text())
    assert m["status"] == "finished" and m["resumed_from_epoch"] == 1
    for key in ("command", "cwd", "started", "inputs"):
        assert m[key] == first[key], key
    assert "tiny.yaml" in m["inputs"]
    [resume] = m["resumes"]
    assert resume["cwd"] == str(other) and resume["from_epoch"] == 1 and resume["overrides"] == ["train.epochs=2"]
    assert resume["command"][-4:] == ["--resume", str(work / "r"), "--set", "train.epochs=2"]
    # the folder is gone: say so instead of reading other data
    work.rename(tmp_path / "moved")
    proc = run_cli("run", "--resume", str(tmp_path / "moved" / "r"), "--set", "train.epochs=3", cwd=other, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"the run was started in {work}, which no longer exists" in " ".join(proc.stderr.split())


def test_a_set_that_changes_the_model_is_refused_and_leaves_the_run_resumable(tmp_path, tiny_pipeline):
    p = tiny_pipeline(epochs=1, extra=TRAIN_ONLY)
    run_cli("run", str(p), "--run-dir", "r", cwd=tmp_path)
    run = tmp_path / "r"
    before = {n: (run / n).read_bytes() for n in ("config.yaml", "manifest.json", "metrics.jsonl")}
    proc = run_cli("run", "--resume", "r", "--set", "train.epochs=2", "--set", "model.dropout=0.2", cwd=tmp_path,
                   check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {run / 'checkpoints' / 'last.pt'}: does not match the model in the config "
                      "(model.dropout: None -> 0.2): --set on resume cannot change the model"]
    assert "size mismatch" not in proc.stderr and "Missing key" not in proc.stderr
    assert {n: (run / n).read_bytes() for n in before} == before, "a refused resume rewrites nothing"
    run_cli("run", "--resume", "r", "--set", "train.epochs=2", cwd=tmp_path)
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 2
    assert "dropout: null" in (run / "config.yaml").read_text()


def test_run_dir_that_holds_a_run_is_refused(tmp_path, tiny_pipeline):
    p = tiny_pipeline(epochs=1, extra=TRAIN_ONLY)
    run_cli("run", str(p), "--run-dir", "r", cwd=tmp_path)
    files = {q: q.read_bytes() for q in (tmp_path / "r").rglob("*") if q.is_file() and "tb" not in q.parts}
    proc = run_cli("run", str(p), "--run-dir", "r", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert ("--run-dir r: already holds a run (manifest.json); continue it with `visionpipe run --resume r`, "
            "or choose another --run-dir") in " ".join(proc.stderr.split())
    assert {q: q.read_bytes() for q in files} == files and \
        {q for q in (tmp_path / "r").rglob("*") if q.is_file() and "tb" not in q.parts} == set(files)
    proc = run_cli("run", "--resume", "r", "--run-dir", "elsewhere", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "a resumed run stays in its own folder" in proc.stderr
    assert not (tmp_path / "elsewhere").exists()


def test_pipeline_given_with_resume_must_be_the_runs_own(tmp_path, tiny_pipeline):
    p = tiny_pipeline(epochs=1, extra=TRAIN_ONLY)
    run_cli("run", str(p), "--run-dir", "r", cwd=tmp_path)
    other = tmp_path / "other.yaml"
    other.write_text(p.read_text().replace("lr: 0.001", "lr: 0.01"))
    manifest = (tmp_path / "r" / "manifest.json").read_bytes()
    proc = run_cli("run", str(other), "--resume", "r", "--set", "train.epochs=2", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{other}: is not the pipeline the run {tmp_path / 'r'} was started from" in " ".join(proc.stderr.split())
    assert (tmp_path / "r" / "manifest.json").read_bytes() == manifest
    assert load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")["epoch"] == 1
    run_cli("run", str(p), "--resume", "r", "--set", "train.epochs=2", cwd=tmp_path)  # its own pipeline: fine
    assert load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")["epoch"] == 2
