"""What each figure times: visionpipe's code paths and the baselines they are compared with."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from setup_bench import Bench

# ---------------------------------------------------------------------------------------- inference


def raw_onnxruntime(model: Path, x: np.ndarray, batch_size: int, streams: int = 1, **session: Any) -> float:
    """Images/s of ``session.run`` over already decoded, preprocessed batches: the limit.

    No settings: onnxruntime's default session, one loop. ``streams=S`` with ``threads=T``: S
    threads call ``run`` on one session of T intra-op threads, as predict's model runners do.
    """
    return raw_onnxruntime_timed(model, x, batch_size, streams, **session)[0]


def raw_onnxruntime_timed(model: Path, x: np.ndarray, batch_size: int, streams: int = 1,
                          **session: Any) -> tuple[float, float]:
    """(images/s, process CPU ms per image) of the raw loop of :func:`raw_onnxruntime`."""
    from concurrent.futures import ThreadPoolExecutor

    import onnxruntime as ort

    from visionpipe.infer.backends import onnx_session_options

    so = onnx_session_options(**session) if session else ort.SessionOptions()  # no settings: ORT's defaults
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    batches = [np.ascontiguousarray(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    name = sess.get_inputs()[0].name
    run = lambda b: sess.run(None, {name: b})  # noqa: E731
    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(run, batches[:streams]))  # warm-up
        t0, c0 = time.perf_counter(), time.process_time()
        if streams == 1:
            for b in batches:
                run(b)
        else:
            list(pool.map(run, batches))
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return len(x) / seconds, 1000.0 * cpu / len(x)


def visionpipe_predict(model: Path, folder: Path, out: Path, batch_size: int, **options: Any) -> dict[str, Any]:
    """``visionpipe predict MODEL FOLDER`` in-process: the CLI's code path without its start-up.

    Start-up, here as in the raw loop: opening the onnxruntime session, and (CLI only) the output
    folder's fingerprint (the model file's SHA-256, ~50 ms for this 45 MB model), paid once per run.
    """
    from visionpipe.infer.backends import open_backend
    from visionpipe.manager import get_manager

    shutil.rmtree(out, ignore_errors=True)
    backend, meta = open_backend(str(model), "cpu", streams=None)  # as `visionpipe predict` opens it
    task = get_manager().task(meta["task"])
    warm = np.zeros((batch_size, 3, *meta["input_size"]), np.float32)
    backend.run({backend.input_names[0]: warm})  # the raw loop gets a warm-up batch too
    return task.predict(backend, meta, str(folder), out, {"batch_size": batch_size, "top_k": 5, **options})


def predict_host_cpu_ms(model: Path, folder: Path, out: Path, batch_size: int) -> float:
    """Process CPU ms per image of predict's work around the model, the model replaced by outputs made once.

    Listing, reading, decoding, preprocessing, batching, postprocessing and writing run exactly as
    in :func:`visionpipe_predict`; on a CPU-bound machine this is what predict adds to the raw loop.
    """
    from visionpipe.infer.backends import Backend, open_backend
    from visionpipe.manager import get_manager

    real, meta = open_backend(str(model), "cpu", streams=None)
    outputs = real.run({real.input_names[0]: np.zeros((batch_size, 3, *meta["input_size"]), np.float32)})

    class Precomputed(Backend):
        """Returns the first rows of ``outputs`` for any batch (no model work)."""

        input_names, streams, on_cpu, name = real.input_names, real.streams, True, "precomputed"

        def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
            n = len(next(iter(feed.values())))
            return [o[:n] for o in outputs]

    shutil.rmtree(out, ignore_errors=True)
    task = get_manager().task(meta["task"])
    c0 = time.process_time()
    summary = task.predict(Precomputed(), meta, str(folder), out, {"batch_size": batch_size, "top_k": 5})
    return 1000.0 * (time.process_time() - c0) / max(1, summary["images"])


def torch_tutorial(bench: Bench, folder: Path, batch_size: int) -> float:
    """Images/s of the loop from PyTorch tutorials: PIL + torchvision transforms + model.eval() + no_grad."""
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms as T

    from visionpipe.export.checkpoint_model import task_and_model_from_checkpoint
    from visionpipe.images import iter_image_files

    _, model, _ = task_and_model_from_checkpoint(bench.checkpoint)
    model.eval()
    meta = bench.metadata
    tfm = T.Compose([T.Resize(tuple(meta["input_size"])), T.ToTensor(), T.Normalize(meta["mean"], meta["std"])])
    files = list(iter_image_files(folder))

    class Files(Dataset):
        def __len__(self) -> int:
            return len(files)

        def __getitem__(self, i: int) -> torch.Tensor:
            return tfm(Image.open(files[i]).convert("RGB"))

    loader = DataLoader(Files(), batch_size=batch_size, shuffle=False)
    names = meta["class_names"]
    results = []
    with torch.no_grad():
        model(torch.zeros(batch_size, 3, *meta["input_size"]))  # warm-up
        t0 = time.perf_counter()
        for x in loader:
            probs = model(x).softmax(1)
            top = probs.topk(min(5, len(names)), 1)
            results += [[names[j] for j in row] for row in top.indices.tolist()]
        seconds = time.perf_counter() - t0
    assert len(results) == len(files)
    return len(files) / seconds


# ---------------------------------------------------------------------------------------- training


def _train_setup(bench: Bench, n_images: int) -> tuple[Any, Any, Any]:
    """(task, config, train dataset of n_images with the pipeline's train augmentation)."""
    from visionpipe.config import load_config
    from visionpipe.manager import get_manager
    from visionpipe.task import DataBundle

    loaded = load_config(str(bench.pipeline))
    task = get_manager().task("classification")(loaded.config, None)
    from visionpipe_plugins.classification.data import ClassificationDataset, load_splits

    samples, classes, _, _ = load_splits(loaded.config.load, 0)
    bundle = DataBundle(info={"class_names": classes}, train=ClassificationDataset(samples["train"][:n_images]))
    task.augment(bundle)
    return task, loaded, bundle


class StepClock:
    """A collate function that stamps wall and CPU time as each batch is made.

    Both training loops get one, so their steps are timed the same way: from the first batch to
    the last, n - 1 whole steps (batch loading included), without set-up or the final step.
    """

    def __init__(self) -> None:
        from torch.utils.data import default_collate

        self.collate = default_collate
        self.stamps: list[tuple[float, float]] = []

    def __call__(self, samples: list[Any]) -> Any:
        self.stamps.append((time.perf_counter(), time.process_time()))
        return self.collate(samples)

    def rates(self) -> tuple[float, float]:
        """(steps per wall second, steps per CPU second of this process)."""
        (w0, c0), (w1, c1) = self.stamps[0], self.stamps[-1]
        n = len(self.stamps) - 1
        return n / max(w1 - w0, 1e-9), n / max(c1 - c0, 1e-9)


def trainer_steps_per_second(bench: Bench, steps: int, batch_size: int, seed: int) -> tuple[float, float]:
    """(wall, CPU) steps/s of ``visionpipe.engine.trainer.Trainer`` (the loop every pipeline uses)."""
    import torch

    from visionpipe.engine.trainer import Trainer
    from visionpipe.manager import get_manager
    from visionpipe.pipeline import RunContext

    task, loaded, bundle = _train_setup(bench, steps * batch_size)
    run_dir = bench.root / "trainer-bench"
    shutil.rmtree(run_dir, ignore_errors=True)
    ctx = RunContext(loaded, task, get_manager(), run_dir, torch.device("cpu"))
    ctx.data = bundle
    task.ctx = ctx
    torch.manual_seed(seed)
    model = task.build_model(bundle.info)
    cfg = loaded.config.train.model_copy(update={"epochs": 1, "batch_size": batch_size, "tensorboard": False,
                                                 "num_workers": 0, "label_smoothing": 0.0,
                                                 "scheduler": loaded.config.train.scheduler.model_copy(
                                                     update={"warmup_epochs": 0.0})})
    clock = StepClock()
    Trainer(task, model, ctx, cfg).fit(bundle.train, None, clock)
    return clock.rates()


def textbook_steps_per_second(bench: Bench, steps: int, batch_size: int, seed: int) -> tuple[float, float]:
    """(wall, CPU) steps/s of the textbook loop: zero_grad / forward / loss / backward / step, same model and data."""
    import torch
    from torch.nn import functional as F
    from torch.utils.data import DataLoader

    task, loaded, bundle = _train_setup(bench, steps * batch_size)
    torch.manual_seed(seed)
    model = task.build_model(bundle.info)
    opt_cfg = loaded.config.train.optimizer
    opt = torch.optim.AdamW(model.parameters(), lr=opt_cfg.lr, betas=opt_cfg.betas, weight_decay=opt_cfg.weight_decay)
    clock = StepClock()
    loader = DataLoader(bundle.train, batch_size=batch_size, shuffle=True, num_workers=0, collate_fn=clock)
    model.train()
    for x, y in loader:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return clock.rates()


# ---------------------------------------------------------------------------------------- memory


def _rss_mb(pid: int) -> float | None:
    """Current resident memory of ``pid`` from /proc (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def peak_rss_mb(args: list[str], cwd: Path, watch: Path) -> dict[str, float]:
    """Peak resident memory (MB) of ``python -m visionpipe ARGS`` as a child process, plus its RSS over time.

    ``peak`` is the kernel's high-water mark for the child (wait4's ru_maxrss). The RSS is also
    sampled from /proc/PID/status every 20 ms: ``rss_first_batch`` when ``watch`` (the
    predictions file) first has data, and ``rss_at_end``, to show whether memory grows while
    images stream through.
    """
    import threading

    env = {**os.environ, "VISIONPIPE_PROGRESS": "0"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "visionpipe", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    samples: list[tuple[bool, float]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            mb = _rss_mb(proc.pid)
            if mb is not None:
                samples.append((watch.is_file() and watch.stat().st_size > 0, mb))
            stop.wait(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    assert proc.stderr is not None
    err = proc.stderr.read()
    stop.set()
    th.join()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS (ru_maxrss, KiB on Linux)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"visionpipe {' '.join(args)} exited {proc.returncode}: {err.decode()[-2000:]}")
    streaming = [mb for started, mb in samples if started]
    return {"peak_rss_mb": round(usage.ru_maxrss / 1024.0, 1),
            "rss_first_batch_mb": round(streaming[0], 1) if streaming else None,
            "rss_at_end_mb": round(streaming[-1], 1) if streaming else None,
            "seconds": round(seconds, 1), "samples": len(samples)}
