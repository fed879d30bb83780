"""Tiny unlabeled image folders and a tiny DCGAN pipeline for the dcgan tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TINY_GAN = """\
task: dcgan
name: tiny
seed: 0
load:
  root: {root}
  reference_images: 24
augment:
  image_size: 16
  train:
    - {{name: HorizontalFlip, p: 0.5}}
model: {{nz: 8, ngf: 8, ndf: 8}}
train:
  epochs: {epochs}
  batch_size: 8
  tensorboard: false
  label_smoothing: 0.1
evaluate: {{fid_samples: 16, grid: 4}}
export: {{file: generator.onnx, parity_samples: 3}}
"""


def make_images(folder: Path, n: int = 24, size: tuple[int, int] = (20, 28), seed: int = 0) -> Path:
    """``n`` small RGB images (a bright square on a dark noisy background), some in a sub-folder."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = rng.integers(0, 60, (*size, 3), dtype=np.uint8)
        y, x = rng.integers(0, size[0] // 2), rng.integers(0, size[1] // 2)
        img[y:y + size[0] // 2, x:x + size[1] // 2] = rng.integers(150, 256, 3, dtype=np.uint8)
        d = folder / ("sub" if i % 3 == 0 else "")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:03d}.png")
    return folder


@pytest.fixture
def gan_images(tmp_path: Path) -> Path:
    """A folder of 24 tiny unlabeled images."""
    return make_images(tmp_path / "imgs")


def write_pipeline(path: Path, root: Path, epochs: int = 1, extra: str = "") -> Path:
    """Write the tiny DCGAN pipeline for ``root``; ``extra`` YAML is appended."""
    path.write_text(TINY_GAN.format(root=root, epochs=epochs) + extra)
    return path
