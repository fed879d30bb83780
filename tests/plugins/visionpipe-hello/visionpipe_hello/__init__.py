"""A third-party visionpipe plugin: predict the mean brightness of an image (regression).

It exists to prove (and document) that an outside package adds a task through the
``visionpipe`` entry-point group with no change to visionpipe itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn
from torch.utils.data import Dataset

from visionpipe import hookimpl
from visionpipe.config import Block, PipelineConfig
from visionpipe.images import check_images, iter_image_files, read_image
from visionpipe.task import DataBundle, ExportSpec, Predictor, Task


class HelloLoad(Block):
    """Where the images are; generated when missing."""

    root: str = Field(description="folder of images (recursive)")
    generate: int = Field(0, ge=0, description="write this many random images to root when it is missing")
    size: int = Field(16, ge=8, description="image side")


class HelloModel(Block):
    """A tiny conv net."""

    width: int = Field(8, gt=0)
    nan_at_step: int | None = Field(None, description="testing aid: make the loss NaN from this training step")


class HelloConfig(PipelineConfig):
    """Pipeline file of the hello task."""

    task: Literal["hello"] = "hello"
    load: HelloLoad | None = None
    model: HelloModel | None = None


class Images(Dataset):
    """(image CHW in 0..1, mean brightness) pairs."""

    def __init__(self, paths: list[str], size: int) -> None:
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(to_input(read_image(self.paths[i]), self.size))  # as the predictor prepares it
        return x, x.mean().reshape(1)


def to_input(image: np.ndarray, size: int) -> np.ndarray:
    """RGB uint8 HWC → float CHW in 0..1 at size x size: one preparation for training and predict."""
    import cv2

    return cv2.resize(image, (size, size)).transpose(2, 0, 1).astype(np.float32) / 255.0


class Net(nn.Module):
    """conv → pool → linear."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class HelloTask(Task):
    """Regress mean image brightness."""

    name = "hello"
    Config = HelloConfig
    description = "mean-brightness regression (example third-party plugin)"
    monitor = "val/mae"
    monitor_mode = "min"
    models = {"tiny": Net}

    def build_data(self) -> DataBundle:
        cfg = self.cfg.load
        root = Path(cfg.root)
        if cfg.generate and not root.exists():
            import cv2
            root.mkdir(parents=True)
            rng = np.random.default_rng(self.cfg.seed)
            for i in range(cfg.generate):
                img = np.full((cfg.size, cfg.size, 3), rng.integers(0, 256), np.uint8)
                cv2.imwrite(str(root / f"{i:04d}.png"), img)
        good, bad = check_images(str(p) for p in iter_image_files(root))
        cut = max(1, len(good) // 4)
        return DataBundle(train=Images(good[cut:], cfg.size), val=Images(good[:cut], cfg.size),
                          info={"size": cfg.size}, skipped=bad)

    def build_model(self, info: dict[str, Any], *, pretrained: bool = True) -> nn.Module:
        self.steps = 0
        return Net((self.cfg.model or HelloModel()).width)

    def training_step(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        x, y = batch
        loss = nn.functional.mse_loss(model(x), y)
        self.steps += 1
        nan_at = (self.cfg.model or HelloModel()).nan_at_step
        if nan_at is not None and self.steps >= nan_at:
            loss = loss * float("nan")
        return {"loss": loss}

    def evaluate(self, model: nn.Module, loader: Any, *, device: torch.device, out_dir: Path | None = None,
                 epoch: int | None = None) -> dict[str, Any]:
        err, n = 0.0, 0
        for x, y in loader:
            err += float((model(x.to(device)) - y.to(device)).abs().sum())
            n += len(y)
        return {"mae": err / max(n, 1)}

    def export_spec(self, model: nn.Module, data: DataBundle | None, info: dict[str, Any], num_parity: int) -> ExportSpec:
        s = info["size"]
        x = torch.rand(2, 3, s, s)
        return ExportSpec(model, (x,), ["images"], ["brightness"], {"images": {0: "batch"}, "brightness": {0: "batch"}},
                          {"task": self.name, "size": s}, parity_inputs=[(x,)])

    @classmethod
    def predictor(cls, metadata: dict[str, Any], options: dict[str, Any]) -> Predictor:
        return HelloPredictor(metadata, options)


class HelloPredictor(Predictor):
    """Crop, scale to 0..1, report the predicted brightness."""

    def preprocess(self, image: np.ndarray) -> tuple[dict[str, np.ndarray], Any]:
        return {"images": to_input(image, self.metadata["size"])}, None

    def postprocess(self, outputs: list[np.ndarray], state: Any) -> dict[str, Any]:
        return {"brightness": float(outputs[0][0])}


@hookimpl
def visionpipe_register_tasks(register):
    """Register the hello task."""
    register(HelloTask)
