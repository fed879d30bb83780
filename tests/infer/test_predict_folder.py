"""One predictions folder, one model and one set of options: resume, refuse or start over; stale temp files; options."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.conftest import run_cli
from tests.infer.conftest import write_images
from visionpipe.config import load_config
from visionpipe.errors import ConfigError, VisionpipeError
from visionpipe.infer.backends import open_backend
from visionpipe.infer.outputs import STALE_TMP_SECONDS, clean_stale_temp, merge_outputs
from visionpipe.infer.runner import run_predict
from visionpipe.io import TMP_PREFIX
from visionpipe.manager import get_manager
from visionpipe.pipeline import run_pipeline
from visionpipe_plugins.classification.task import ClassificationTask


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def cli(tiny_model, tmp_path, monkeypatch):
    """``visionpipe predict ARGS`` in-process, in ``tmp_path`` with 5 images in ``in/``; returns the result."""
    from visionpipe.cli import app

    monkeypatch.chdir(tmp_path)
    write_images(tmp_path / "in", 5)
    runner = CliRunner()

    def invoke(*args: str) -> Any:
        return runner.invoke(app, ["predict", *args, "--workers", "0"])

    return invoke


def test_cli_refuses_another_model_in_the_same_out_and_overwrite_replaces(cli, tiny_model, tmp_path):
    a = cli(str(tiny_model.onnx), "in", "--out", "pm", "--top-k", "2")
    assert a.exit_code == 0, a.output
    before = (tmp_path / "pm" / "predictions.jsonl").read_text()
    fp = json.loads((tmp_path / "pm" / "fingerprint.json").read_text())
    assert fp["model_sha256"] == sha(tiny_model.onnx) and fp["options"] == {"top_k": 2}

    b = cli(str(tiny_model.checkpoint), "in", "--out", "pm", "--top-k", "2")  # another model file
    assert b.exit_code != 0 and isinstance(b.exception, VisionpipeError)
    msg = str(b.exception)
    assert msg.startswith("pm: holds predictions made with other settings (model sha256 ")
    assert f"{sha(tiny_model.onnx)[:12]} → {sha(tiny_model.checkpoint)[:12]}" in msg
    assert "use another --out, or add --overwrite" in msg
    assert (tmp_path / "pm" / "predictions.jsonl").read_text() == before, "model A's predictions untouched"

    c = cli(str(tiny_model.checkpoint), "in", "--out", "pm", "--top-k", "2", "--overwrite")
    assert c.exit_code == 0, c.output
    summary = json.loads(c.stdout)
    assert summary["backend"] == "torch" and summary["images"] == 5 and summary["skipped_already_done"] == 0
    assert json.loads((tmp_path / "pm" / "fingerprint.json").read_text())["model_sha256"] == sha(tiny_model.checkpoint)
    assert len(lines(tmp_path / "pm" / "predictions.jsonl")) == 5, "each input once, from model B"


def test_cli_refuses_other_record_options_but_resumes_across_speed_settings(cli, tiny_model, tmp_path):
    assert cli(str(tiny_model.onnx), "in", "--out", "pm", "--top-k", "2").exit_code == 0
    other = cli(str(tiny_model.onnx), "in", "--out", "pm", "--top-k", "1")
    assert isinstance(other.exception, VisionpipeError)
    assert "(top_k 2 → 1)" in str(other.exception) and "model sha256" not in str(other.exception)
    same = cli(str(tiny_model.onnx), "in", "--out", "pm", "--top-k", "2", "-b", "3", "--streams", "1",
               "-o", "prefetch=7", "--no-pin")
    assert same.exit_code == 0, same.output
    assert json.loads(same.stdout)["skipped_already_done"] == 5


def test_cli_refuses_predictions_of_unknown_origin(cli, tiny_model, tmp_path):
    (tmp_path / "pm").mkdir()
    (tmp_path / "pm" / "predictions.jsonl").write_text(json.dumps({"path": "x.png", "labels": []}) + "\n")
    r = cli(str(tiny_model.onnx), "in", "--out", "pm")
    assert isinstance(r.exception, VisionpipeError)
    assert "pm: holds predictions of an unknown model and options (no fingerprint.json)" in str(r.exception)
    # a folder without predictions (an earlier fingerprint only, or other files) is simply used
    shutil.rmtree(tmp_path / "pm")
    (tmp_path / "pm").mkdir()
    (tmp_path / "pm" / "notes.txt").write_text("mine\n")
    assert cli(str(tiny_model.onnx), "in", "--out", "pm").exit_code == 0
    assert (tmp_path / "pm" / "notes.txt").is_file()


def test_cli_unknown_or_mistyped_option_is_an_error_before_any_work(cli, tiny_model, tmp_path):
    r = cli(str(tiny_model.onnx), "in", "--out", "pm", "-o", "top_kk=2")
    assert isinstance(r.exception, ConfigError)
    assert str(r.exception) == ("--option: top_kk: unknown predict option 'top_kk' for task classification; "
                                "did you mean 'top_k'? (valid: count_total, pin, prefetch, top_k)")
    r = cli(str(tiny_model.onnx), "in", "--out", "pm", "-o", "bogus=1")
    assert "unknown predict option 'bogus'" in str(r.exception) and "(valid: count_total, pin, prefetch, top_k)" in str(r.exception)
    r = cli(str(tiny_model.onnx), "in", "--out", "pm", "-o", "top_k=many")
    assert str(r.exception) == "--option: top_k: must be an integer (got 'many')"
    assert not (tmp_path / "pm").exists(), "nothing written"
    ok = cli(str(tiny_model.onnx), "in", "--out", "pm", "-o", "top_k=1")
    assert ok.exit_code == 0, ok.output
    assert all(len(r["labels"]) == 1 for r in lines(tmp_path / "pm" / "predictions.jsonl"))


@pytest.mark.slow
def test_cli_option_error_is_one_line_with_exit_code_2(tiny_model, tmp_path):
    write_images(tmp_path / "in", 2)
    proc = run_cli("predict", str(tiny_model.onnx), "in", "-o", "score_treshold=0.3", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "unknown predict option 'score_treshold' for task classification" in proc.stderr


@pytest.mark.parametrize("task", ["classification", "detection", "segmentation", "dcgan", "charrnn_classify",
                                  "charrnn_generate"])
def test_every_builtin_task_declares_its_predict_options(task):
    cls = get_manager().task(task)
    accepted = cls.accepted_predict_options()
    for name, opt in accepted.items():
        assert opt.help, f"{task}.{name} has no help"
        assert opt.coerce(opt.default) == opt.default, f"{task}.{name}: default of the wrong type"
    assert ("prefetch" in accepted) == cls.image_predict, "engine options only where the engine streams images"
    assert cls.predict_resumes == cls.image_predict
    with pytest.raises(ConfigError, match=f"unknown predict option 'nonsense' for task {task} .*valid: "):
        cls.check_predict_options({"nonsense": 1})


def test_the_options_each_plugin_reads_are_declared():
    """Every ``options.get("x")`` / ``options["x"]`` in a built-in plugin is declared, or set by the core."""
    import re

    import visionpipe_plugins

    from_core = {"batch_size", "top_k", "save_images", "shard", "workers", "decode", "num", "seed", "prompt", "pin",
                 "out_dir", "source_root"}  # the predict command / stage, and segmentation's own predict
    tasks = get_manager().tasks
    for pkg in ("classification", "detection", "segmentation", "dcgan", "charrnn"):
        declared = {n for t in tasks.values() if t.__module__.startswith(f"visionpipe_plugins.{pkg}.")
                    for n in t.predict_options}
        read = set()
        for f in (Path(visionpipe_plugins.__file__).parent / pkg).glob("*.py"):
            read |= set(re.findall(r"options(?:\.get\(|\[)\"(\w+)\"", f.read_text()))
        assert read - from_core <= declared, f"{pkg} reads undeclared options {sorted(read - from_core - declared)}"


def test_declared_options_are_typed():
    from visionpipe_plugins.charrnn.generate import CharRnnGenerateTask
    from visionpipe_plugins.dcgan.task import DcganTask
    from visionpipe_plugins.detection.task import DetectionTask

    assert DetectionTask.check_predict_options({"score_threshold": 1, "gt": "a.json"}) == \
        {"score_threshold": 1.0, "gt": "a.json"}
    with pytest.raises(ConfigError, match="did you mean 'score_threshold'"):
        DetectionTask.check_predict_options({"score_treshold": 0.3})
    with pytest.raises(ConfigError, match=r"must be a number \(got 'high'\)"):
        DetectionTask.check_predict_options({"score_threshold": "high"})
    with pytest.raises(ConfigError, match="did you mean 'num'"):
        DcganTask.check_predict_options({"nmu": 3})
    with pytest.raises(ConfigError, match="unknown predict option 'prefetch'"):  # no image engine there
        CharRnnGenerateTask.check_predict_options({"prefetch": 3})
    assert DetectionTask.record_options({"score_threshold": 0.3, "draw_threshold": 0.9, "gt": "x"}) == \
        {"score_threshold": 0.3}, "drawing and COCO ids change no record"
    assert ClassificationTask.record_options({}) == {"top_k": 5}


# -- the pipeline's predict stage ---------------------------------------------------------------


@pytest.fixture()
def run_copy(tiny_model, tmp_path) -> Path:
    """A run folder with the tiny model's config and best.pt (hard-linked), to resume with only a predict stage."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(tiny_model.run / "config.yaml", run / "config.yaml")
    os.link(tiny_model.checkpoint, run / "checkpoints" / "best.pt")
    write_images(tmp_path / "in", 4)
    return run


def predict_stage(run: Path, *overrides: str) -> Path:
    run_pipeline(None, ["stages=[predict]", f"predict.source={run.parent / 'in'}", "predict.workers=0",
                        *overrides], resume=str(run))
    return run / "predictions"


def test_stage_starts_over_when_record_options_change(run_copy, caplog):
    preds = predict_stage(run_copy)
    assert json.loads((preds / "fingerprint.json").read_text())["options"] == {"top_k": 5}
    assert not (preds / "model.sha256").exists()
    (preds / "images").mkdir()
    (preds / "images" / "old.png").write_bytes(b"from the earlier predictions")
    with caplog.at_level(logging.INFO, logger="visionpipe.infer.runner"):
        predict_stage(run_copy, "predict.top_k=1")
    assert "holds predictions made with other settings (top_k 5 → 1); predicting again" in caplog.text
    records = lines(preds / "predictions.jsonl")
    assert len(records) == 4 == len({r["path"] for r in records}) and all(len(r["labels"]) == 1 for r in records)
    assert not (preds / "images").exists(), "the stage's folder was started over"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="visionpipe.infer.runner"):
        predict_stage(run_copy, "predict.top_k=1", "predict.batch_size=3")  # speed settings: resume
    assert "predicting again" not in caplog.text and len(lines(preds / "predictions.jsonl")) == 4


def test_stage_refuses_an_unknown_option_before_predicting(run_copy):
    with pytest.raises(ConfigError) as e:
        predict_stage(run_copy, "predict.options={top_kk: 1}")
    assert str(e.value) == ("--set: predict.options.top_kk: unknown predict option 'top_kk' for task classification; "
                            "did you mean 'top_k'? (valid: count_total, pin, prefetch, top_k)")
    assert not (run_copy / "predictions").exists()


def test_stage_refuses_the_run_folder_itself_as_out(run_copy):
    with pytest.raises(ConfigError, match=r"predict.out: .\.. must be a folder of its own inside the run folder"):
        predict_stage(run_copy, "predict.out=.")
    assert (run_copy / "checkpoints" / "best.pt").is_file()


def test_validate_refuses_block_keys_inside_options(tiny_model):
    with pytest.raises(ConfigError, match=r"predict: options.top_k: top_k is a key of the predict block itself; "
                                          r"set predict.top_k instead of predict.options.top_k"):
        load_config(str(tiny_model.pipeline), ["predict.options={top_k: 3}"])


# -- stale temporary files ----------------------------------------------------------------------


def test_stale_temp_files_are_removed_on_start(cli, tiny_model, tmp_path):
    out = tmp_path / "pm"
    (out / "images" / "a").mkdir(parents=True)
    left = [out / f"{TMP_PREFIX}summary.json.x1", out / "images" / "a" / f"{TMP_PREFIX}img0000.png.x2.png"]
    for p in left:
        p.write_bytes(b"half a file")
    r = cli(str(tiny_model.onnx), "in", "--out", "pm", "--save-images")
    assert r.exit_code == 0, r.output
    assert not list(out.rglob(TMP_PREFIX + "*"))
    assert len(list((out / "images").rglob("*.png"))) == 5


def test_a_shard_removes_only_its_own_or_old_temp_files(tmp_path):
    out = tmp_path / "pm"
    (out / "images").mkdir(parents=True)
    own = out / f"{TMP_PREFIX}summary.shard1of2.json.a"
    other_fresh = out / "images" / f"{TMP_PREFIX}x.png.b.png"  # shard 0 may be writing it now
    other_old = out / f"{TMP_PREFIX}summary.shard0of2.json.c"
    for p in (own, other_fresh, other_old):
        p.write_bytes(b"x")
    t = time.time() - STALE_TMP_SECONDS - 60
    os.utime(other_old, (t, t))
    assert sorted(clean_stale_temp(out, (1, 2))) == sorted([own, other_old])
    assert other_fresh.is_file()
    assert clean_stale_temp(out, (0, 1)) == [other_fresh]  # unsharded: every one


# -- shards ---------------------------------------------------------------------------------------


def test_merge_refuses_shards_of_different_options_and_keeps_the_fingerprint(tiny_model, tmp_path):
    write_images(tmp_path / "in", 6)
    backend, meta = open_backend(str(tiny_model.onnx), "cpu")

    def shard(i: int, top_k: int, out: Path, **kw: Any) -> dict[str, Any]:
        return run_predict(ClassificationTask, backend, meta, str(tmp_path / "in"), out,
                           {"shard": f"{i}/2", "top_k": top_k, "workers": 0}, **kw)

    shard(0, 2, tmp_path / "mixed")
    shard(1, 1, tmp_path / "mixed")
    assert (tmp_path / "mixed" / "fingerprint.shard0of2.json").is_file()
    with pytest.raises(VisionpipeError, match=r"shards 0/2 and 1/2 come from different models or options "
                                              r"\(top_k 2 → 1\); predict shard 1/2 again"):
        merge_outputs(tmp_path / "mixed")
    with pytest.raises(VisionpipeError, match="top_k 1 → 2"):  # each shard guards its own files
        shard(1, 2, tmp_path / "mixed")
    shard(1, 2, tmp_path / "mixed", on_change="overwrite")
    merge_outputs(tmp_path / "mixed")
    merged = json.loads((tmp_path / "mixed" / "fingerprint.json").read_text())
    assert merged["options"] == {"top_k": 2} and merged["model_sha256"] == sha(tiny_model.onnx)
    again = run_predict(ClassificationTask, backend, meta, str(tmp_path / "in"), tmp_path / "mixed",
                        {"top_k": 2, "workers": 0})
    assert again["skipped_already_done"] == 6 and again["images"] == 0, "the merged folder resumes"


@pytest.mark.parametrize("options, message", [
    ({"score_threshold": 1.5}, r"score_threshold: must be <= 1 \(got 1.5\)"),
    ({"score_threshold": float("nan")}, r"score_threshold: must be a finite number"),
    ({"draw_threshold": -0.1}, r"draw_threshold: must be >= 0 \(got -0.1\)"),
    ({"prefetch": 0}, r"prefetch: must be >= 1 \(got 0\)"),
])
def test_declared_options_have_ranges(options, message):
    from visionpipe_plugins.classification.task import ClassificationTask
    from visionpipe_plugins.detection.task import DetectionTask

    with pytest.raises(ConfigError, match=message):
        DetectionTask.check_predict_options(options)
    with pytest.raises(ConfigError, match=r"top_k: must be >= 1 \(got 0\)"):
        ClassificationTask.check_predict_options({"top_k": 0})


def test_numbers_in_scientific_notation_are_numbers():
    from visionpipe_plugins.detection.task import DetectionTask

    assert DetectionTask.check_predict_options({"score_threshold": "1e-3"}) == {"score_threshold": 0.001}


def test_cli_flags_of_options_the_task_does_not_take_are_usage_errors(cli, tiny_model, tmp_path):
    from visionpipe.errors import UsageError

    r = cli(str(tiny_model.onnx), "in", "--out", "pm", "--prompt", "hi")
    assert isinstance(r.exception, UsageError)
    assert str(r.exception) == ("--prompt: unknown predict option 'prompt' for task classification "
                                "(valid: count_total, pin, prefetch, top_k)")
    r = cli(str(tiny_model.onnx), "in", "--out", "pm", "--top-k", "0")
    assert str(r.exception) == "--top-k: must be >= 1 (got 0)"
    assert not (tmp_path / "pm").exists(), "nothing written"
