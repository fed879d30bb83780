"""ONNX export: trace, check, embed metadata, verify parity against PyTorch on real inputs."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visionpipe.errors import ExportError, UnsafePathError, VisionpipeError
from visionpipe.io import atomic_path
from visionpipe.task import ExportSpec

log = logging.getLogger(__name__)
METADATA_KEY = "visionpipe"


def default_compare(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    """Max abs difference of outputs matched one to one (shapes must agree)."""
    if len(ref) != len(got):
        return float("inf")
    worst = 0.0
    for a, b in zip(ref, got, strict=False):
        if a.shape != b.shape:
            return float("inf")
        if a.size:
            worst = max(worst, float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))))
    return worst


def _flatten(out: Any) -> list[np.ndarray]:
    if isinstance(out, torch.Tensor):
        return [out.detach().cpu().numpy()]
    if isinstance(out, dict):
        return [a for v in out.values() for a in _flatten(v)]
    if isinstance(out, (list, tuple)):
        return [a for v in out for a in _flatten(v)]
    raise ExportError(f"unsupported model output type {type(out).__name__}")


MIN_OPSET, MAX_OPSET = 11, 23


def _ort_version() -> str:
    import onnxruntime as ort

    return str(ort.__version__)


def export_onnx(spec: ExportSpec, out: str | os.PathLike, *, opset: int = 17, tolerance: float = 1e-3,
                dynamic_batch: bool = True, conv_to_matmul: bool = True) -> dict[str, Any]:
    """Export ``spec.module`` to ``out`` atomically; raise ExportError if parity exceeds ``tolerance``.

    ``conv_to_matmul``: convolutions on maps so small that every output sees every input become one
    matrix product (:mod:`visionpipe.export.small_convs`); the parity check runs on the result.
    """
    import onnx
    import onnxruntime as ort

    from visionpipe.export.small_convs import convs_to_matmul

    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset {opset}: visionpipe exports opsets {MIN_OPSET}-{MAX_OPSET}")
    if spec.max_opset is not None and opset > spec.max_opset:  # before tracing: not after an export that cannot run
        raise ExportError(f"opset {opset}: task {spec.metadata.get('task', '?')} exports up to opset {spec.max_opset} "
                          f"(onnxruntime {_ort_version()} runs no higher for this model); use --opset / export.opset "
                          f"{spec.max_opset} or lower")
    out = Path(out)
    module = spec.module.eval()
    axes = {k: dict(v) for k, v in spec.dynamic_axes.items()}
    if not dynamic_batch:
        axes = {k: {i: n for i, n in v.items() if n != "batch"} for k, v in axes.items()}
    with atomic_path(out) as tmp:
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(module, spec.example_inputs, str(tmp), dynamo=False, opset_version=opset,
                                  input_names=spec.input_names, output_names=spec.output_names,
                                  dynamic_axes=axes or None, do_constant_folding=True, external_data=False)
        except Exception as e:
            raise ExportError(f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0]}") from e
        model = onnx.load(str(tmp))
        if spec.postprocess_onnx is not None:
            try:
                model = spec.postprocess_onnx(model)
            except Exception as e:
                raise ExportError(f"ONNX post-processing failed: {type(e).__name__}: {e}") from e
        as_matmul = convs_to_matmul(model) if conv_to_matmul else []
        if as_matmul:
            log.info("%d convolution(s) on maps where every output sees every input run as matrix products: %s",
                     len(as_matmul), ", ".join(as_matmul))
        try:
            onnx.checker.check_model(model, full_check=True)
        except Exception as e:
            raise ExportError(f"onnx.checker rejected the exported model: {e}") from e
        meta = dict(spec.metadata)
        meta.setdefault("format", "visionpipe-onnx/1")
        meta["inputs"] = spec.input_names
        meta["outputs"] = spec.output_names
        entry = model.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(meta)
        model.producer_name = "visionpipe"
        onnx.save(model, str(tmp))

        sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        compare = spec.compare or default_compare
        inputs = spec.parity_inputs or [spec.example_inputs]
        diffs = []
        for args in inputs:
            with torch.no_grad():
                ref = _flatten(module(*args))
            feed = {n: a.detach().cpu().numpy() for n, a in zip(spec.input_names, args, strict=False)}
            got = sess.run(None, feed)
            diffs.append(compare(ref, got))
        worst = max(diffs) if diffs else float("nan")
        if not worst <= tolerance:
            raise ExportError(f"ONNX parity check failed: max abs difference {worst:.3g} > tolerance {tolerance:g} "
                              f"on {len(inputs)} real input(s); model not written")
    size = out.stat().st_size
    log.info("exported %s (%.1f MB), parity max abs diff %.2e on %d input(s)", out, size / 1e6, worst, len(inputs))
    return {"file": out.name, "opset": opset, "max_abs_diff": worst, "tolerance": tolerance,
            "parity_inputs": len(inputs), "bytes": size, "checker": "passed", "convs_as_matmul": len(as_matmul)}


def _sparse_tensors(graph: Any) -> Any:
    """The values and indices of ``graph``'s sparse initializers and sparse attributes, subgraphs included
    (onnx's ``_get_all_tensors`` leaves them out)."""
    for sp in graph.sparse_initializer:
        yield from (sp.values, sp.indices)
    for node in graph.node:
        for a in node.attribute:
            for sp in ([a.sparse_tensor] if a.HasField("sparse_tensor") else []) + list(a.sparse_tensors):
                yield from (sp.values, sp.indices)
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _sparse_tensors(g)


def check_external_data(path: str | os.PathLike) -> None:
    """Refuse an ONNX file whose external-data tensors (dense or sparse) point outside its folder."""
    import itertools

    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    p = Path(path)
    model = onnx.load(str(p), load_external_data=False)
    root = p.parent.resolve()
    for t in itertools.chain(_get_all_tensors(model), _sparse_tensors(model.graph)):
        if uses_external_data(t):
            loc = next((e.value for e in t.external_data if e.key == "location"), "")
            target = (root / loc).resolve()
            if Path(loc).is_absolute() or (target != root and root not in target.parents):
                raise UnsafePathError(f"{p}: tensor '{t.name}' keeps its data at '{loc}', outside the model's folder; refused")


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The visionpipe metadata embedded in an exported model."""
    import onnx

    p = Path(path)
    if not p.is_file():
        raise VisionpipeError(f"{p}: model file not found")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:
        raise VisionpipeError(f"{p}: not a readable ONNX model ({type(e).__name__})") from None
    if not model.graph.node and not model.metadata_props:  # protobuf parses an empty file (and some others) as a model
        raise VisionpipeError(f"{p}: not a readable ONNX model ({'an empty file' if p.stat().st_size == 0 else 'no graph'})")
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            try:
                meta = json.loads(prop.value)
            except ValueError as e:
                raise VisionpipeError(f"{p}: its visionpipe metadata is not valid JSON ({e}); "
                                      "export the model again with `visionpipe export`") from None
            if not isinstance(meta, dict) or not isinstance(meta.get("task"), str):
                raise VisionpipeError(f"{p}: its visionpipe metadata names no task; "
                                      "export the model again with `visionpipe export`")
            return meta
    raise VisionpipeError(f"{p}: no visionpipe metadata; export it with `visionpipe export` first")
