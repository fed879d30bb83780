"""int8 quantization of an exported ONNX model with onnxruntime, and its accuracy against fp32.

Static quantization calibrates activation ranges on preprocessed training images (QDQ
format, per-channel weights); dynamic quantization needs no data. The model's visionpipe
metadata is carried over, with a ``quantization`` entry added.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from visionpipe.errors import ExportError, ImageReadError, VisionpipeError
from visionpipe.export.onnx import METADATA_KEY, read_metadata
from visionpipe.images import read_image
from visionpipe.io import atomic_path

log = logging.getLogger(__name__)
MODES = ("static", "dynamic")
# what onnxruntime quantizes dynamically (it has no int8 GRU or RNN: those stay float)
DYNAMIC_OPS = ("MatMul", "Gemm", "Attention", "LSTM", "EmbedLayerNormalization")
Feed = dict[str, np.ndarray]


def _batches(feeds: Iterable[Feed], batch_size: int) -> Iterator[Feed]:
    """Consecutive feeds stacked ``batch_size`` at a time; a feed of another shape starts a new batch
    (a detector takes each image at its own size)."""
    buf: list[Feed] = []
    for f in feeds:
        if buf and any(f[k].shape != buf[0][k].shape for k in f):
            yield {k: np.stack([b[k] for b in buf]) for k in buf[0]}
            buf = []
        buf.append(f)
        if len(buf) == batch_size:
            yield {k: np.stack([b[k] for b in buf]) for k in buf[0]}
            buf = []
    if buf:
        yield {k: np.stack([b[k] for b in buf]) for k in buf[0]}


def image_feeds(paths: Iterable[str | os.PathLike], preprocess: Callable[[np.ndarray], tuple[Feed, Any]]) -> Iterator[Feed]:
    """Model inputs (no batch axis) for each readable image; unreadable ones are skipped."""
    for p in paths:
        try:
            yield preprocess(read_image(p))[0]
        except ImageReadError as e:
            log.warning("calibration: skipping %s: %s", p, e.reason)


def _excluded_nodes(model: Any) -> list[str]:
    """Nodes kept in float: the ones producing graph outputs and Softmax (scores stay exact)."""
    outputs = {o.name for o in model.graph.output}
    return [n.name for n in model.graph.node if n.op_type == "Softmax" or set(n.output) & outputs]


def _count_quantized(graph: Any) -> int:
    """Nodes of ``graph`` and its subgraphs (Loop/If bodies) that quantization put in: Q/DQ, QLinear*, *Integer*,
    DynamicQuantize* (e.g. LSTM), QAttention, QGemm, QEmbedLayerNormalization."""
    n = 0
    for node in graph.node:
        op = node.op_type
        n += op in ("QuantizeLinear", "DequantizeLinear") or "Integer" in op or op.startswith(
            ("QLinear", "DynamicQuantize", "QAttention", "QGemm", "QEmbedLayerNorm", "QOrdered"))
        for a in node.attribute:
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                n += _count_quantized(g)
    return n


def _name_nodes(model: Any) -> None:
    for i, n in enumerate(model.graph.node):
        if not n.name:
            n.name = f"{n.op_type}_{i}"


def quantize_onnx(src: str | os.PathLike, dst: str | os.PathLike, mode: str = "static",
                  calibration: Iterable[Feed] | None = None, *, batch_size: int = 16,
                  per_channel: bool = True) -> dict[str, Any]:
    """Quantize ``src`` to int8 at ``dst`` (written atomically); return what was done.

    ``calibration`` yields model inputs without the batch axis (static mode only).
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if mode not in MODES:
        raise VisionpipeError(f"--calibration {mode}: use static or dynamic")
    src, dst = Path(src), Path(dst)
    fp32 = onnx.load(str(src))
    meta_props = {p.key: p.value for p in fp32.metadata_props}
    try:
        done = json.loads(meta_props.get(METADATA_KEY, "{}")).get("quantization")
    except (ValueError, AttributeError):
        done = None
    if done:
        raise VisionpipeError(f"{src}: already quantized ({done.get('type', 'int8')} {done.get('mode', '')}); "
                              f"quantize its float model ({done.get('float_model', 'model.onnx')}) instead")
    n_calib = 0
    with tempfile.TemporaryDirectory(prefix="vp-quant-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:  # shape inference + graph fusions (Conv+BN+Relu) make quantization cleaner and faster
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
        except Exception as e:
            log.warning("quantization pre-processing failed (%s: %s); quantizing the model as exported",
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            onnx.save(fp32, str(pre))
        model = onnx.load(str(pre))
        _name_nodes(model)
        onnx.save(model, str(pre))
        exclude = _excluded_nodes(model)
        out_tmp = Path(tmp) / "int8.onnx"
        # dynamic mode: onnxruntime first rewrites each Gemm as <name>_MatMul + <name>_Add; exclude those too
        gemms = {n.name for n in model.graph.node if n.op_type == "Gemm"}
        to_exclude = exclude + [f"{n}{suffix}" for n in exclude if n in gemms for suffix in ("_MatMul", "_Add")]
        try:
            if mode == "dynamic":
                # Conv through dynamic quantization becomes ConvInteger, several times slower than fp32 on
                # CPU; dynamic mode is for MatMul/Gemm/recurrent models, static for convolutional ones.
                quantize_dynamic(str(pre), str(out_tmp), per_channel=per_channel, weight_type=QuantType.QInt8,
                                 nodes_to_exclude=to_exclude, op_types_to_quantize=list(DYNAMIC_OPS))
            else:
                if calibration is None:
                    raise VisionpipeError("static quantization needs calibration images")
                batches = list(_batches(calibration, batch_size))  # bounded by the caller's image count
                n_calib = sum(len(next(iter(b.values()))) for b in batches)
                if not n_calib:
                    raise VisionpipeError("static quantization: no readable calibration images")

                class Reader(CalibrationDataReader):
                    def __init__(self) -> None:
                        self.it = iter(batches)

                    def get_next(self) -> Feed | None:
                        return next(self.it, None)

                quantize_static(str(pre), str(out_tmp), Reader(), quant_format=QuantFormat.QDQ,
                                per_channel=per_channel, activation_type=QuantType.QUInt8,
                                weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                                nodes_to_exclude=exclude)
        except VisionpipeError:
            raise
        except Exception as e:
            raise ExportError(f"int8 quantization ({mode}) of {src} failed: {type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e
        q = onnx.load(str(out_tmp))
        info = {"type": "int8", "mode": mode, "format": "QDQ" if mode == "static" else "integer-ops",
                "per_channel": per_channel, "calibration_images": n_calib, "float_model": src.name,
                "kept_float": exclude, "quantized_nodes": _count_quantized(q.graph)}
        if not info["quantized_nodes"]:
            loops = any(n.op_type in ("Loop", "If", "Scan") for n in model.graph.node)
            why = (" (layers inside Loop/If subgraphs, such as detection's per-image loop, are not quantized)" if loops
                   else " (dynamic mode quantizes MatMul/Gemm/LSTM/Attention layers outside the head only, not "
                   "Conv, GRU or RNN; for convolutional models use --calibration static)" if mode == "dynamic" else "")
            log.warning("int8 quantization (%s) of %s quantized no layer: the model written stays float%s", mode,
                        src.name, why)
        del q.metadata_props[:]
        for k, v in meta_props.items():
            if k == METADATA_KEY:
                d = json.loads(v)
                d["quantization"] = info
                v = json.dumps(d)
            e = q.metadata_props.add()
            e.key, e.value = k, v
        q.producer_name = fp32.producer_name or "visionpipe"
        with atomic_path(dst) as t:
            onnx.save(q, str(t))
    size = dst.stat().st_size
    log.info("quantized %s -> %s (%s, %.1f MB -> %.1f MB)", src.name, dst, mode, src.stat().st_size / 1e6, size / 1e6)
    return {**info, "file": str(dst), "bytes": size, "float_bytes": src.stat().st_size}


def _session(path: Path) -> Any:
    from visionpipe.infer.backends import OnnxBackend

    return OnnxBackend(path, "cpu")


def _run_all(backend: Any, batches: list[Feed], images: int) -> tuple[list[list[np.ndarray]], float]:
    """Outputs of each batch and the throughput (images/s, after one warm-up batch)."""
    import time

    backend.run(batches[0])
    outs: list[list[np.ndarray]] = []
    t0 = time.perf_counter()
    for b in batches:
        outs.append(backend.run(b))
    return outs, images / max(time.perf_counter() - t0, 1e-9)


def compare_models(fp32: str | os.PathLike, int8: str | os.PathLike, images: Sequence[str],
                   labels: Sequence[int] | None, preprocess: Callable[[np.ndarray], tuple[Feed, Any]],
                   batch_size: int = 32) -> dict[str, Any]:
    """fp32 vs int8 on the same images: top-1 of each and the drop (with labels), output agreement always."""
    keep, feeds = [], []
    for i, p in enumerate(images):
        try:
            feeds.append(preprocess(read_image(p))[0])
            keep.append(i)
        except ImageReadError:
            continue
    if not feeds:
        raise VisionpipeError("no readable images to compare the quantized model on")
    batches = list(_batches(feeds, batch_size))
    a, rate_a = _run_all(_session(Path(fp32)), batches, len(feeds))
    b, rate_b = _run_all(_session(Path(int8)), batches, len(feeds))
    # per output: the largest and the mean difference over every batch (batches may differ in shape)
    diffs = [[np.abs(x.astype(np.float64) - y) for x, y in zip(oa, ob, strict=True)] for oa, ob in zip(a, b, strict=True)]
    n_out = len(diffs[0])
    worst = [max((float(d[i].max()) for d in diffs if d[i].size), default=0.0) for i in range(n_out)]
    mean = [sum(float(d[i].sum()) for d in diffs) / max(1, sum(d[i].size for d in diffs)) for i in range(n_out)]
    res: dict[str, Any] = {"images": len(feeds), "images_per_second_fp32": round(rate_a, 1),
                           "images_per_second_int8": round(rate_b, 1),
                           "max_abs_diff": max(worst), "mean_abs_diff": float(np.mean(mean))}
    if a[0][0].ndim == 2:  # (batch, classes): compare the decisions too
        pa, pb = np.concatenate([o[0].argmax(1) for o in a]), np.concatenate([o[0].argmax(1) for o in b])
        res["top1_agreement"] = float(np.mean(pa == pb))
        if labels is not None:
            y = np.asarray([labels[i] for i in keep])
            res["top1_fp32"] = float(np.mean(pa == y))
            res["top1_int8"] = float(np.mean(pb == y))
            res["top1_drop_points"] = round(100.0 * (res["top1_fp32"] - res["top1_int8"]), 3)
    return res


def labelled_samples(dataset: Any) -> tuple[list[str], list[int] | None]:
    """(image paths, integer labels or None) of a dataset's ``samples`` (or ``records``).

    A sample is a (path, label) pair (ImageFolder), a path, or an object naming its image file in
    ``image`` (segmentation) or ``path`` (detection); only (path, int) pairs give labels.
    """
    samples = getattr(dataset, "samples", None) or getattr(dataset, "records", None)
    if not samples:
        return [], None
    paths, labels = [], []
    for s in samples:
        if isinstance(s, (tuple, list)) and s and isinstance(s[0], (str, os.PathLike)):
            paths.append(str(s[0]))
            labels.append(s[1] if len(s) > 1 and isinstance(s[1], (int, np.integer)) else None)
        elif isinstance(s, (str, os.PathLike)):
            paths.append(str(s))
            labels.append(None)
        elif isinstance(f := getattr(s, "image", None) or getattr(s, "path", None), (str, os.PathLike)):
            paths.append(str(f))
            labels.append(None)
    return paths, (labels if paths and all(lb is not None for lb in labels) else None)


def spread(items: Sequence[Any], n: int) -> list[Any]:
    """``n`` items evenly spread over ``items`` (all of them when there are fewer)."""
    if n >= len(items):
        return list(items)
    idx = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in idx]


def quantize_export(fp32_path: str | os.PathLike, dst: str | os.PathLike, mode: str, predictor: Any,
                    calibration_images: Sequence[str], eval_images: Sequence[str], eval_labels: Sequence[int] | None,
                    num_calibration: int = 256) -> dict[str, Any]:
    """Quantize an exported model with calibration images, then compare it with fp32 on ``eval_images``."""
    calib = spread(list(calibration_images), num_calibration)
    if mode == "static" and not calib:
        raise VisionpipeError("static quantization needs calibration images: none found in the training data "
                              "(give --calibration-data FOLDER, or use --calibration dynamic)")
    report = quantize_onnx(fp32_path, dst, mode, image_feeds(calib, predictor.preprocess) if mode == "static" else None)
    if eval_images:
        report["accuracy"] = compare_models(fp32_path, dst, eval_images, eval_labels, predictor.preprocess)
        if eval_labels is None:
            report["accuracy"]["note"] = ("no labels for this task's evaluation images: outputs are compared "
                                          "(top-1 difference needs a classification validation set)")
    else:
        report["accuracy"] = {"note": "no validation images available: accuracy not compared"}
    meta = read_metadata(dst)
    report["metadata_kept"] = meta.get("task") == read_metadata(fp32_path).get("task")
    return report


def export_int8(task: Any, data: Any, fp32: Path, mode: str, calibration_data: str | None,
                num_calibration: int = 256) -> dict[str, Any]:
    """`visionpipe export --quantize int8`: ``<fp32 stem>.int8.onnx`` + a JSON report; the report has a ``summary`` line.

    Calibration images come from ``calibration_data`` (folder, glob or list) or the training split;
    the comparison with fp32 uses the validation split (else the test split).
    """
    from visionpipe.infer.sources import iter_sources
    from visionpipe.io import write_json

    fp32 = Path(fp32)
    dst = fp32.with_name(fp32.stem + ".int8.onnx")
    if not type(task).image_predict:  # no image inputs: nothing to calibrate on or compare with
        if mode == "static":
            raise VisionpipeError(f"task {task.name}: static int8 calibration needs image inputs; "
                                  f"use --calibration dynamic")
        report = quantize_onnx(fp32, dst, "dynamic")
        report["accuracy"] = {"note": f"task {task.name}: accuracy against fp32 is not compared (not an image task)"}
    else:
        predictor = type(task).predictor(read_metadata(fp32), {})
        calib: list[str] = []
        if mode == "static":
            if calibration_data:
                calib = [str(p) for p in iter_sources(calibration_data)]
            elif data is not None and data.train is not None:
                calib = labelled_samples(data.train)[0]
        eval_ds = (data.val or data.test) if data is not None else None
        paths, labels = labelled_samples(eval_ds) if eval_ds is not None else ([], None)
        report = quantize_export(fp32, dst, mode, predictor, calib, paths, labels, num_calibration)
    acc = report.get("accuracy", {})
    line = "" if report["quantized_nodes"] else "no layer was quantized, the model stays float; "
    if "top1_fp32" in acc:
        line += (f"validation top-1 fp32 {acc['top1_fp32']:.4f} -> int8 {acc['top1_int8']:.4f} "
                 f"(drop {acc['top1_drop_points']:.2f} points on {acc['images']} images)")
        if acc["images"] >= 128:  # fewer images are too few batches to time
            line += f"; {acc['images_per_second_fp32']:.0f} -> {acc['images_per_second_int8']:.0f} img/s"
    elif "max_abs_diff" in acc:
        line += f"outputs vs fp32 on {acc['images']} images: max abs diff {acc['max_abs_diff']:.3g} ({acc.get('note', '')})"
    else:
        line += acc.get("note", "")
    report["summary"] = line
    write_json(dst.with_suffix(".json"), report)
    return report
