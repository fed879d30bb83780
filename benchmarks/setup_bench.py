"""Benchmark fixtures: the built-in shapes data, one trained classifier (fp32 + int8), image folders."""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("bench")
GENERATED_SIZE = 64  # the shapes' side in pixels, and the benchmark model's input size

PIPELINE = """\
task: classification
name: bench
seed: 0
device: cpu
output: {root}/runs
load:
  format: imagefolder
  root: {root}/shapes
  train: train
  val: val
  test: test
  generate: {{per_class: {per_class}, image_size: {size}}}
augment:
  image_size: [{size}, {size}]
  mean: [0.5, 0.5, 0.5]
  std: [0.25, 0.25, 0.25]
  train:
    - {{name: HorizontalFlip, p: 0.5}}
model:
  name: resnet18
train:
  epochs: {epochs}
  batch_size: 32
  optimizer: {{name: adamw, lr: 0.002}}
  scheduler: {{name: cosine, warmup_epochs: 0.3}}
  label_smoothing: 0.05
  tensorboard: false
evaluate:
  split: test
export:
  opset: 17
stages: [load, augment, model, train, evaluate, export]
"""


@dataclass
class Bench:
    """Everything the figures share: one model, its files and its data."""

    root: Path
    run_dir: Path
    onnx: Path
    int8: Path
    checkpoint: Path
    pipeline: Path
    metadata: dict[str, Any]
    quant_report: dict[str, Any]
    test_top1: float | None
    setup_seconds: float


def machine() -> dict[str, Any]:
    """The CPU and library versions the numbers were measured with."""
    import onnxruntime
    import torch

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": cores, "load_avg_1min_at_start": load, "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "platform": platform.platform()}


def prepare(root: Path, quick: bool, fresh: bool = False) -> Bench:
    """Generate data, train briefly, export fp32 and int8 (cached in ``root`` between runs)."""
    from visionpipe.export.onnx import read_metadata
    from visionpipe.pipeline import run_pipeline

    t0 = time.perf_counter()
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    per_class, epochs = (40, 1) if quick else (600, 10)  # as pipelines/classify.yaml: ~0.98 top-1
    tag = f"pc{per_class}-ep{epochs}-bs32"
    pipeline = root / f"bench-{tag}.yaml"
    pipeline.write_text(PIPELINE.format(root=root, per_class=per_class, epochs=epochs, size=GENERATED_SIZE))
    run_dir = root / "runs" / tag
    done = run_dir / "manifest.json"
    if fresh or not (done.is_file() and json.loads(done.read_text()).get("status") == "finished"):
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        log.info("training the benchmark model (%s) in %s", tag, run_dir)
        run_pipeline(str(pipeline), [], run_dir=str(run_dir))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    onnx_path, int8 = run_dir / "model.onnx", run_dir / "model.int8.onnx"
    report_file = run_dir / "model.int8.json"
    manifest = json.loads(done.read_text())
    if not _export_is_current(run_dir / "model.export.json", manifest.get("export", {})):
        log.info("re-exporting %s: it was written by an older visionpipe export", onnx_path)
        _export(run_dir / "checkpoints" / "best.pt", onnx_path, None)
        report_file.unlink(missing_ok=True)  # and quantize the new model again
    if fresh or not report_file.is_file():
        report = quantize(run_dir, onnx_path, int8)
        from visionpipe.io import write_json

        write_json(report_file, report)
    return Bench(root, run_dir, onnx_path, int8, run_dir / "checkpoints" / "best.pt", pipeline,
                 read_metadata(onnx_path), json.loads(report_file.read_text()), metrics.get("test/top1"),
                 time.perf_counter() - t0)


def _export_is_current(report_file: Path, report: dict[str, Any]) -> bool:
    """Whether a cached model was exported by this code's export (which reports ``convs_as_matmul``)."""
    if report_file.is_file():
        report = json.loads(report_file.read_text())
    return "convs_as_matmul" in report


def _export(checkpoint: Path, onnx_path: Path, size: int | None) -> None:
    """Export ``checkpoint`` to ``onnx_path`` (at ``size`` x ``size`` when given); the report beside it."""
    from visionpipe.export.checkpoint_model import task_and_model_from_checkpoint
    from visionpipe.export.onnx import export_onnx
    from visionpipe.io import write_json

    task, model, state = task_and_model_from_checkpoint(checkpoint)
    if size is not None:
        task.cfg.augment.image_size = [size, size]
    report = export_onnx(task.export_spec(model, None, state.get("info", {}), 0), onnx_path, opset=17)
    write_json(onnx_path.with_suffix(".export.json"), report)


def eval_samples(run_dir: Path) -> tuple[list[str], list[int]]:
    """(paths, labels) of the val and test splits: the int8 accuracy comparison's images."""
    from visionpipe.export.onnx import read_metadata

    names = read_metadata(run_dir / "model.onnx")["class_names"]
    cfg_root = Path(_load_root(run_dir))
    paths, labels = [], []
    for split in ("val", "test"):
        for ci, c in enumerate(names):
            for p in sorted((cfg_root / split / c).glob("*.png")):
                paths.append(str(p))
                labels.append(ci)
    return paths, labels


def _load_root(run_dir: Path) -> str:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())["load"]["root"]


def train_paths(run_dir: Path) -> list[str]:
    """Training images (calibration data for static int8)."""
    return sorted(str(p) for p in (Path(_load_root(run_dir)) / "train").rglob("*.png"))


def quantize(run_dir: Path, fp32: Path, int8: Path) -> dict[str, Any]:
    """Static int8 with 256 training images; accuracy vs fp32 on val + test."""
    from visionpipe.export.onnx import read_metadata
    from visionpipe.export.quantize import quantize_export
    from visionpipe_plugins.classification.task import ClassificationTask

    predictor = ClassificationTask.predictor(read_metadata(fp32), {})
    paths, labels = eval_samples(run_dir)
    return quantize_export(fp32, int8, "static", predictor, train_paths(run_dir), paths, labels, 256)


IMAGE_FORMATS = ("png", "jpeg")


def at_input_size(bench: Bench, size: int | None) -> Bench:
    """The benchmark with its model exported at ``size`` x ``size`` (cached next to model.onnx).

    ResNet-18 ends in a global average pool, so the trained weights run at any input size; only
    speed is measured at other sizes, so the accuracy there does not matter.
    """
    if size is None or size == GENERATED_SIZE:
        return bench
    from dataclasses import replace

    from visionpipe.export.onnx import read_metadata

    onnx_path = bench.run_dir / f"model-{size}px.onnx"
    if not (onnx_path.is_file() and _export_is_current(onnx_path.with_suffix(".export.json"), {})):
        _export(bench.checkpoint, onnx_path, size)
    return replace(bench, onnx=onnx_path, metadata=read_metadata(onnx_path))


def image_folder(bench: Bench, name: str, count: int, fmt: str = "png") -> Path:
    """A folder of ``count`` images, the generated ones cycled (decoding cost is real).

    ``png``: hard links to the generated PNGs. ``jpeg``: the same pictures re-encoded as JPEG
    (quality 95, 4:2:0), the format of most large image collections. For a bench of
    :func:`at_input_size`, the pictures resized (bilinear) to its model's input size.
    """
    size = bench.metadata["input_size"][0]
    resized = size != GENERATED_SIZE
    folder = bench.root / "images" / (f"{name}-{count}" + ("" if fmt == "png" else f"-{fmt}")
                                      + (f"-{size}px" if resized else ""))
    marker = folder / ".complete"
    if marker.is_file():
        return folder
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"image format {fmt!r}: use one of {IMAGE_FORMATS}")
    import cv2

    sources = train_paths(bench.run_dir) + eval_samples(bench.run_dir)[0]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        sub = folder / f"{i // 1000:03d}"
        sub.mkdir(exist_ok=True)
        src = sources[i % len(sources)]
        dest = sub / f"{i:06d}.{'png' if fmt == 'png' else 'jpg'}"
        if dest.exists():
            continue
        if fmt == "jpeg" or resized:
            img = cv2.imread(src)
            if resized:
                img = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
            if not cv2.imwrite(str(dest), img, [cv2.IMWRITE_JPEG_QUALITY, 95] if fmt == "jpeg" else []):
                raise OSError(f"cannot write {dest}")
            continue
        try:
            os.link(src, dest)
        except OSError:  # another file system: copy
            dest.write_bytes(Path(src).read_bytes())
    marker.write_text(str(count))
    return folder


def preprocessed(bench: Bench, folder: Path) -> np.ndarray:
    """All images of ``folder`` decoded and preprocessed exactly as predict does (N, C, H, W float32)."""
    from visionpipe.images import iter_image_files, read_image
    from visionpipe_plugins.classification.task import ClassificationTask

    pred = ClassificationTask.predictor(bench.metadata, {})
    return np.stack([pred.preprocess(read_image(p))[0]["images"] for p in iter_image_files(folder)])
