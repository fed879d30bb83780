"""Shared fixtures: tiny generated images and a way to run the CLI like a user."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path, env: dict | None = None, check: bool = True,
            timeout: float = 900) -> subprocess.CompletedProcess:
    """Run ``python -m visionpipe ARGS`` in ``cwd`` as a user would; return the finished process."""
    full_env = {**os.environ, "VISIONPIPE_PROGRESS": "0", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "visionpipe", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"visionpipe {' '.join(args)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}")
    return proc


def make_color_folder(root: Path, per_class: int = 8, size: int = 32, seed: int = 0,
                      classes: tuple[str, ...] = ("red", "blue")) -> Path:
    """ImageFolder tree root/{train,val}/<class>/*.png of noisy single-colour images (easy to learn)."""
    import cv2

    rng = np.random.default_rng(seed)
    colors = {"red": (230, 30, 30), "blue": (30, 30, 230), "green": (30, 230, 30)}
    for split, n in (("train", per_class), ("val", max(2, per_class // 2))):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.clip(np.array(colors[c])[None, None] + rng.normal(0, 25, (size, size, 3)), 0, 255)
                cv2.imwrite(str(d / f"{i:03d}.png"), cv2.cvtColor(img.astype(np.uint8), cv2.COLOR_RGB2BGR))
    return root


@pytest.fixture
def color_data(tmp_path: Path) -> Path:
    """A tiny two-class ImageFolder dataset."""
    return make_color_folder(tmp_path / "data")


TINY_CLASSIFY = """\
task: classification
name: tiny
seed: 0
load:
  root: {root}
  train: train
  val: val
augment:
  image_size: [32, 32]
  mean: [0.5, 0.5, 0.5]
  std: [0.25, 0.25, 0.25]
  train:
    - {{name: HorizontalFlip, p: 0.5}}
model:
  name: resnet18
train:
  epochs: {epochs}
  batch_size: 8
  optimizer: {{name: adamw, lr: 0.001}}
  scheduler: {{name: none}}
export:
  opset: 17
"""


@pytest.fixture
def tiny_pipeline(tmp_path: Path, color_data: Path):
    """Write a tiny classification pipeline file; call with epochs=N."""

    def write(epochs: int = 1, extra: str = "") -> Path:
        p = tmp_path / "tiny.yaml"
        p.write_text(TINY_CLASSIFY.format(root=color_data, epochs=epochs) + extra)
        return p

    return write
