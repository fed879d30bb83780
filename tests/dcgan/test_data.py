"""Unlabeled image folders: recursive scan, checks, the Fréchet reference set, [-1, 1] tensors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.dcgan.conftest import make_images
from visionpipe.errors import DataError
from visionpipe_plugins.dcgan.config import LoadConfig
from visionpipe_plugins.dcgan.data import ImageDataset, build_transforms, load_images


def test_reference_set_is_capped_and_spread(gan_images):
    train, ref, bad = load_images(LoadConfig(root=str(gan_images), reference_images=6))
    assert len(train) == 24 and any("/sub/" in p for p in train) and not bad  # recursive
    assert len(ref) == 6 and set(ref) <= set(train) and ref[0] == train[0] and ref[-1] == train[-1]


def test_separate_reference_folder_and_bad_files(tmp_path, gan_images):
    val = make_images(tmp_path / "val", n=5, seed=1)
    (val / "oops.jpg").write_bytes(b"")
    train, ref, bad = load_images(LoadConfig(root=str(gan_images), val=str(val)))
    assert len(train) == 24 and len(ref) == 5 and all(p.startswith(str(val)) for p in ref)
    assert [b.path for b in bad] == [str(val / "oops.jpg")] and bad[0].reason
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match="load.val: .* contains no images"):
        load_images(LoadConfig(root=str(gan_images), val=str(tmp_path / "none")))


def test_any_size_and_mode_becomes_a_square_in_minus_one_to_one(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (50, 90, 3), dtype=np.uint8)).save(tmp_path / "wide.png")
    Image.fromarray(rng.integers(0, 256, (70, 30), dtype=np.uint8)).save(tmp_path / "tall_gray.png")
    Image.fromarray(rng.integers(0, 256, (40, 40, 4), dtype=np.uint8)).save(tmp_path / "rgba.png")
    paths = sorted(str(p) for p in tmp_path.glob("*.png"))
    for channels in (3, 1):
        ds = ImageDataset(paths, build_transforms([], 16, "center_crop", channels), channels=channels)
        for i in range(len(ds)):
            x = ds[i]
            assert x.shape == (channels, 16, 16) and -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    white = tmp_path / "white.png"
    Image.fromarray(np.full((20, 20, 3), 255, np.uint8)).save(white)
    x = ImageDataset([str(white)], build_transforms([], 16, "stretch", 3))[0]
    assert float(x.min()) == pytest.approx(1.0)
