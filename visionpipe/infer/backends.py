"""One interface over onnxruntime and PyTorch checkpoints: ``run(feed) -> list of arrays``."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visionpipe.errors import VisionpipeError

log = logging.getLogger(__name__)


class Backend:
    """Runs a model on named numpy inputs (batch axis first) and returns its outputs."""

    input_names: list[str]
    name: str = "backend"

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs for one batch."""
        raise NotImplementedError


class OnnxBackend(Backend):
    """onnxruntime session (CPU, or CUDA when asked/auto and available)."""

    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike, device: str = "auto", threads: int | None = None,
                 graph_optimization: str = "all") -> None:
        import onnxruntime as ort

        from visionpipe.export.onnx import check_external_data

        check_external_data(path)
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[graph_optimization]
        available = ort.get_available_providers()
        providers = ["CPUExecutionProvider"]
        if device in ("cuda", "auto") and "CUDAExecutionProvider" in available:
            providers.insert(0, "CUDAExecutionProvider")
        elif device == "cuda":
            raise VisionpipeError("--device cuda: onnxruntime has no CUDA provider here (install onnxruntime-gpu)")
        self.session = ort.InferenceSession(str(path), so, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.providers = self.session.get_providers()

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs for one batch."""
        return self.session.run(None, feed)


class TorchBackend(Backend):
    """A visionpipe checkpoint run in PyTorch eager (optionally under autocast on CUDA)."""

    name = "torch"

    def __init__(self, module: torch.nn.Module, input_names: list[str], device: str = "auto",
                 amp: bool = False) -> None:
        dev = "cuda" if device in ("cuda", "auto") and torch.cuda.is_available() else "cpu"
        if device == "cuda" and dev != "cuda":
            raise VisionpipeError("--device cuda: no CUDA device available")
        self.device = torch.device(dev)
        self.module = module.eval().to(self.device)
        self.input_names = input_names
        self.amp = amp and dev == "cuda"

    @torch.no_grad()
    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs for one batch."""
        from visionpipe.export.onnx import _flatten

        args = [torch.from_numpy(feed[n]).to(self.device) for n in self.input_names]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            out = self.module(*args)
        return [a.astype(np.float32) if a.dtype == np.float16 else a for a in _flatten(out)]


def open_backend(model_path: str, device: str = "auto", **kw: Any) -> tuple[Backend, dict[str, Any]]:
    """Open an exported ``.onnx`` or a ``.pt`` checkpoint; return (backend, metadata)."""
    from visionpipe.export.onnx import read_metadata

    p = Path(model_path)
    if p.suffix == ".onnx":
        meta = read_metadata(p)
        return OnnxBackend(p, device, threads=kw.get("threads"),
                           graph_optimization=kw.get("graph_optimization", "all")), meta
    if p.suffix in (".pt", ".pth"):
        from visionpipe.export.checkpoint_model import module_from_checkpoint

        module, spec = module_from_checkpoint(p)
        return TorchBackend(module, spec.input_names, device, amp=kw.get("amp", False)), spec.metadata
    raise VisionpipeError(f"{p}: expected an exported .onnx model or a .pt checkpoint")
