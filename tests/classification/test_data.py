"""ImageFolder trees as users have them: nested folders, hidden and non-image files, a one-image class."""

from __future__ import annotations

import cv2
import numpy as np

from visionpipe.images import iter_image_files
from visionpipe_plugins.classification.config import LoadConfig
from visionpipe_plugins.classification.data import load_splits


def _png(path, value=120):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((16, 16, 3), value, np.uint8))


def test_training_and_predict_find_the_same_files_and_leave_hidden_ones_out(tmp_path, caplog):
    train = tmp_path / "train"
    for i in range(4):
        _png(train / "cat" / f"{i}.png")
    _png(train / "cat" / "nested" / "deep" / "n.png")
    _png(train / "dog" / "only.png")
    _png(train / "cat" / ".ipynb_checkpoints" / "0-checkpoint.png")  # a copy of 0.png
    (train / "cat" / "._1.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    (train / "cat" / "notes.txt").write_text("not an image")
    _png(train / ".trash" / "x.png")  # a hidden folder is no class
    samples, classes, bad, _ = load_splits(LoadConfig(root=str(tmp_path), val=None, val_split=0.5), seed=0)
    assert classes == ["cat", "dog"] and bad == []
    found = sorted(p for split in samples.values() for p, _ in split)
    assert found == sorted(str(p) for p in iter_image_files(train))  # what `visionpipe predict train` reads
    assert len(found) == 6 and not any("/." in p for p in found)
    assert [p for p, _ in samples["train"] if "dog" in p] == [str(train / "dog" / "only.png")]  # kept for training
    assert len(samples["val"]) == 2  # half of cat's five, none of dog's single image
    assert "load.val: no image of class 'dog' in this split (its metrics leave it out)" in caplog.text


def test_class_folders_right_under_root_with_a_val_fraction(tmp_path):
    import pytest

    from visionpipe.errors import DataError

    for c in ("cat", "dog"):
        for i in range(4):
            _png(tmp_path / c / f"{i}.png")
    with pytest.raises(DataError, match=r"^load.train: .*/train: split folder not found \(class folders right under "
                                        r"root, without split folders: set train: '.' and val_split: 0.2\)"):
        load_splits(LoadConfig(root=str(tmp_path)), seed=0)
    cfg = LoadConfig(root=str(tmp_path), train=".", val_split=0.25)  # no `val: null` needed with val_split
    assert cfg.val is None
    samples, classes, _, _ = load_splits(cfg, seed=0)
    assert classes == ["cat", "dog"] and len(samples["train"]) == 6 and len(samples["val"]) == 2
