"""One interface over onnxruntime and PyTorch checkpoints: ``run(feed) -> list of arrays``."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visionpipe.errors import UsageError, VisionpipeError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "torch")
GRAPH_OPTIMIZATION = ("disable", "basic", "extended", "all")


class Backend:
    """Runs a model on named numpy inputs (batch axis first) and returns its outputs."""

    input_names: list[str]
    name: str = "backend"
    streams: int = 1  # batches that may run at once (run() is called from that many threads)
    on_cpu: bool = False  # the model computes on the CPU (it competes with decoding for the cores)
    model_file: Path | None = None  # the file it was opened from (open_backend sets it)

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs for one batch."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Plain facts for the run summary (backend, device, threads)."""
        return {"backend": self.name}


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity; containers and taskset included)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def split_cores(streams: int | None, threads: int | None, accelerator: bool) -> tuple[int, int]:
    """(model runs at once, threads per run) from the user's choices and the usable cores.

    On the CPU, one single-threaded run per core (e.g. 2 x 1 on 2 cores) keeps every core busy
    without the per-operator synchronisation of splitting one small batch over all cores; the
    two are as fast on the model alone, but decoding then fits between runs instead of stalling
    every operator. ``--threads T`` alone gives cores // T runs of T threads. On an accelerator
    two runs overlap one batch's host work with the next one's compute.
    """
    cores = usable_cores()
    if streams is not None and streams < 1:
        raise VisionpipeError(f"--streams must be >= 1 (got {streams})")
    if accelerator:
        return streams or 2, threads or cores
    if streams is None:
        streams = max(1, cores // threads) if threads else cores
    return streams, threads or max(1, cores // streams)


def onnx_session_options(threads: int | None = None, inter_threads: int | None = None,
                         graph_optimization: str = "all", spinning: bool | None = None) -> Any:
    """onnxruntime SessionOptions from plain settings (``spinning=None`` keeps ORT's default)."""
    import onnxruntime as ort

    if graph_optimization not in GRAPH_OPTIMIZATION:
        raise VisionpipeError(f"graph optimization '{graph_optimization}': use one of {', '.join(GRAPH_OPTIMIZATION)}")
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
    if inter_threads:
        so.inter_op_num_threads = int(inter_threads)
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[graph_optimization]
    if spinning is not None:
        # Spinning intra-op threads busy-wait between parallel sections; with decoder threads on the
        # same cores they steal the CPU the decoders need, so predict turns it off by default.
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "1" if spinning else "0")
    return so


class OnnxBackend(Backend):
    """onnxruntime session: CUDA provider when asked (or auto) and installed, else CPU.

    ``streams=None`` sizes runs-at-once and threads per run for batch prediction (see
    :func:`split_cores`); the default, one run, gives that run all the threads.
    """

    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike, device: str = "auto", threads: int | None = None,
                 graph_optimization: str = "all", inter_threads: int | None = None,
                 spinning: bool | None = False, streams: int | None = 1) -> None:
        import onnxruntime as ort

        from visionpipe.export.onnx import check_external_data

        check_external_data(path)
        available = ort.get_available_providers()
        cuda = device in ("cuda", "auto") and "CUDAExecutionProvider" in available
        # onnxruntime sizes its pool from the machine's cores, not the ones this process may use
        # (containers, taskset): on a 2-core slice of a big host it would start one thread per host core.
        streams, threads = split_cores(streams, threads, cuda)
        so = onnx_session_options(threads, inter_threads, graph_optimization, spinning)
        providers: list[Any] = ["CPUExecutionProvider"]
        if cuda:
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": _local_rank()}))
        elif device == "cuda":
            raise VisionpipeError("--device cuda: onnxruntime has no CUDA provider here (install onnxruntime-gpu, "
                                  "or predict with the .pt checkpoint: --backend torch)")
        try:
            self.session = ort.InferenceSession(str(path), so, providers=providers)
        except Exception as e:  # a corrupt or unsupported model: one line, not an ORT traceback
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise VisionpipeError(f"{path}: onnxruntime cannot load this model: {first}") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.providers = self.session.get_providers()
        self.threads, self.graph_optimization, self.spinning = threads, graph_optimization, spinning
        self.streams, self.on_cpu = streams, self.providers[0] == "CPUExecutionProvider"

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs for one batch."""
        return self.session.run(None, feed)

    def describe(self) -> dict[str, Any]:
        """Providers and session settings."""
        return {"backend": self.name, "providers": self.providers, "threads": self.threads, "streams": self.streams,
                "graph_optimization": self.graph_optimization, "spinning": self.spinning}


def _to_numpy(out: Any) -> list[np.ndarray]:
    """Model outputs (tensor / tuple / list / dict, any float dtype) → float32-or-native numpy arrays."""
    if isinstance(out, torch.Tensor):
        t = out.detach()
        if t.is_floating_point() and t.dtype != torch.float32:
            t = t.float()  # bf16/fp16 under AMP: numpy has no bf16
        return [t.cpu().numpy()]
    if isinstance(out, dict):
        return [a for v in out.values() for a in _to_numpy(v)]
    if isinstance(out, (list, tuple)):
        return [a for v in out for a in _to_numpy(v)]
    raise VisionpipeError(f"unsupported model output type {type(out).__name__}")


def pick_torch_device(device: str) -> torch.device:
    """cuda:LOCAL_RANK when asked or available (auto), else cpu; an error when cuda is asked but absent."""
    if device not in ("cpu", "cuda", "auto"):
        raise VisionpipeError(f"--device {device}: use cpu, cuda or auto")
    if device in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", _local_rank() % torch.cuda.device_count())
    if device == "cuda":
        raise VisionpipeError("--device cuda: no CUDA device available")
    return torch.device("cpu")


class TorchBackend(Backend):
    """A visionpipe checkpoint run in PyTorch eager, optionally under autocast (AMP)."""

    name = "torch"

    def __init__(self, module: torch.nn.Module, input_names: list[str], device: str = "auto",
                 amp: bool = False, threads: int | None = None, streams: int | None = 1) -> None:
        self.device = pick_torch_device(device)
        self.on_cpu = self.device.type == "cpu"
        if streams is None and self.on_cpu:
            streams = 1  # torch on the CPU: one run with all threads (its intra-op pool is process-wide)
        self.streams, per_run = split_cores(streams, threads, not self.on_cpu)
        if self.on_cpu and (threads or self.streams > 1):
            torch.set_num_threads(per_run)  # process-wide: torch has one intra-op pool
        self.module = module.eval().to(self.device)
        self.input_names = input_names
        self.amp = bool(amp)
        # fp16 on CUDA (tensor cores everywhere); bf16 on CPU, where autocast supports only bf16.
        self.amp_dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16

    @torch.inference_mode()
    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs for one batch."""
        cuda = self.device.type == "cuda"
        args = []
        for n in self.input_names:
            t = torch.from_numpy(np.ascontiguousarray(feed[n]))
            args.append(t.pin_memory().to(self.device, non_blocking=True) if cuda else t)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            out = self.module(*args)
        return _to_numpy(out)

    def describe(self) -> dict[str, Any]:
        """Device, AMP and threads."""
        return {"backend": self.name, "device": str(self.device),
                "amp": str(self.amp_dtype).replace("torch.", "") if self.amp else "off",
                "threads": torch.get_num_threads() if self.on_cpu else None, "streams": self.streams}


def resolve_model(model_path: str | os.PathLike, backend: str = "auto") -> Path:
    """The model file to open: the path itself, or for a run folder its model.onnx / checkpoints/best.pt."""
    if backend not in BACKENDS:
        raise VisionpipeError(f"--backend {backend}: use one of {', '.join(BACKENDS)}")
    p = Path(model_path)
    if not p.is_dir():
        if not p.exists():
            raise VisionpipeError(f"{p}: model file not found")
        return p
    onnx_file, ckpt = p / "model.onnx", p / "checkpoints" / "best.pt"
    order = {"auto": [onnx_file, ckpt], "onnxruntime": [onnx_file], "torch": [ckpt]}[backend]
    for cand in order:
        if cand.is_file():
            return cand
    if backend == "torch":
        raise VisionpipeError(f"{p}: no checkpoints/best.pt in this run folder")
    also = " or checkpoints/best.pt" if backend == "auto" else ""
    raise VisionpipeError(f"{p}: no model.onnx{also} in this run folder (export it: visionpipe export {p})")


def open_backend(model_path: str, device: str = "auto", **kw: Any) -> tuple[Backend, dict[str, Any]]:
    """Open an exported ``.onnx``, a ``.pt`` checkpoint or a run folder; return (backend, metadata).

    Keyword settings: ``backend`` (auto/onnxruntime/torch: must agree with the file), ``threads``,
    ``streams`` (default 1; None sizes it for batch prediction), ``inter_threads``,
    ``graph_optimization``, ``spinning`` (onnxruntime), ``amp`` (torch).
    """
    from visionpipe.export.onnx import read_metadata

    choice = kw.get("backend") or "auto"
    p = resolve_model(model_path, choice)
    if p.suffix == ".onnx":
        if choice == "torch":
            raise VisionpipeError(f"{p}: --backend torch needs a .pt checkpoint (or a run folder)")
        if kw.get("amp"):
            raise UsageError(f"{p}: --amp is for the torch backend (a .pt checkpoint); onnxruntime runs the "
                             "exported model as it is (drop --amp, or predict with the checkpoint: --backend torch)")
        meta = read_metadata(p)
        backend: Backend = OnnxBackend(p, device, threads=kw.get("threads"),
                                       graph_optimization=kw.get("graph_optimization") or "all",
                                       inter_threads=kw.get("inter_threads"), spinning=kw.get("spinning", False),
                                       streams=kw.get("streams", 1))
        backend.model_file = p
        return backend, meta
    if p.suffix in (".pt", ".pth"):
        if choice == "onnxruntime":
            raise VisionpipeError(f"{p}: --backend onnxruntime needs an exported .onnx model (visionpipe export)")
        onnx_only = [flag for flag, key in (("--graph-optimization", "graph_optimization"), ("--spinning", "spinning"),
                                            ("inter_threads", "inter_threads")) if kw.get(key)]
        if onnx_only:
            raise UsageError(f"{p}: {' and '.join(onnx_only)} {'applies' if len(onnx_only) == 1 else 'apply'} to "
                             "onnxruntime only; this .pt checkpoint runs in torch (drop it, or predict with the "
                             "exported .onnx model)")
        from visionpipe.export.checkpoint_model import module_from_checkpoint

        module, spec = module_from_checkpoint(p)
        meta = json.loads(json.dumps(spec.metadata, default=str))  # the same plain data an exported model carries
        meta.setdefault("inputs", spec.input_names)
        meta.setdefault("outputs", spec.output_names)
        backend = TorchBackend(module, spec.input_names, device, amp=bool(kw.get("amp")), threads=kw.get("threads"),
                               streams=kw.get("streams", 1))
        backend.model_file = p
        return backend, meta
    raise VisionpipeError(f"{p}: expected an exported .onnx model, a .pt checkpoint or a run folder")
