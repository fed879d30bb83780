"""The exported detector (a batch of images in, padded boxes/labels/scores and counts out) and its parity check."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.models.detection.image_list import ImageList

OUTPUTS = ["boxes", "labels", "scores", "num_detections"]
MAX_OPSET = 21  # opset 22's RoiAlign has no onnxruntime kernel (1.32: NOT_IMPLEMENTED RoiAlign(22))
BODY_PREFIX = "one_image/"


class ExportedDetector(nn.Module):
    """(N, 3, H, W) float 0..1 RGB → boxes (N, K, 4) xyxy input pixels, labels (N, K) int64, scores (N, K),
    num_detections (N,) int64; K = the model's ``detections_per_img``, rows past ``num_detections`` are zeros.

    Resize and normalization happen inside (torchvision's, with the resized size computed as its eager path
    computes it: see :meth:`_resize`), each image on its own, so any N, H, W
    works and an image's detections do not depend on the rest of its batch. torchvision loops over the images
    in Python, which tracing would unroll: so the module is traced on one image and :func:`loop_over_batch`
    wraps that graph in an ONNX ``Loop`` over the batch (eager runs the same loop in Python).
    One tiny extra proposal is appended before the box head: with zero RPN proposals the traced
    graph would reshape an empty tensor with -1, which onnxruntime refuses; the extra one decodes to
    a box smaller than the head's minimum size and is always dropped, so detections are unchanged.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.max_detections = int(model.roi_heads.detections_per_img)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if torch.jit.is_tracing():
            if images.shape[0] != 1:
                raise ValueError(f"trace the detector on one image (got a batch of {images.shape[0]})")
            return self.one(images)
        if images.shape[0] == 0:
            k = self.max_detections
            return (images.new_zeros(0, k, 4), torch.zeros(0, k, dtype=torch.int64, device=images.device),
                    images.new_zeros(0, k), torch.zeros(0, dtype=torch.int64, device=images.device))
        outs = [self.one(images[i:i + 1]) for i in range(images.shape[0])]
        return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))

    def one(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One image (1, 3, H, W) → (1, K, 4), (1, K), (1, K), (1,): detections padded to K."""
        m = self.model
        original = [(images.shape[-2], images.shape[-1])]
        image = self._resize(m.transform.normalize(images[0]))
        batch = ImageList(m.transform.batch_images([image], size_divisible=m.transform.size_divisible),
                          [(image.shape[-2], image.shape[-1])])
        features = m.backbone(batch.tensors)
        if isinstance(features, torch.Tensor):
            features = OrderedDict([("0", features)])
        proposals, _ = m.rpn(batch, features)
        guard = torch.tensor([[0.0, 0.0, 1e-4, 1e-4]], dtype=proposals[0].dtype, device=proposals[0].device)
        proposals = [torch.cat([proposals[0], guard])]
        detections, _ = m.roi_heads(features, proposals, batch.image_sizes)
        out = m.transform.postprocess(detections, batch.image_sizes, original)[0]
        boxes, labels, scores = out["boxes"], out["labels"], out["scores"]
        k = self.max_detections  # torchvision keeps at most this many, so padding to k never cuts
        count = torch.ones_like(labels).sum()
        boxes = torch.cat([boxes, boxes.new_zeros(k, 4)])[:k]
        labels = torch.cat([labels, labels.new_zeros(k)])[:k]
        scores = torch.cat([scores, scores.new_zeros(k)])[:k]
        return boxes[None], labels[None], scores[None], count[None]

    def _resize(self, image: torch.Tensor) -> torch.Tensor:
        """torchvision's eval resize, its output size computed as its eager path does it (in double precision).

        torchvision's traced path computes the scale in float32, and onnxruntime then lands one pixel short for
        some sizes (375x500 at min_size 800: 799 rows instead of 800), which changes every detection.
        """
        t = self.model.transform
        if torch.jit.is_tracing():
            hw = torch._shape_as_tensor(image)[-2:].to(torch.float64)
        else:
            hw = torch.tensor(image.shape[-2:], dtype=torch.float64)
        limits = torch.tensor([float(t.min_size[-1]), float(t.max_size)], dtype=torch.float64)
        scale = (limits / torch.stack([hw.min(), hw.max()])).min()  # a true division: `x / tensor` is x * (1 / tensor)
        size = torch.floor(hw * scale).to(torch.int64)
        if not torch.jit.is_tracing():
            size = [int(v) for v in size]
        return nn.functional.interpolate(image[None], size=(size[0], size[1]), mode="bilinear",
                                         align_corners=False)[0]

    def batched_onnx(self, model: Any) -> Any:
        """The graph traced on one image, wrapped in a ``Loop`` over the batch (``ExportSpec.postprocess_onnx``)."""
        k = self.max_detections
        return loop_over_batch(model, row_shapes={"boxes": [k, 4], "labels": [k], "scores": [k], "num_detections": []})


def loop_over_batch(model: Any, input_name: str = "images", row_shapes: dict[str, list[Any]] | None = None) -> Any:
    """Wrap a model traced on a batch of one into an ONNX ``Loop`` over the batch axis of ``input_name``.

    The traced graph becomes the loop body: it reads sample i as a (1, ...) slice of the outer input, its
    outputs lose their leading 1 and are stacked over the batch. Weights stay in the outer graph (the body
    reads them from there); every other name in the body gets the prefix ``one_image/``. ``row_shapes``
    gives an output's shape without the batch axis where the traced one is less precise.
    """
    import onnx
    from onnx import TensorProto, helper

    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset < 11:
        raise ValueError(f"loop_over_batch needs ONNX opset >= 11 (got {opset})")
    weights = {t.name for t in graph.initializer} | {t.name for t in graph.sparse_initializer}
    inputs = [i for i in graph.input if i.name not in weights]
    if [i.name for i in inputs] != [input_name]:
        raise ValueError(f"expected the single input '{input_name}', got {[i.name for i in inputs]}")

    def name(n: str) -> str:
        return n if not n or n in weights else BODY_PREFIX + n

    def rename(g: Any) -> None:
        for v in (*g.input, *g.output, *g.value_info):
            v.name = name(v.name)
        for node in g.node:
            node.input[:] = [name(n) for n in node.input]
            node.output[:] = [name(n) for n in node.output]
            node.name = BODY_PREFIX + node.name if node.name else ""
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    rename(sub)

    def on_axis0(op: str, x: str, out: str) -> Any:  # Squeeze / Unsqueeze: axes became an input in opset 13
        if opset >= 13:
            return helper.make_node(op, [x, "loop/axis0"], [out])
        return helper.make_node(op, [x], [out], axes=[0])

    def const(out: str, value: int) -> Any:
        return helper.make_node("Constant", [], [out], value=helper.make_tensor(out, TensorProto.INT64, [1], [value]))

    traced_outputs = list(graph.output)
    body = onnx.GraphProto()
    body.CopyFrom(graph)
    del body.initializer[:], body.sparse_initializer[:], body.input[:], body.output[:], body.node[:]
    body.name = "body"
    # Gather + Unsqueeze rather than Slice: the slice's leading 1 stays known, so shape-based folding still works
    body.node.extend([const("loop/axis0", 0), helper.make_node("Gather", ["loop/outer", "loop/i"], ["loop/sample"], axis=0),
                      on_axis0("Unsqueeze", "loop/sample", input_name),
                      *graph.node,
                      helper.make_node("Identity", ["loop/cond_in"], ["loop/cond_out"]),
                      *(on_axis0("Squeeze", o.name, o.name + "/row") for o in traced_outputs)])
    row_outputs, outer_outputs = [], []
    for o in traced_outputs:
        elem, row = o.type.tensor_type.elem_type, (row_shapes or {}).get(o.name, _dims(o)[1:])
        row_outputs.append(helper.make_tensor_value_info(o.name + "/row", elem, row))
        outer_outputs.append(helper.make_tensor_value_info(o.name, elem, ["batch", *row]))
    body.input.extend([helper.make_tensor_value_info("loop/i", TensorProto.INT64, []),
                       helper.make_tensor_value_info("loop/cond_in", TensorProto.BOOL, [])])
    body.output.extend([helper.make_tensor_value_info("loop/cond_out", TensorProto.BOOL, []), *row_outputs])
    rename(body)
    body.node[1].input[0] = input_name  # the one name the body reads from the outer graph, besides the weights

    outer_input = onnx.ValueInfoProto()
    outer_input.CopyFrom(inputs[0])
    shape = outer_input.type.tensor_type.shape
    if shape.dim:
        shape.dim[0].Clear()
        shape.dim[0].dim_param = "batch"
    q = "loop_over_batch/"
    count = [helper.make_node("Shape", [input_name], [q + "shape"]),
             helper.make_node("Constant", [], [q + "axis"], value=helper.make_tensor("axis", TensorProto.INT64, [], [0])),
             helper.make_node("Gather", [q + "shape", q + "axis"], [q + "size"], axis=0)]
    loop = helper.make_node("Loop", [q + "size", ""], [o.name for o in traced_outputs], name="loop_over_batch",
                            body=body)
    outer = helper.make_graph(count + [loop], graph.name, [outer_input], outer_outputs,
                              initializer=list(graph.initializer), sparse_initializer=list(graph.sparse_initializer))
    wrapped = helper.make_model(outer, opset_imports=list(model.opset_import), ir_version=model.ir_version,
                                functions=list(model.functions), producer_name=model.producer_name,
                                producer_version=model.producer_version)
    wrapped.metadata_props.extend(model.metadata_props)
    return wrapped


def pad_stack(images: list[torch.Tensor]) -> torch.Tensor:
    """(3, H, W) images → one (N, 3, H, W) batch, zero-padded at the bottom and right to the largest H and W."""
    h, w = max(im.shape[-2] for im in images), max(im.shape[-1] for im in images)
    out = images[0].new_zeros(len(images), images[0].shape[0], h, w)
    for i, im in enumerate(images):
        out[i, :, :im.shape[-2], :im.shape[-1]] = im
    return out


def _dims(v: Any) -> list[Any]:
    """A value's shape: ints, names of symbolic dimensions, None where unknown."""
    return [d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in v.type.tensor_type.shape.dim]


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes a (N, 4) and b (M, 4)."""
    tl = np.maximum(a[:, None, :2], b[None, :, :2])
    br = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(br - tl, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clip(0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clip(0).prod(-1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def split_detections(outputs: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Batched outputs → per image (boxes (n, 4), labels (n,), scores (n,)), padding cut by ``num_detections``.

    Three outputs (models exported before the batch axis was dynamic) have no padding."""
    boxes, labels, scores = (np.asarray(o) for o in outputs[:3])
    counts = np.asarray(outputs[3]).reshape(-1) if len(outputs) > 3 else [scores.shape[1]] * len(scores)
    return [(boxes[i, :n], labels[i, :n], scores[i, :n]) for i, n in enumerate(int(c) for c in counts)]


def make_compare(score_floor: float, margin: float = 0.02):
    """A parity measure over batches: the images must agree in number and, image by image, every detection
    scoring above ``score_floor + margin`` in either output must have a same-label partner in the other; the
    result is the worst of (1 - IoU) and |score difference| over pairs.

    Detections near the score threshold may appear on one side only (float noise), so they are not required;
    nor are those near the lowest score of an output holding the most detections it can (``k`` rows), which
    float noise may push past that cap; when both are full, their sorted scores are compared instead.
    """

    def one(ref: tuple[np.ndarray, ...], got: tuple[np.ndarray, ...], k: int) -> float:
        worst = 0.0
        if len(ref[2]) == len(got[2]) == k:  # both full: whichever ties made the cut, the scores kept must agree
            worst = float(np.abs(np.sort(ref[2]).astype(np.float64) - np.sort(got[2])).max())
        for (ab, al, as_), (bb, bl, bs) in ((ref, got), (got, ref)):
            cut = float(bs.min()) if len(bs) >= k > 0 else -np.inf  # the other side is full: below this it had no room
            strong = as_ > max(score_floor, cut) + margin
            if not strong.any():
                continue
            if len(bb) == 0:
                return float("inf")
            iou = _iou(ab[strong].astype(np.float64), bb.astype(np.float64))
            iou[al[strong][:, None] != bl[None, :]] = -1.0
            j = iou.argmax(1)
            best = iou[np.arange(len(j)), j]
            if (best < 0).any():
                return float("inf")
            worst = max(worst, float((1 - best).max()), float(np.abs(as_[strong] - bs[j]).max()))
        return worst

    def compare(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
        if len(ref) != len(got) or len(ref) not in (3, 4):
            return float("inf")
        a, b = split_detections(ref), split_detections(got)
        if len(a) != len(b):
            return float("inf")
        k = np.asarray(ref[2]).shape[-1]  # rows per image: the model's detections_per_img
        return max((one(x, y, k) for x, y in zip(a, b, strict=True)), default=0.0)

    return compare
