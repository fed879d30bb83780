"""A tiny trained classifier (checkpoint + ONNX) and image folders for the inference tests."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import TINY_CLASSIFY, make_color_folder


@dataclass
class TinyModel:
    """A finished one-epoch run: its folder, files and data."""

    run: Path
    onnx: Path
    checkpoint: Path
    data: Path
    pipeline: Path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """resnet18 on 32x32 red/blue images, trained one epoch and exported (built once per session)."""
    from visionpipe.pipeline import run_pipeline

    os.environ.setdefault("VISIONPIPE_PROGRESS", "0")
    tmp = tmp_path_factory.mktemp("infer-model")
    data = make_color_folder(tmp / "data", per_class=6)
    p = tmp / "tiny.yaml"
    p.write_text(TINY_CLASSIFY.format(root=data, epochs=1)
                 + f"output: {tmp / 'runs'}\nstages: [load, augment, model, train, export]\n")
    ctx = run_pipeline(str(p), ["train.tensorboard=false"])
    return TinyModel(ctx.run_dir, ctx.run_dir / "model.onnx", ctx.run_dir / "checkpoints" / "best.pt", data, p)


def write_images(folder: Path, n: int, seed: int = 0, size: int = 24) -> list[Path]:
    """``n`` small random RGB PNGs under ``folder`` (two sub-folders), returned in sorted order."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / ("a" if i % 2 == 0 else "b") / f"img{i:04d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return sorted(paths)


def write_bad_files(folder: Path) -> dict[str, Path]:
    """A corrupt, a truncated, an empty and a too-small image, plus a text file with an image name."""
    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "good_source.png"
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(good)
    raw = good.read_bytes()
    good.unlink()
    bad = {"truncated": folder / "truncated.png", "empty": folder / "empty.jpg", "text": folder / "notes.png",
           "tiny": folder / "tiny.png", "garbage": folder / "garbage.jpg"}
    bad["truncated"].write_bytes(raw[: len(raw) // 3])
    bad["empty"].write_bytes(b"")
    bad["text"].write_text("this is not an image\n")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(bad["tiny"])
    bad["garbage"].write_bytes(bytes(range(256)) * 8)
    return bad
