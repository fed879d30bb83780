"""Segmentation data: every mask format, ignore_index, clear errors for bad pairs, masks through augmentation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.segmentation.conftest import CLASSES, make_coco, make_mask_folder, make_pair, save_mask
from visionpipe.config import load_config
from visionpipe.errors import ConfigError, DataError
from visionpipe_plugins.segmentation.coco import read_coco, render_mask
from visionpipe_plugins.segmentation.config import LoadConfig
from visionpipe_plugins.segmentation.data import load_splits
from visionpipe_plugins.segmentation.masks import read_mask
from visionpipe_plugins.segmentation.task import SegmentationTask


def _load(root: Path, **kw) -> tuple:
    return load_splits(LoadConfig(root=str(root), **kw))


def _task(root: Path, augment: dict | None = None, **load) -> SegmentationTask:
    data = {"task": "segmentation", "load": {"root": str(root), **load},
            "augment": augment or {"image_size": [24, 32], "mean": [0, 0, 0], "std": [1, 1, 1]}}
    return SegmentationTask(load_config("x.yaml", data=data).config)


def test_index_png_masks(index_data):
    samples, info, bad, _ = _load(index_data, classes=CLASSES)
    assert len(samples["train"]) == 6 and len(samples["val"]) == 3 and not bad
    assert info["class_names"] == CLASSES and info["ignore_index"] == 255
    m = read_mask(samples["train"][0].mask)
    assert m.dtype == np.uint8 and set(np.unique(m)) == {0, 1, 2}


def test_palette_png_masks_keep_indices_and_palette(palette_data):
    samples, info, _, _ = _load(palette_data, classes=CLASSES)
    path = samples["train"][0].mask
    assert Image.open(path).mode == "P"
    m = read_mask(path)
    assert m.ndim == 2 and set(np.unique(m)) == {0, 1, 2}, "indices, not colours"
    assert info["palette"] == [[0, 0, 0], [128, 0, 0], [0, 128, 0]], "palette taken from the masks"


def test_dataset_returns_image_and_mask_aligned(index_data):
    task = _task(index_data, classes=CLASSES)
    data = task.build_data()
    x, y = data.train[0]
    assert x.shape == (3, 24, 32) and y.shape == (24, 32) and y.dtype == torch.long
    red = (x[0] > 200 / 255) & (x[2] < 60 / 255)
    assert bool((y[red] == 1).all()) and bool((y == 1).sum() == red.sum())


def test_voc_style_list_files_and_classes_file(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "VOC"
    for i in range(4):
        img, mask = make_pair(rng)
        (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / "JPEGImages" / f"2007_{i:06d}.jpg", quality=95)
        mask[0, :] = 255  # VOC marks object borders with 255
        save_mask(root / "SegmentationClass" / f"2007_{i:06d}.png", mask, palette=True)
    (root / "ImageSets").mkdir()
    (root / "ImageSets" / "train.txt").write_text("2007_000000\n2007_000001\n2007_000002\n")
    (root / "ImageSets" / "val.txt").write_text("2007_000003\n")
    (root / "labels.txt").write_text("# VOC subset\nbackground\nred\nblue\n")
    task = _task(root, train="ImageSets/train.txt", val="ImageSets/val.txt", image_dir="JPEGImages",
                 mask_dir="SegmentationClass", classes_file="labels.txt")
    data = task.build_data()
    assert len(data.train) == 3 and len(data.val) == 1
    assert data.info["class_names"] == ["background", "red", "blue"]
    _, y = data.train[0]
    assert int((y[0] == 255).sum()) == 32, "ignore_index pixels survive loading"
    assert any(str(p).endswith("train.txt") for p in data.inputs)


def test_coco_polygons_and_rle_render_exactly(tmp_path):
    ann, expected = make_coco(tmp_path / "coco")
    images, cats = read_coco(ann, tmp_path / "coco" / "images")
    assert [c["name"] for c in cats] == ["red", "blue"]  # sorted by category id
    for im, exp in zip(images, expected, strict=True):
        np.testing.assert_array_equal(render_mask(im, 255), exp)


def test_coco_dataset_end_to_end(tmp_path):
    ann, expected = make_coco(tmp_path / "coco")
    task = _task(tmp_path / "coco", format="coco", train="ann.json", val="ann.json", image_dir="images")
    data = task.build_data()
    assert data.info["class_names"] == ["background", "red", "blue"]
    _, y = data.train[1]
    np.testing.assert_array_equal(y.numpy(), expected[1])


def test_ignore_index_is_left_out_of_loss_and_metrics(index_data):
    from visionpipe_plugins.segmentation.metrics import scores, update_confusion

    task = _task(index_data, classes=CLASSES)
    target = torch.tensor([[[0, 1, 255, 255]]])
    logits = torch.zeros(1, 3, 1, 4)
    logits[0, 0, 0, 0] = logits[0, 1, 0, 1] = 5.0  # right on the two labelled pixels
    logits[0, 2, 0, 2:] = 5.0  # "wrong" only where ignored

    class Identity(torch.nn.Module):
        def forward(self, x):
            return {"out": x}

    loss = task.training_step(Identity(), (logits, target))
    valid_only = torch.nn.functional.cross_entropy(logits[..., :2], target[..., :2])
    assert torch.isclose(loss["ce"], valid_only) and float(loss["pixel_acc"]) == 1.0
    cm = torch.zeros(3, 3, dtype=torch.long)
    update_confusion(cm, logits.argmax(1), target, 255)
    assert int(cm.sum()) == 2 and scores(cm.numpy(), CLASSES)["mIoU"] == 1.0


def test_ignore_index_must_not_be_a_class(index_data):
    with pytest.raises(ConfigError, match="ignore_index"):
        _load(index_data, classes=CLASSES, ignore_index=1)


def test_size_mismatch_names_the_file(index_data):
    bad = index_data / "train" / "masks" / "002.png"
    save_mask(bad, np.zeros((20, 32), np.uint8), palette=False)
    with pytest.raises(DataError, match=r"002\.png.*32x24.*32x20"):
        _load(index_data, classes=CLASSES)
    # without the up-front check, the dataset raises the same error when it reaches the sample
    task = _task(index_data, classes=CLASSES, check_images=False)
    data = task.build_data()
    with pytest.raises(DataError, match=r"train/images/002\.png.*must match"):
        data.train[2]


def test_missing_mask_names_image_and_expected_mask(index_data):
    (index_data / "val" / "masks" / "001.png").unlink()
    with pytest.raises(DataError, match=r"val/images/001\.png: no mask.*val/masks/001\.png"):
        _load(index_data, classes=CLASSES)


def test_out_of_range_labels_and_colour_masks_are_errors(index_data):
    m = read_mask(index_data / "train" / "masks" / "000.png")
    m[0, 0] = 7
    save_mask(index_data / "train" / "masks" / "000.png", m, palette=False)
    # the load check decodes every mask, so a wrong label stops the run before training, not at evaluate
    with pytest.raises(DataError, match=r"000\.png: mask values \[7\]"):
        _task(index_data, classes=CLASSES).build_data()
    data = _task(index_data, classes=CLASSES, check_images=False).build_data()
    with pytest.raises(DataError, match=r"000\.png: mask values \[7\]"):
        data.train[0]
    Image.new("RGB", (32, 24)).save(index_data / "val" / "masks" / "001.png")
    with pytest.raises(DataError, match=r"001\.png: mask has mode RGB"):
        read_mask(index_data / "val" / "masks" / "001.png")
    m[0, 0] = 0
    save_mask(index_data / "train" / "masks" / "000.png", m, palette=False)
    with pytest.raises(DataError, match=r"val/masks/001\.png: mask has mode RGB"):  # an error, not a skip
        _load(index_data, classes=CLASSES)


def _zero_idat(path: Path) -> None:
    """Overwrite the compressed pixels of a PNG with zeros; the header (and so the size) still reads."""
    data = bytearray(path.read_bytes())
    i = data.index(b"IDAT")
    n = int.from_bytes(data[i - 4:i], "big")
    data[i + 4:i + 4 + n] = bytes(n)
    path.write_bytes(bytes(data))


def test_corrupt_masks_are_skipped_and_reported_at_load(index_data):
    _zero_idat(index_data / "val" / "masks" / "001.png")
    (index_data / "train" / "masks" / "004.png").write_bytes(b"")
    with Image.open(index_data / "val" / "masks" / "001.png") as im:
        assert im.size == (32, 24)  # the header alone looks fine
    samples, _, bad, _ = _load(index_data, classes=CLASSES)
    assert [Path(s.image).name for s in samples["val"]] == ["000.png", "002.png"]
    assert len(samples["train"]) == 5
    reasons = {str(Path(b.path).relative_to(index_data)): b.reason for b in bad}
    assert sorted(reasons) == ["train/masks/004.png", "val/masks/001.png"]
    assert "cannot read mask" in reasons["val/masks/001.png"] and "val/images/001.png" in reasons["val/masks/001.png"]
    # classes inferred from the masks: the unreadable ones are passed over there too
    samples, info, bad, _ = _load(index_data)
    assert info["class_names"] == ["class_0", "class_1", "class_2"] and len(bad) == 2


@pytest.mark.slow
def test_a_corrupt_mask_is_in_data_errors_and_the_run_completes(tmp_path):
    from tests.conftest import run_cli

    root = make_mask_folder(tmp_path / "d", n_train=4, n_val=3, size=(32, 32))
    _zero_idat(root / "val" / "masks" / "002.png")
    p = tmp_path / "seg.yaml"
    p.write_text(f"""\
task: segmentation
name: seg
load: {{root: {root}, classes: [background, red, blue]}}
augment: {{image_size: [32, 32]}}
model: {{name: lraspp_mobilenet_v3_small}}
train: {{epochs: 1, batch_size: 2, optimizer: {{name: adamw, lr: 0.001}}, tensorboard: false}}
evaluate: {{split: val}}
""")
    run_cli("run", str(p), "--run-dir", "r", cwd=tmp_path, timeout=300)  # used to fail at evaluate
    errors = [json.loads(x) for x in (tmp_path / "r" / "data_errors.jsonl").read_text().splitlines()]
    assert [Path(e["path"]).relative_to(root).as_posix() for e in errors] == ["val/masks/002.png"]
    assert "cannot read mask" in errors[0]["error"]
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert np.sum(metrics["val/confusion_matrix"]) == 2 * 32 * 32  # evaluate ran on the 2 readable pairs


def test_unreadable_images_are_skipped_and_reported(index_data):
    (index_data / "train" / "images" / "003.png").write_bytes(b"not a png")
    samples, _, bad, _ = _load(index_data, classes=CLASSES)
    assert len(samples["train"]) == 5 and [Path(b.path).name for b in bad] == ["003.png"]


def test_classes_inferred_from_masks_when_not_given(index_data):
    _, info, _, _ = _load(index_data)
    assert info["class_names"] == ["class_0", "class_1", "class_2"]
    _, info, _, _ = _load(index_data, check_images=False)
    assert info["class_names"] == ["class_0", "class_1", "class_2"]


def test_inferring_classes_decodes_each_mask_once(index_data, monkeypatch):
    import visionpipe_plugins.segmentation.data as seg_data

    reads: list[str] = []
    real = seg_data.read_mask
    monkeypatch.setattr(seg_data, "read_mask", lambda p: (reads.append(Path(p).name), real(p))[1])
    samples, info, _, _ = _load(index_data)
    assert info["class_names"] == ["class_0", "class_1", "class_2"]
    masks = [Path(s.mask).name for split in samples.values() for s in split]
    assert sorted(reads) == sorted(masks)  # the check at load and the class inference share one pass


def test_val_labels_beyond_the_inferred_classes_are_an_error(index_data):
    m = read_mask(index_data / "val" / "masks" / "001.png").copy()
    m[0, 0] = 5
    save_mask(index_data / "val" / "masks" / "001.png", m, palette=False)
    with pytest.raises(DataError, match=r"val/masks/001\.png: mask values \[5\] are neither a class index \(0\.\.2\)"):
        _load(index_data)


def test_masks_follow_every_augmentation_nearest_only(tmp_path):
    root = make_mask_folder(tmp_path / "d", n_train=4, n_val=1)
    aug = {"image_size": [37, 45], "mean": [0, 0, 0], "std": [1, 1, 1],
           "train": [{"name": "HorizontalFlip", "p": 1.0}, {"name": "Rotate", "limit": [10, 10], "p": 1.0},
                     {"name": "RandomResizedCrop", "size": [30, 40], "scale": [0.6, 0.9], "p": 1.0}]}
    data = _task(root, augment=aug, classes=CLASSES).build_data()
    for i in range(4):
        x, y = data.train[i]
        assert y.shape == (37, 45) and set(torch.unique(y).tolist()) <= {0, 1, 2}, "no interpolated labels"
        red = (x[0] > 0.8) & (x[1] < 0.25) & (x[2] < 0.25)
        blue = (x[2] > 0.8) & (x[0] < 0.25) & (x[1] < 0.25)
        # the geometry moved image and mask together: the coloured pixels carry their class
        assert float((y[red] == 1).float().mean()) > 0.9 and float((y[blue] == 2).float().mean()) > 0.9
        # after the flip, blue (class 2) is on the left
        cols = torch.arange(45).float()
        assert float(cols[None].expand(37, 45)[y == 2].mean()) < float(cols[None].expand(37, 45)[y == 1].mean())


@pytest.mark.parametrize("field, value", [("image_dir", "{foo}"), ("image_dir", "{0}"), ("image_dir", "images{"),
                                          ("image_dir", "img}"), ("mask_dir", "m{x}"), ("mask_dir", "{split")])
def test_only_split_may_appear_in_braces_in_folder_templates(tmp_path, field, value):
    data = {"task": "segmentation", "load": {"root": str(tmp_path), field: value}}
    with pytest.raises(ConfigError, match=rf"x\.yaml: load\.{field}: only \{{split\}} may appear in braces"):
        load_config("x.yaml", data=data)


def test_split_placeholder_in_image_and_mask_dirs(index_data):
    for split in ("train", "val"):
        (index_data / split / "images").rename(index_data / split / f"images_{split}")
        (index_data / split / "masks").rename(index_data / split / f"masks_{split}")
    samples, *_ = _load(index_data, classes=CLASSES, image_dir="images_{split}", mask_dir="masks_{split}")
    assert len(samples["train"]) == 6 and len(samples["val"]) == 3
    assert "images_val" in samples["val"][0].image and "masks_val" in samples["val"][0].mask


@pytest.mark.parametrize("content, message", [
    (b"background\nc\xe9rcle\nsquare\n", r"classes.txt:2: not UTF-8 text \(byte 0xe9\)"),
    (b"background\ncircle\n# note\ncircle\n", r"classes.txt:4: class name 'circle' again \(first on line 2\)"),
])
def test_a_bad_classes_file_names_its_line(tmp_path, content, message):
    from visionpipe_plugins.segmentation.data import read_class_file

    p = tmp_path / "classes.txt"
    p.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_class_file(p)
