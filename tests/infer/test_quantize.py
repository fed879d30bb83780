"""int8 quantization: the model runs, keeps its metadata, and its accuracy is compared with fp32."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from tests.conftest import run_cli
from tests.infer.conftest import write_images
from visionpipe.errors import VisionpipeError
from visionpipe.export.onnx import read_metadata
from visionpipe.export.quantize import image_feeds, quantize_onnx
from visionpipe.infer.backends import open_backend
from visionpipe.infer.sources import iter_sources
from visionpipe_plugins.classification.task import ClassificationTask


@pytest.fixture(scope="module")
def static_int8(tiny_model, tmp_path_factory):
    meta = read_metadata(tiny_model.onnx)
    pred = ClassificationTask.predictor(meta, {})
    dst = tmp_path_factory.mktemp("int8") / "model.int8.onnx"
    calib = list(iter_sources(str(tiny_model.data / "train")))
    report = quantize_onnx(tiny_model.onnx, dst, "static", image_feeds(calib, pred.preprocess), batch_size=4)
    return dst, report


def test_static_int8_runs_keeps_metadata_and_agrees(tiny_model, static_int8):
    dst, report = static_int8
    assert report["mode"] == "static" and report["calibration_images"] == 12 and report["bytes"] < report["float_bytes"] / 2
    assert report["quantized_nodes"] > 0
    fp32_meta, q_meta = read_metadata(tiny_model.onnx), read_metadata(dst)
    assert q_meta["quantization"]["type"] == "int8" and q_meta["quantization"]["mode"] == "static"
    assert {k: v for k, v in q_meta.items() if k != "quantization"} == fp32_meta
    ops = {n.op_type for n in onnx.load(str(dst)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    be32, meta = open_backend(str(tiny_model.onnx), "cpu")
    be8, _ = open_backend(str(dst), "cpu")
    pred = ClassificationTask.predictor(meta, {})
    from visionpipe.images import read_image

    x = np.stack([pred.preprocess(read_image(p))[0]["images"] for p in iter_sources(str(tiny_model.data / "val"))])
    a, b = be32.run({"images": x}), be8.run({"images": x})
    assert b[1].shape == a[1].shape and np.allclose(b[1].sum(1), 1, atol=1e-4), "softmax kept in float"
    assert (a[0].argmax(1) == b[0].argmax(1)).mean() >= 0.75


def test_dynamic_int8_keeps_metadata(tiny_model, tmp_path):
    report = quantize_onnx(tiny_model.onnx, tmp_path / "dyn.onnx", "dynamic")
    assert report["mode"] == "dynamic" and report["calibration_images"] == 0
    assert read_metadata(tmp_path / "dyn.onnx")["class_names"] == ["blue", "red"]
    out = open_backend(str(tmp_path / "dyn.onnx"), "cpu")[0].run({"images": np.zeros((2, 3, 32, 32), np.float32)})
    assert out[1].shape == (2, 2)


def _export_text_model(path, cell: str | None) -> None:
    """A tiny model like charrnn's: [recurrent layer or Linear] -> head Linear (logits) -> Softmax (probs)."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.GRU(8, 16, batch_first=True) if cell == "gru" else nn.Linear(8, 16)
            self.head = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = self.body(x)[0][:, -1] if cell == "gru" else torch.relu(self.body(x))
            logits = self.head(h)
            return logits, logits.softmax(-1)

    x = torch.zeros(2, 5, 8) if cell == "gru" else torch.zeros(2, 8)
    torch.onnx.export(Net().eval(), (x,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                      output_names=["logits", "probs"])


def test_dynamic_int8_keeps_the_head_in_float(tmp_path):
    """onnxruntime turns Gemm into MatMul + Add before quantizing; the head must still stay float."""
    _export_text_model(tmp_path / "mlp.onnx", None)
    report = quantize_onnx(tmp_path / "mlp.onnx", tmp_path / "mlp.int8.onnx", "dynamic")
    nodes = onnx.load(str(tmp_path / "mlp.int8.onnx")).graph.node
    quantized = [n.name for n in nodes if n.op_type == "MatMulInteger"]
    assert len(quantized) == 1 and "head" not in quantized[0], quantized  # the hidden layer only
    assert any(n.op_type in ("MatMul", "Gemm") and "head" in n.name for n in nodes)
    assert any("head" in name for name in report["kept_float"])


def test_dynamic_int8_of_a_gru_model_says_it_stays_float(tmp_path, caplog):
    """onnxruntime has no int8 GRU: with the head kept float nothing is quantized, and the log says so."""
    _export_text_model(tmp_path / "gru.onnx", "gru")
    with caplog.at_level("WARNING"):
        quantize_onnx(tmp_path / "gru.onnx", tmp_path / "gru.int8.onnx", "dynamic")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "gru.int8.onnx")).graph.node}
    assert "MatMulInteger" not in ops and "GRU" in ops
    assert "stays float" in caplog.text


def _export_without_conv_matmuls(tiny_model, path):
    """The tiny model exported with every convolution left a Conv (no ``conv_to_matmul``)."""
    from visionpipe.export.checkpoint_model import task_and_model_from_checkpoint
    from visionpipe.export.onnx import export_onnx

    task, model, state = task_and_model_from_checkpoint(tiny_model.checkpoint)
    export_onnx(task.export_spec(model, None, state.get("info", {}), 0), path, conv_to_matmul=False)
    return path


def test_dynamic_int8_keeps_the_classifier_head_float_and_says_nothing_was_quantized(tiny_model, tmp_path, caplog):
    """onnxruntime turns the head's Gemm into '<name>_MatMul' before excluding nodes; the head must stay float."""
    convs_only = _export_without_conv_matmuls(tiny_model, tmp_path / "convs.onnx")
    report = quantize_onnx(convs_only, tmp_path / "dyn.onnx", "dynamic")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "dyn.onnx")).graph.node}
    assert not ops & {"MatMulInteger", "DynamicQuantizeLinear"}, ops
    assert report["quantized_nodes"] == 0 and "/model/fc/Gemm" in report["kept_float"]
    assert "quantized no layer: the model written stays float" in caplog.text
    x = {"images": np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)}
    a = open_backend(str(convs_only), "cpu")[0].run(x)
    b = open_backend(str(tmp_path / "dyn.onnx"), "cpu")[0].run(x)
    assert np.abs(a[0] - b[0]).max() < 1e-4, "a float model: the same logits"


def test_dynamic_int8_quantizes_the_convolutions_exported_as_matrix_products(tiny_model, tmp_path):
    """At 32x32 a resnet18's last two stages work on 2x2 and 1x1 maps: exported as matrix products, which
    dynamic int8 quantizes (the head still stays float)."""
    report = quantize_onnx(tiny_model.onnx, tmp_path / "dyn.onnx", "dynamic")
    nodes = onnx.load(str(tmp_path / "dyn.onnx")).graph.node
    as_matmul = [n for n in onnx.load(str(tiny_model.onnx)).graph.node if n.name.endswith("/as_matmul/gemm")]
    assert as_matmul and report["quantized_nodes"] > 0
    assert sum(n.op_type == "MatMulInteger" for n in nodes) == len(as_matmul)
    assert "/model/fc/Gemm" in report["kept_float"]
    assert any(n.op_type in ("MatMul", "Gemm") and n.name.startswith("/model/fc/") for n in nodes)


def test_static_without_calibration_images_is_an_error(tiny_model, tmp_path):
    with pytest.raises(VisionpipeError, match="calibration"):
        quantize_onnx(tiny_model.onnx, tmp_path / "q.onnx", "static", iter([]))
    with pytest.raises(VisionpipeError, match="static or dynamic"):
        quantize_onnx(tiny_model.onnx, tmp_path / "q.onnx", "float16")
    assert not (tmp_path / "q.onnx").exists()


def test_an_int8_model_is_not_quantized_again(static_int8, tmp_path):
    with pytest.raises(VisionpipeError, match=r"model.int8.onnx: already quantized \(int8 static\); quantize its "
                                              r"float model \(model.onnx\)"):
        quantize_onnx(static_int8[0], tmp_path / "twice.onnx", "dynamic")
    assert not (tmp_path / "twice.onnx").exists()


def test_predict_with_the_int8_model(static_int8, tmp_path):
    from visionpipe.infer.runner import predict_images

    write_images(tmp_path / "in", 5)
    backend, meta = open_backend(str(static_int8[0]), "cpu")
    summary = predict_images(backend, ClassificationTask.predictor(meta, {}), str(tmp_path / "in"), tmp_path / "out", {})
    assert summary["images"] == 5 and summary["errors"] == 0


@pytest.mark.slow
def test_cli_export_quantize_reports_accuracy_against_fp32(tiny_model, tmp_path):
    proc = run_cli("export", str(tiny_model.run), "--out", str(tmp_path / "m.onnx"), "--quantize", "int8",
                   "--calibration-images", "8", cwd=tiny_model.pipeline.parent)
    assert "validation top-1 fp32" in proc.stdout and "int8" in proc.stdout
    report = json.loads((tmp_path / "m.int8.json").read_text())
    acc = report["accuracy"]
    assert report["calibration_images"] == 8 and acc["images"] == 6
    assert 0 <= acc["top1_int8"] <= 1 and acc["top1_drop_points"] == pytest.approx(100 * (acc["top1_fp32"] - acc["top1_int8"]))
    assert read_metadata(tmp_path / "m.int8.onnx")["quantization"]["float_model"] == "m.onnx"
    bad = run_cli("export", str(tiny_model.run), "--quantize", "int4", cwd=tmp_path, check=False)
    assert bad.returncode != 0 and "only 'int8'" in bad.stderr


def test_images_of_different_sizes_calibrate_and_compare(tmp_path):
    """A model taking each image at its own size (like the detector): batches hold one shape each."""
    import torch
    from PIL import Image

    from visionpipe.export.quantize import compare_models

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 2)).eval()
    src = tmp_path / "any_size.onnx"
    torch.onnx.export(net, (torch.zeros(1, 3, 20, 30),), str(src), dynamo=False, input_names=["images"],
                      output_names=["logits"], dynamic_axes={"images": {0: "batch", 2: "h", 3: "w"}})
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(20, 30), (20, 30), (24, 24), (40, 32), (20, 30)]):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(paths[-1])

    def prep(img):
        return {"images": (img.transpose(2, 0, 1) / 255).astype(np.float32)}, None

    report = quantize_onnx(src, tmp_path / "q.onnx", "static", image_feeds(paths, prep), batch_size=4)
    assert report["calibration_images"] == 5 and report["quantized_nodes"] > 0
    acc = compare_models(src, tmp_path / "q.onnx", [str(p) for p in paths], [0, 1, 0, 1, 0], prep, batch_size=4)
    assert acc["images"] == 5 and 0 <= acc["max_abs_diff"] < 0.5 and acc["mean_abs_diff"] <= acc["max_abs_diff"]
    assert 0 <= acc["top1_fp32"] <= 1 and 0 <= acc["top1_agreement"] <= 1


def test_dynamic_int8_of_an_lstm_counts_its_quantized_layers(tmp_path, caplog):
    """onnxruntime's DynamicQuantizeLSTM is a quantized layer: no 'quantized no layer' warning."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = torch.nn.LSTM(8, 16, batch_first=True)

        def forward(self, x):
            return self.lstm(x)[0] * 2.0  # no MatMul: the LSTM is the only layer to quantize

    torch.manual_seed(0)
    src = tmp_path / "lstm.onnx"
    torch.onnx.export(Net().eval(), (torch.zeros(1, 5, 8),), str(src), dynamo=False, input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "batch", 1: "time"}})
    report = quantize_onnx(src, tmp_path / "q.onnx", "dynamic")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node}
    assert "DynamicQuantizeLSTM" in ops and report["quantized_nodes"] >= 1
    assert "quantized no layer" not in caplog.text
