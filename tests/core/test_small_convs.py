"""Convolutions on tiny maps exported as one matrix product: same outputs, only where nothing is lost."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from visionpipe.export.onnx import export_onnx
from visionpipe.export.small_convs import ConvGeometry, convs_to_matmul, dense_matrix
from visionpipe.task import ExportSpec

GEOMETRIES = [  # (input size, kernel, stride, padding, dilation)
    (2, 3, 1, 1, 1),  # ResNet's last stage at 64x64: every output sees every input
    (2, 3, 2, 1, 1),  # 2x2 -> 1x1
    (1, 3, 1, 1, 1),  # 1x1 map: only the centre tap
    (3, 5, 1, 2, 1),
    (4, 3, 1, 1, 1),  # not fully connected (corners do not see each other), but the matrix is still the conv
    (5, 3, 2, 0, 2),
]


@pytest.mark.parametrize("size,k,stride,pad,dil", GEOMETRIES)
def test_dense_matrix_is_the_convolution(size, k, stride, pad, dil) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, k, stride=stride, padding=pad, dilation=dil, bias=False)
    x = torch.randn(3, 6, size, size)
    with torch.no_grad():
        y = conv(x)
    geo = ConvGeometry((size, size), tuple(y.shape[2:]), (k, k), (stride, stride), (pad, pad), (dil, dil))
    m = dense_matrix(conv.weight.detach().numpy(), geo)
    got = x.reshape(3, -1).numpy() @ m
    np.testing.assert_allclose(got, y.reshape(3, -1).numpy(), atol=1e-5)


@pytest.mark.parametrize("size,k,stride,pad,expected", [(2, 3, 1, 1, True), (2, 3, 2, 1, True), (1, 3, 1, 1, True),
                                                        (4, 3, 1, 1, False), (2, 1, 1, 0, False),
                                                        (3, 3, 1, 1, False), (3, 5, 1, 2, True)])
def test_fully_connected_means_every_output_sees_every_input(size, k, stride, pad, expected) -> None:
    out = (size + 2 * pad - k) // stride + 1
    assert ConvGeometry((size, size), (out, out), (k, k), (stride, stride), (pad, pad)).fully_connected() is expected


class TinyNet(nn.Module):
    """8x8 input -> 4x4 -> 2x2 maps, with a residual add, convs with and without bias, a grouped conv and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())   # 8x8 -> 4x4
        self.down = nn.Conv2d(8, 16, 3, 2, 1)                                            # 4x4 -> 2x2: not dense
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, 1, 1, bias=False))               # 2x2: dense
        self.depthwise = nn.Conv2d(16, 16, 3, 1, 1, groups=16)                           # grouped: left alone
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.down(self.stem(x)))
        y = torch.relu(y + self.block(y))
        return self.head(self.depthwise(y).mean((2, 3)))


def _spec(dynamic_hw: bool = False) -> ExportSpec:
    torch.manual_seed(0)
    net = TinyNet().eval()
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so the folded kernels are real
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    axes = {"images": {0: "batch", 2: "h", 3: "w"} if dynamic_hw else {0: "batch"}, "logits": {0: "batch"}}
    x = torch.randn(4, 3, 8, 8)
    return ExportSpec(net, (x,), ["images"], ["logits"], axes, {"task": "test"}, parity_inputs=[(x,), (x[:1] * 3,)])


def _ops(path: Path) -> list[str]:
    import onnx

    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_export_runs_the_dense_convs_as_matrix_products(tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort

    spec = _spec()
    plain = export_onnx(spec, tmp_path / "plain.onnx", conv_to_matmul=False)
    fast = export_onnx(spec, tmp_path / "fast.onnx")
    assert plain["convs_as_matmul"] == 0 and fast["convs_as_matmul"] == 2  # the two convs of the 2x2 block
    assert _ops(tmp_path / "plain.onnx").count("Conv") == 5
    assert _ops(tmp_path / "fast.onnx").count("Conv") == 3  # stem, down (4x4 -> 2x2) and the grouped conv stay
    # with a bias (BatchNorm folded in) a Gemm, without one a MatMul; plus the head's Gemm
    assert _ops(tmp_path / "fast.onnx").count("Gemm") == 2 and _ops(tmp_path / "fast.onnx").count("MatMul") == 1
    assert fast["max_abs_diff"] <= 1e-5
    model = onnx.load(str(tmp_path / "fast.onnx"))
    used = {i for n in model.graph.node for i in n.input}
    assert {t.name for t in model.graph.initializer} <= used  # the replaced kernels are gone
    x = np.random.default_rng(1).normal(size=(7, 3, 8, 8)).astype(np.float32)  # another batch size
    with torch.no_grad():
        ref = spec.module(torch.from_numpy(x)).numpy()
    got = ort.InferenceSession(str(tmp_path / "fast.onnx"), providers=["CPUExecutionProvider"]).run(None, {"images": x})
    np.testing.assert_allclose(got[0], ref, atol=1e-5)


def test_maps_of_unknown_size_are_left_alone(tmp_path: Path) -> None:
    """With a dynamic height and width the map sizes are unknown: nothing is rewritten."""
    report = export_onnx(_spec(dynamic_hw=True), tmp_path / "m.onnx")
    assert report["convs_as_matmul"] == 0 and _ops(tmp_path / "m.onnx").count("Conv") == 5


def test_a_model_without_shapes_is_returned_unchanged() -> None:
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((2, 2, 3, 3), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    model = helper.make_model(graph)
    assert convs_to_matmul(model) == [] and [n.op_type for n in model.graph.node] == ["Conv"]


def _conv_graph(x_hw, w, pads, strides=(1, 1), dilations=(1, 1), bias=True, weight_is_input=False,
                conv_is_output=False):
    """x (N, C, H, W) -> Conv -> [Relu] -> y, the weights as initializers (optionally also listed as an input)."""
    from onnx import TensorProto, helper, numpy_helper

    k, c = w.shape[:2]
    inits = [numpy_helper.from_array(w, "w")] + ([numpy_helper.from_array(np.linspace(-1, 1, k, dtype=np.float32),
                                                                           "b")] if bias else [])
    conv = helper.make_node("Conv", ["x", "w"] + (["b"] if bias else []), ["c"], name="conv", pads=list(pads),
                            strides=list(strides), dilations=list(dilations))
    nodes = [conv] + ([] if conv_is_output else [helper.make_node("Relu", ["c"], ["y"])])
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", c, *x_hw])]
    if weight_is_input:
        inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, list(w.shape)))
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("c" if conv_is_output else "y",
                                                                                  TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _run(model, feed):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]


@pytest.mark.parametrize("x_hw,kernel,pads,strides", [  # each one fully connected (every output sees every input)
    ((2, 3), (3, 5), (1, 2, 1, 2), (1, 1)),   # a map wider than high
    ((3, 2), (5, 3), (2, 1, 2, 1), (1, 1)),   # higher than wide
    ((2, 2), (3, 2), (1, 0, 1, 0), (1, 1)),   # a non-square kernel, no padding across: 2x1 out
    ((2, 2), (3, 3), (1, 1, 0, 0), (1, 1)),   # padded on the leading sides only: 1x1 out
    ((2, 2), (3, 3), (1, 1, 1, 1), (2, 2)),   # strided: 1x1 out
])
def test_asymmetric_and_non_square_geometries_give_the_convolutions_outputs(x_hw, kernel, pads, strides):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(5, 4, *kernel)).astype(np.float32)
    x = {"x": rng.normal(size=(3, 4, *x_hw)).astype(np.float32)}
    model = _conv_graph(x_hw, w, pads, strides)
    want = _run(model, x)
    assert convs_to_matmul(model) == ["conv"]
    assert [n.op_type for n in model.graph.node] == ["Flatten", "Gemm", "Reshape", "Relu"]
    np.testing.assert_allclose(_run(model, x), want, atol=1e-5)


def test_convolutions_that_must_stay_convolutions(tmp_path: Path) -> None:
    """Pointwise kernels, weights a caller may override, a model output, external data: nothing rewritten."""
    import onnx

    w3 = np.ones((4, 4, 3, 3), np.float32)
    for model in (_conv_graph((1, 1), np.ones((4, 4, 1, 1), np.float32), (0, 0, 0, 0)),  # onnxruntime's GEMM already
                  _conv_graph((2, 2), w3, (1, 1, 1, 1), weight_is_input=True),         # an input with a default
                  _conv_graph((2, 2), w3, (1, 1, 1, 1), conv_is_output=True)):         # int8 keeps outputs float
        assert convs_to_matmul(model) == [] and model.graph.node[0].op_type == "Conv"
    onnx.save(_conv_graph((2, 2), w3, (1, 1, 1, 1)), str(tmp_path / "ext.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="ext.data", size_threshold=0)
    external = onnx.load(str(tmp_path / "ext.onnx"), load_external_data=False)
    assert convs_to_matmul(external) == [] and external.graph.node[0].op_type == "Conv"
