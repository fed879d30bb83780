"""Backends behind one interface: onnxruntime and the PyTorch checkpoint agree; options and errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tests.infer.conftest import write_images
from visionpipe.errors import UsageError, VisionpipeError
from visionpipe.images import read_image
from visionpipe.infer.backends import OnnxBackend, TorchBackend, open_backend
from visionpipe.infer.sources import iter_sources
from visionpipe_plugins.classification.task import ClassificationTask


@pytest.fixture(scope="module")
def batch(tiny_model) -> dict[str, np.ndarray]:
    """The val images, preprocessed as predict does."""
    _, meta = open_backend(str(tiny_model.onnx), "cpu")
    pred = ClassificationTask.predictor(meta, {})
    xs = [pred.preprocess(read_image(p))[0]["images"] for p in iter_sources(str(tiny_model.data / "val"))]
    return {"images": np.stack(xs)}


def test_torch_checkpoint_matches_onnx(tiny_model, batch):
    onnx_be, onnx_meta = open_backend(str(tiny_model.onnx), "cpu")
    torch_be, torch_meta = open_backend(str(tiny_model.checkpoint), "cpu")
    assert isinstance(onnx_be, OnnxBackend) and isinstance(torch_be, TorchBackend)
    for key in ("task", "class_names", "input_size", "preprocess"):
        assert onnx_meta[key] == torch_meta[key], key
    a, b = onnx_be.run(batch), torch_be.run(batch)
    assert len(a) == len(b) == 2
    for x, y in zip(a, b, strict=True):
        assert x.shape == y.shape == (len(batch["images"]), 2) and y.dtype == np.float32
        assert np.abs(x - y).max() < 1e-4


def test_torch_amp_on_cpu_returns_float32_close_to_fp32(tiny_model, batch):
    fp32 = open_backend(str(tiny_model.checkpoint), "cpu")[0].run(batch)
    amp_be = open_backend(str(tiny_model.checkpoint), "cpu", amp=True)[0]
    assert amp_be.describe()["amp"] == "bfloat16"
    amp = amp_be.run(batch)
    assert amp[1].dtype == np.float32
    assert np.abs(amp[1] - fp32[1]).max() < 0.05, "bf16 autocast: probabilities within 0.05"


def test_run_folder_picks_the_file_for_the_backend(tiny_model):
    assert isinstance(open_backend(str(tiny_model.run), "cpu")[0], OnnxBackend)
    assert isinstance(open_backend(str(tiny_model.run), "cpu", backend="torch")[0], TorchBackend)
    with pytest.raises(VisionpipeError, match="needs a .pt checkpoint"):
        open_backend(str(tiny_model.onnx), "cpu", backend="torch")
    with pytest.raises(VisionpipeError, match="needs an exported .onnx"):
        open_backend(str(tiny_model.checkpoint), "cpu", backend="onnxruntime")
    with pytest.raises(VisionpipeError, match="--backend"):
        open_backend(str(tiny_model.run), "cpu", backend="tensorrt")


@pytest.mark.parametrize("level", ["disable", "basic", "extended", "all"])
def test_session_options_change_speed_not_results(tiny_model, batch, level):
    ref = open_backend(str(tiny_model.onnx), "cpu")[0].run(batch)[1]
    be = open_backend(str(tiny_model.onnx), "cpu", threads=1, graph_optimization=level, spinning=True)[0]
    assert be.describe()["graph_optimization"] == level and be.describe()["threads"] == 1
    assert np.abs(be.run(batch)[1] - ref).max() < 1e-4


def test_streams_split_the_cores(tiny_model, batch, monkeypatch):
    from visionpipe.infer import backends

    monkeypatch.setattr(backends, "usable_cores", lambda: 8)
    assert backends.split_cores(None, None, False) == (8, 1)  # batch predict on the CPU: one run per core
    assert backends.split_cores(None, 4, False) == (2, 4)
    assert backends.split_cores(2, None, False) == (2, 4)
    assert backends.split_cores(1, None, False) == (1, 8)  # open_backend's default: one run, all cores
    assert backends.split_cores(None, None, True) == (2, 8)  # on a GPU, two runs overlap host work
    with pytest.raises(VisionpipeError, match="--streams"):
        backends.split_cores(0, None, False)
    be = open_backend(str(tiny_model.onnx), "cpu", streams=None)[0]
    assert (be.streams, be.threads, be.on_cpu) == (8, 1, True)
    ref = open_backend(str(tiny_model.onnx), "cpu")[0].run(batch)[1]
    assert np.abs(be.run(batch)[1] - ref).max() < 1e-5


def test_bad_options_and_files_are_one_line_errors(tiny_model, tmp_path):
    with pytest.raises(VisionpipeError, match="graph optimization 'max'"):
        open_backend(str(tiny_model.onnx), "cpu", graph_optimization="max")
    with pytest.raises(VisionpipeError, match="not found"):
        open_backend(str(tmp_path / "missing.onnx"), "cpu")
    with pytest.raises(VisionpipeError, match="no model.onnx or checkpoints/best.pt"):
        open_backend(str(tmp_path), "cpu")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(VisionpipeError, match="not a readable ONNX model"):
        open_backend(str(broken), "cpu")
    broken.write_bytes(b"")
    with pytest.raises(VisionpipeError, match=r"broken.onnx: not a readable ONNX model \(an empty file\)"):
        open_backend(str(broken), "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(VisionpipeError, match="no CUDA device"):
            open_backend(str(tiny_model.checkpoint), "cuda")


def test_options_of_the_other_backend_are_refused_not_ignored(tiny_model):
    with pytest.raises(UsageError, match=r"model.onnx: --amp is for the torch backend"):
        open_backend(str(tiny_model.onnx), "cpu", amp=True)
    with pytest.raises(UsageError, match=r"--amp is for the torch backend"):  # a run folder picks model.onnx
        open_backend(str(tiny_model.run), "cpu", amp=True)
    with pytest.raises(UsageError, match=r"best.pt: --graph-optimization applies to onnxruntime only"):
        open_backend(str(tiny_model.checkpoint), "cpu", graph_optimization="basic")
    with pytest.raises(UsageError, match=r"--graph-optimization and --spinning apply to onnxruntime only"):
        open_backend(str(tiny_model.checkpoint), "cpu", graph_optimization="all", spinning=True)
    assert open_backend(str(tiny_model.checkpoint), "cpu", spinning=False, amp=True)[0].amp


def test_cli_predict_with_checkpoint_equals_onnx(tiny_model, tmp_path, monkeypatch):
    """`visionpipe predict runs/x/checkpoints/best.pt folder` works and agrees with the ONNX model."""
    from visionpipe.cli import app

    monkeypatch.chdir(tmp_path)
    write_images(tmp_path / "in", 5)
    runner = CliRunner()
    a = runner.invoke(app, ["predict", str(tiny_model.checkpoint), "in", "--out", "a", "--top-k", "2"])
    b = runner.invoke(app, ["predict", str(tiny_model.run), "in", "--out", "b", "--top-k", "2", "--threads", "1",
                            "--streams", "3", "--graph-optimization", "basic"])
    assert a.exit_code == 0, a.output
    assert b.exit_code == 0, b.output
    sa, sb = json.loads(a.stdout), json.loads(b.stdout)
    assert sa["backend"] == "torch" and sb["backend"] == "onnxruntime" and sa["images"] == sb["images"] == 5
    assert sa["engine"]["streams"] == 1 and (sb["engine"]["streams"], sb["engine"]["threads"]) == (3, 1)
    ra = [json.loads(x) for x in (tmp_path / "a" / "predictions.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (tmp_path / "b" / "predictions.jsonl").read_text().splitlines()]
    assert [r["path"] for r in ra] == [r["path"] for r in rb]
    for x, y in zip(ra, rb, strict=True):
        assert x["labels"] == y["labels"] and np.allclose(x["scores"], y["scores"], atol=1e-4)


def test_models_with_broken_metadata_are_one_line_errors(tiny_model, tmp_path):
    import onnx

    from visionpipe.export.onnx import METADATA_KEY

    def with_metadata(name: str, value: str):
        model = onnx.load(str(tiny_model.onnx))
        for prop in model.metadata_props:
            if prop.key == METADATA_KEY:
                prop.value = value
        onnx.save(model, str(tmp_path / name))
        return str(tmp_path / name)

    with pytest.raises(VisionpipeError, match="metadata is not valid JSON"):
        open_backend(with_metadata("json.onnx", "{not json"), "cpu")
    with pytest.raises(VisionpipeError, match="metadata names no task"):
        open_backend(with_metadata("list.onnx", "[1, 2]"), "cpu")
    _, meta = open_backend(str(tiny_model.onnx), "cpu")
    meta.pop("preprocess")
    with pytest.raises(VisionpipeError, match=r"does not fit task classification \(no 'preprocess'\)"):
        ClassificationTask.build_predictor(meta, {})
