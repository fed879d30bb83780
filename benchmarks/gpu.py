"""GPU training figures: visionpipe's Trainer against hand-written loops on the same model, data and settings.

Each side trains two epochs over the same number of full batches; the first epoch is warm-up
(cuDNN autotuning, ``torch.compile``, DataLoader workers), the second is timed from a synchronized
start to a synchronized end. visionpipe's side is ``Trainer.fit`` as every pipeline runs it, and
its time is the epoch's own ``train/seconds`` (which ends after the loss is read back, i.e. after
the GPU is done); checkpoints written between epochs are not timed.

``Sizes.smoke()`` shrinks everything (ResNet-18 at 32 px, MobileNet Faster R-CNN at 160 px, two
steps) so that the code paths run on a CPU in CI; those numbers say nothing about a GPU.
"""

from __future__ import annotations

import gc
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Sizes:
    """Models, image sizes, batches and steps of the GPU figures."""

    device: str = "cuda"
    classifier: str = "resnet50"
    image: int = 224
    batch: int = 256
    steps: int = 40
    jpeg_size: tuple[int, int] = (500, 375)  # (width, height): about an average ImageNet photo
    jpeg_unique: int = 2048  # distinct JPEG files; the rest of an epoch are hard links to them
    workers: int = max(1, min(16, (os.cpu_count() or 2) - 1))
    detector: str = "fasterrcnn_resnet50_fpn"
    det_image: int = 800
    det_batch: int = 8
    det_steps: int = 20
    det_boxes: int = 6
    classes: int = 100
    amp: str = "bf16"  # "off" only for smoke runs on CPU, where bf16 is emulated and slow

    @classmethod
    def smoke(cls, device: str) -> Sizes:
        """Tiny sizes that run on CPU in a minute or two: proof that the code paths work, not figures."""
        return cls(device=device, classifier="resnet18", image=32, batch=4, steps=2, jpeg_size=(48, 40),
                   jpeg_unique=8, workers=1, detector="fasterrcnn_mobilenet_v3_large_320_fpn", det_image=160,
                   det_batch=1, det_steps=2, det_boxes=2, classes=2, amp="bf16" if device == "cuda" else "off")


class FixedBatches:
    """``n`` indices whose collate returns slices of one pre-made batch on the device: synthetic data."""

    def __init__(self, n: int, make: Callable[[int], Any]) -> None:
        self.n, self.make = n, make

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, idx: list[int]) -> Any:
        """The pre-made batch, cut to ``len(idx)``."""
        return self.make(len(idx))


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------- data


def synthetic_classification(sz: Sizes) -> FixedBatches:
    """ImageNet-shaped float batches (channels_last) and labels, already on the device."""
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(sz.batch, 3, sz.image, sz.image, generator=g).to(sz.device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, sz.classes, (sz.batch,), generator=g).to(sz.device)
    return FixedBatches(sz.batch * sz.steps, lambda n: (x[:n], y[:n]))


def synthetic_detection(sz: Sizes) -> FixedBatches:
    """Square images in [0, 1] with a few random boxes each, already on the device."""
    import torch

    g = torch.Generator().manual_seed(0)
    s = sz.det_image
    images = [torch.rand(3, s, s, generator=g).to(sz.device) for _ in range(sz.det_batch)]
    targets = []
    for _ in range(sz.det_batch):
        xy = torch.rand(sz.det_boxes, 2, generator=g) * s * 0.7
        wh = 16 + torch.rand(sz.det_boxes, 2, generator=g) * s * 0.3
        targets.append({"boxes": torch.cat([xy, (xy + wh).clamp(max=s)], 1).to(sz.device),
                        "labels": torch.randint(1, sz.classes + 1, (sz.det_boxes,), generator=g).to(sz.device)})
    return FixedBatches(sz.det_batch * sz.det_steps, lambda n: (images[:n], targets[:n]))


def jpeg_folder(root: Path, sz: Sizes) -> Path:
    """An ImageFolder of ``batch * steps`` JPEG photos-like files (smooth colour fields + noise), cached."""
    from PIL import Image

    n = sz.batch * sz.steps
    folder = root / f"jpeg-{sz.jpeg_size[0]}x{sz.jpeg_size[1]}-{n}"
    if (folder / ".complete").is_file():
        return folder
    rng = np.random.default_rng(0)
    w, h = sz.jpeg_size
    unique: list[Path] = []
    for i in range(min(n, sz.jpeg_unique)):
        coarse = rng.integers(0, 256, (max(2, h // 32), max(2, w // 32), 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), dtype=np.int16)
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        p = folder / "train" / f"c{i % sz.classes:03d}" / f"u{i:06d}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(p, quality=90)
        unique.append(p)
    for i in range(len(unique), n):
        src = unique[i % len(unique)]
        dest = src.parent / f"l{i:06d}.jpg"
        if not dest.exists():
            try:
                os.link(src, dest)
            except OSError:
                shutil.copyfile(src, dest)
    (folder / ".complete").write_text(str(n))
    return folder


# ---------------------------------------------------------------------------------------- visionpipe side


def _trainer_run(root: Path, name: str, config: dict[str, Any],
                 data: Callable[[Any], tuple[Any, Any, dict[str, Any]]]) -> float:
    """Images/s of epoch 2 of ``Trainer.fit`` for a pipeline given as plain data.

    ``data(task)`` returns (training set, collate function, data info such as class names)."""
    import torch

    from visionpipe.config import load_config
    from visionpipe.engine.trainer import Trainer
    from visionpipe.manager import get_manager
    from visionpipe.pipeline import RunContext
    from visionpipe.task import DataBundle

    manager = get_manager()
    loaded = load_config(None, data=config, manager=manager)
    task = manager.task(loaded.config.task)(loaded.config, None)
    run_dir = root / "gpu-runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    device = torch.device(config["device"])
    ctx = RunContext(loaded, task, manager, run_dir, device)
    task.ctx = ctx
    train_ds, collate, info = data(task)
    ctx.data = DataBundle(train=train_ds, info=info, collate_fn=collate)
    torch.manual_seed(0)
    model = task.build_model(info, pretrained=False)
    trainer = Trainer(task, model, ctx, loaded.config.train)
    trainer.fit(train_ds, None, collate)
    seconds = trainer.history[-1]["train/seconds"]
    images = len(train_ds)
    del trainer, model
    _free()
    return images / seconds


def _train_block(sz: Sizes, batch: int, **extra: Any) -> dict[str, Any]:
    return {"epochs": 2, "batch_size": batch, "amp": sz.amp, "tensorboard": False, "num_workers": 0,
            "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0001},
            "scheduler": {"name": "none"}, "log_every": 50, **extra}


def visionpipe_classification(root: Path, sz: Sizes, compiled: bool) -> float:
    """``Trainer`` images/s, bf16 + channels_last, on synthetic batches already on the device."""
    cfg = {"task": "classification", "name": "gpu-synthetic", "device": sz.device,
           "model": {"name": sz.classifier},
           "train": _train_block(sz, sz.batch, channels_last=True, compile=compiled, pin_memory=False)}
    info = {"class_names": [f"c{i}" for i in range(sz.classes)]}
    fixed = synthetic_classification(sz)
    return _trainer_run(root, f"cls-{'compiled' if compiled else 'eager'}", cfg,
                        lambda task: (fixed, fixed.collate, info))


def visionpipe_jpeg(root: Path, sz: Sizes, folder: Path) -> float:
    """``Trainer`` images/s reading JPEG files: ``decode: device``, random resized crop + flip, workers."""
    cfg = {"task": "classification", "name": "gpu-jpeg", "device": sz.device,
           "load": {"root": str(folder), "train": "train", "val": None, "check_images": False},
           "augment": {"image_size": [sz.image, sz.image],
                       "train": [{"name": "RandomResizedCrop", "size": [sz.image, sz.image]},
                                 {"name": "HorizontalFlip", "p": 0.5}]},
           "model": {"name": sz.classifier},
           "train": _train_block(sz, sz.batch, channels_last=True, decode="device", num_workers=sz.workers,
                                 persistent_workers=True, prefetch_factor=4)}

    def data(task: Any) -> tuple[Any, Any, dict[str, Any]]:
        bundle = task.build_data()
        return bundle.train, bundle.collate_fn, bundle.info

    return _trainer_run(root, "cls-jpeg", cfg, data)


def visionpipe_detection(root: Path, sz: Sizes) -> float:
    """``Trainer`` images/s of Faster R-CNN, bf16, on synthetic images and boxes already on the device."""
    cfg = {"task": "detection", "name": "gpu-detection", "device": sz.device,
           "model": {"name": sz.detector, "min_size": sz.det_image, "max_size": max(1333, sz.det_image)},
           "train": _train_block(sz, sz.det_batch, pin_memory=False)}
    info = {"class_names": [f"c{i}" for i in range(sz.classes)]}
    fixed = synthetic_detection(sz)
    return _trainer_run(root, "det", cfg, lambda task: (fixed, fixed.collate, info))


# ---------------------------------------------------------------------------------------- hand-written side


def _hand_loop(sz: Sizes, model: Any, fixed: FixedBatches, batch: int, step: Callable[[Any, Any], Any]) -> float:
    """Two epochs of a plain loop (zero_grad, bf16 forward + loss, backward, SGD step); images/s of the second."""
    import torch
    from torch.utils.data import DataLoader

    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=0.0001)
    loader = DataLoader(fixed, batch_size=batch, shuffle=True, collate_fn=fixed.collate)
    model.train()
    device_type = sz.device.split(":")[0]
    seconds = 0.0
    for _ in range(2):  # epoch 1 warms up, epoch 2 is timed
        _sync(sz.device)
        t0 = time.perf_counter()
        for batch_data in loader:
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=sz.amp == "bf16"):
                loss = step(model, batch_data)
            loss.backward()
            opt.step()
        _sync(sz.device)
        seconds = time.perf_counter() - t0
    images = len(fixed)
    del opt, loader
    _free()
    return images / seconds


def hand_classification(sz: Sizes, compiled: bool) -> float:
    """The reference loop: torchvision model, bf16 autocast, channels_last, SGD; optionally torch.compile."""
    import torch
    import torchvision
    from torch.nn import functional as F

    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = getattr(torchvision.models, sz.classifier)(num_classes=sz.classes).to(sz.device)
    model = model.to(memory_format=torch.channels_last)
    fwd = torch.compile(model) if compiled else model

    def step(_: Any, batch: Any) -> Any:
        x, y = batch
        return F.cross_entropy(fwd(x), y)

    return _hand_loop(sz, model, synthetic_classification(sz), sz.batch, step)


def hand_detection(sz: Sizes) -> float:
    """The reference loop for torchvision's Faster R-CNN: sum of its four losses, bf16 autocast, SGD."""
    import torch
    import torchvision

    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    build = getattr(torchvision.models.detection, sz.detector)
    model = build(weights=None, weights_backbone=None, num_classes=sz.classes + 1, min_size=sz.det_image,
                  max_size=max(1333, sz.det_image)).to(sz.device)

    def step(m: Any, batch: Any) -> Any:
        images, targets = batch
        return sum(v.float() for v in m(images, targets).values())

    return _hand_loop(sz, model, synthetic_detection(sz), sz.det_batch, step)


def same_detector_size(sz: Sizes) -> tuple[int, int]:
    """Parameter counts of visionpipe's and torchvision's detector for ``sz`` (they must be equal)."""
    import torchvision

    from visionpipe.config import load_config
    from visionpipe.manager import get_manager

    manager = get_manager()
    loaded = load_config(None, data={"task": "detection", "model": {"name": sz.detector, "min_size": sz.det_image}},
                         manager=manager)
    ours = manager.task("detection")(loaded.config, None).build_model({"class_names": ["x"] * sz.classes})
    ref = getattr(torchvision.models.detection, sz.detector)(weights=None, weights_backbone=None,
                                                             num_classes=sz.classes + 1)
    return sum(p.numel() for p in ours.parameters()), sum(p.numel() for p in ref.parameters())

