"""Security and reliability defaults: weights_only loads, paths kept in their root, atomic writes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import run_cli
from visionpipe.engine.checkpoint import load_checkpoint, save_checkpoint
from visionpipe.errors import UnsafePathError, VisionpipeError
from visionpipe.io import TMP_PREFIX, atomic_open, atomic_path, clean_stale_tmp, write_json
from visionpipe.paths import resolve_under


class Payload:
    """Any arbitrary object: a pickle of it must never be loaded."""

    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_checkpoint_roundtrip(tmp_path):
    p = tmp_path / "c.pt"
    save_checkpoint({"model": {"w": torch.ones(2)}, "epoch": 3, "history": [{"a": 1.0}]}, p)
    state = load_checkpoint(p)
    assert state["epoch"] == 3 and torch.equal(state["model"]["w"], torch.ones(2))


def test_pickled_objects_are_refused_with_the_reason_and_no_unsafe_advice(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"model": Payload()}, p)
    with pytest.raises(VisionpipeError) as e:
        load_checkpoint(p)
    message = str(e.value)
    assert message.startswith(f"{p}: refused: it holds pickled Python objects, which are never loaded (")
    assert "posix.system" in message and "weights_only=False" not in message and "\n" not in message


class Plain:
    """An ordinary class: its pickled instance is refused as an unsupported global (torch words it differently)."""


def test_a_pickled_plain_object_is_refused_as_such_without_torchs_advice(tmp_path):
    p = tmp_path / "plain.pt"
    torch.save({"model": {"w": torch.ones(1)}, "extra": Plain()}, p)
    with pytest.raises(VisionpipeError) as e:
        load_checkpoint(p)
    message = str(e.value)
    assert message.startswith(f"{p}: refused: it holds pickled Python objects, which are never loaded (")
    assert "Plain" in message and "weights_only" not in message and "safe_globals" not in message
    assert "\n" not in message


def test_a_whole_pickled_model_is_refused_without_torchs_advice(tmp_path):
    p = tmp_path / "model.pth"
    torch.save(torch.nn.Linear(2, 2), p)  # torch.save(model) instead of torch.save(model.state_dict())
    with pytest.raises(VisionpipeError) as e:
        load_checkpoint(p)
    message = str(e.value)
    assert message.startswith(f"{p}: refused: it holds pickled Python objects") and "torch.nn" in message
    assert "weights_only" not in message and "safe_globals" not in message and "\n" not in message


@pytest.mark.parametrize("content", [b"not a zip", b"101\n", b"\x08\x07onnx-ish protobuf"])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, content):
    p = tmp_path / "broken.pt"
    p.write_bytes(content)
    with pytest.raises(VisionpipeError, match=r"broken\.pt: not a readable PyTorch checkpoint \(corrupt, truncated"):
        load_checkpoint(p)


@pytest.mark.parametrize("state, message", [
    ({"foo": 1}, "'foo' is a int, not a tensor"),
    ({"model": {"fc.weight": "text"}}, "'fc.weight' is a str, not a tensor"),
    ({}, "no model weights found (expected"),
    ({"other.weight": torch.ones(3)}, "none of its tensors fit this model (0 with a matching name but another "
                                      "shape, 1 others"),
])
def test_weights_files_that_do_not_fit_are_one_line_errors(tmp_path, state, message):
    from visionpipe.engine.checkpoint import load_weights_file

    p = tmp_path / "w.pt"
    torch.save(state, p)
    with pytest.raises(VisionpipeError) as e:
        load_weights_file(torch.nn.Linear(2, 2), p)
    assert str(e.value).startswith(f"{p}: ") and message in str(e.value)


def test_a_checkpoint_without_a_config_mapping_is_a_clear_error(tmp_path):
    from visionpipe.export.checkpoint_model import task_and_model_from_checkpoint

    p = tmp_path / "c.pt"
    torch.save({"task": "classification", "config": "not a mapping", "model": {}}, p)
    with pytest.raises(VisionpipeError, match="not a visionpipe checkpoint"):
        task_and_model_from_checkpoint(p)


@pytest.mark.parametrize("rel", ["../outside.png", "a/../../x.png", "/etc/passwd"])
def test_paths_escaping_root_are_refused(tmp_path, rel):
    with pytest.raises(UnsafePathError, match="outside its root"):
        resolve_under(tmp_path, rel, what="file_name")


def test_paths_inside_root_resolve(tmp_path):
    assert resolve_under(tmp_path, "a/b/../c.png") == (tmp_path / "a" / "c.png").resolve()


def test_symlink_escape_is_refused(tmp_path):
    (tmp_path / "root").mkdir()
    os.symlink("/etc", tmp_path / "root" / "link")
    with pytest.raises(UnsafePathError):
        resolve_under(tmp_path / "root", "link/passwd")


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    p = tmp_path / "m.json"
    write_json(p, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_open(p, "w") as f:
            f.write('{"v": 2, "half')
            raise RuntimeError("killed mid-write")
    assert p.read_text().strip().startswith('{\n  "v": 1')
    assert not [q for q in tmp_path.iterdir() if q.name.startswith(TMP_PREFIX)]


def test_stale_temporaries_are_cleaned(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    stale = tmp_path / "checkpoints" / f"{TMP_PREFIX}last.pt.abc"
    stale.write_bytes(b"partial")
    assert clean_stale_tmp(tmp_path) == [stale]
    assert not stale.exists()


def test_onnx_external_data_outside_folder_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from visionpipe.export.onnx import check_external_data

    t = helper.make_tensor("w", TensorProto.FLOAT, [1], [1.0])
    t.data_location = TensorProto.EXTERNAL
    t.ClearField("float_data")
    for k, v in (("location", "../../secret.bin"), ("offset", "0"), ("length", "4")):
        e = t.external_data.add()
        e.key, e.value = k, v
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], [t])
    d = tmp_path / "m"
    d.mkdir()
    onnx.save(helper.make_model(graph), str(d / "model.onnx"))
    with pytest.raises(UnsafePathError, match="outside the model's folder"):
        check_external_data(d / "model.onnx")


def test_onnx_sparse_initializer_data_outside_folder_is_refused(tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from visionpipe.export.onnx import check_external_data

    values = numpy_helper.from_array(np.zeros(4, np.float32), "w")
    values.ClearField("raw_data")
    values.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "../secret.bin"), ("offset", "0"), ("length", "16")):
        e = values.external_data.add()
        e.key, e.value = k, v
    sparse = helper.make_sparse_tensor(values, numpy_helper.from_array(np.arange(4, dtype=np.int64), "w_idx"), [4])
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], sparse_initializer=[sparse])
    d = tmp_path / "m"
    d.mkdir()
    onnx.save(helper.make_model(graph), str(d / "model.onnx"))
    with pytest.raises(UnsafePathError, match="tensor 'w' keeps its data at '../secret.bin', outside the model's folder"):
        check_external_data(d / "model.onnx")


def test_importing_visionpipe_makes_no_network_request() -> None:
    """albumentations' update check (a PyPI request on every import) is off unless the user turns it on."""
    code = (
        "import urllib.request\n"
        "calls = []\n"
        "urllib.request.OpenerDirector.open = lambda self, url, *a, **k: calls.append(url)\n"
        "import visionpipe, albumentations\n"
        "print(len(calls))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0", out.stderr


def test_atomic_writes_get_the_permissions_open_would_give(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"v": 1})
        with atomic_path(tmp_path / "b.bin") as tmp:
            tmp.write_bytes(b"weights")
        (tmp_path / "c.txt").write_text("plain open")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"a.json": modes["c.txt"], "b.bin": modes["c.txt"], "c.txt": modes["c.txt"]}
    assert modes["c.txt"] & 0o044  # readable by others, not mkstemp's 0600


def test_atomic_path_fsyncs_the_file_before_the_rename(tmp_path, monkeypatch):
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    with atomic_path(tmp_path / "last.pt") as tmp:
        tmp.write_bytes(b"checkpoint")
    assert calls[:2] == ["fsync", "replace"] and (tmp_path / "last.pt").read_bytes() == b"checkpoint"


@pytest.mark.parametrize("sets, message", [
    (["export.file=checkpoints/best.pt"], "export.file: 'checkpoints/best.pt' must be an .onnx file of its own"),
    (["export.file=."], "export.file: '.' must be an .onnx file of its own"),
    (["predict.out=checkpoints", "predict.source=data/val"], "predict.out: 'checkpoints' must be a folder of its own"),
    (["predict.out=config.yaml", "predict.source=data/val"], "predict.out: 'config.yaml' must be a folder of its own"),
])
def test_outputs_cannot_overwrite_the_runs_own_files(tiny_pipeline, tmp_path, sets, message):
    args = ["run", str(tiny_pipeline()), "--run-dir", "run", "--set", "stages=[load, augment, model, export, predict]"]
    for s in sets:
        args += ["--set", s]
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "best.pt").write_bytes(b"weights")
    proc = run_cli(*args, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert (tmp_path / "run" / "checkpoints" / "best.pt").read_bytes() == b"weights"


@pytest.mark.parametrize("sets, what", [
    (["export.file=../elsewhere.onnx"], "export.file '../elsewhere.onnx' resolves to"),
    (["predict.out=../../preds", "predict.source=data/val"], "predict.out '../../preds' resolves to"),
])
def test_outputs_outside_the_run_folder_are_refused_before_training(tiny_pipeline, tmp_path, sets, what):
    args = ["run", str(tiny_pipeline()), "--run-dir", "run"]
    for s in sets:
        args += ["--set", s]
    proc = run_cli(*args, cwd=tmp_path, check=False)
    assert proc.returncode != 0 and what in proc.stderr and "outside its root" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists(), "refused only after training"


def test_a_run_name_that_is_the_output_folder_is_refused(tiny_pipeline, tmp_path):
    proc = run_cli("run", str(tiny_pipeline()), "--set", "name=.", "--set", f"output={tmp_path / 'runs'}",
                   "--set", "stages=[load]", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "name: '.' is the output folder itself" in proc.stderr
    assert not list(tmp_path.glob("runs-*"))
