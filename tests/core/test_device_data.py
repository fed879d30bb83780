"""train.decode: device — the same images as the ordinary path, decoded and augmented on the device."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.conftest import run_cli
from visionpipe.augment import AugmentConfig
from visionpipe.config import load_config
from visionpipe.engine.device_data import (
    DeviceAugment,
    DeviceTransform,
    EncodedImages,
    collate_encoded,
    crop_box,
)
from visionpipe.errors import VisionpipeError
from visionpipe.manager import get_manager

# 1.5 grey levels after normalization by std 0.25: albumentations resizes in uint8 (rounding), we in float
TOL = 1.5 / 255 / 0.25
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_jpeg_folder(root: Path, per_class: int = 4) -> Path:
    """root/{train,val}/<class>/ of 56x40 JPEGs, plus a PNG and an EXIF-rotated JPEG (decoded by the worker)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, color in (("red", (230, 30, 30)), ("blue", (30, 30, 230))):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = np.clip(np.array(color)[None, None] + rng.normal(0, 25, (40, 56, 3)), 0, 255).astype(np.uint8)
                img[:, :20] //= 2  # some structure, so flips and crops show
                Image.fromarray(img).save(d / f"{i:03d}.jpg", quality=90)
            Image.fromarray(img).save(d / "png.png")
            exif = Image.Exif()
            exif[0x0112] = 6  # rotate 90° on display
            Image.fromarray(img).save(d / "rotated.jpg", quality=90, exif=exif)
    return root


PIPELINE = """\
task: classification
name: dev
seed: 0
load: {{root: {root}, train: train, val: val}}
augment:
  image_size: [24, 32]
  mean: [0.5, 0.5, 0.5]
  std: [0.25, 0.25, 0.25]
  train: {train}
model: {{name: resnet18}}
train: {{epochs: {epochs}, batch_size: 4, optimizer: {{name: adamw, lr: 0.001}}}}
"""


@pytest.fixture
def jpeg_data(tmp_path: Path) -> Path:
    return make_jpeg_folder(tmp_path / "jpeg")


def _task_and_data(tmp_path: Path, root: Path, train: str = "[]", epochs: int = 1):
    p = tmp_path / "dev.yaml"
    p.write_text(PIPELINE.format(root=root, train=train, epochs=epochs))
    loaded = load_config(str(p))
    task = get_manager().task("classification")(loaded.config, None)
    return task, task.build_data(), p


def _device_batch(task, ds, train: bool, device: torch.device, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    src = task.device_images(ds)
    assert src is not None, "classification datasets qualify for the device path"
    enc = EncodedImages(src.samples)
    enc.set_epoch(epoch, 0)
    batch = collate_encoded([enc[i] for i in range(len(enc))])
    return DeviceTransform(DeviceAugment.from_config(src.augment, train=train), device)(batch)


def test_workers_send_bytes_for_plain_jpegs_and_pixels_for_the_rest(tmp_path, jpeg_data):
    task, data, _ = _task_and_data(tmp_path, jpeg_data)
    enc = EncodedImages(task.device_images(data.val).samples)
    kinds = {Path(p).name: enc[i][0].dim() for i, (p, _) in enumerate(enc.samples)}
    assert kinds["000.jpg"] == 1 and kinds["png.png"] == 3 and kinds["rotated.jpg"] == 3


@pytest.mark.parametrize(("split", "train_aug"), [
    ("val", "[]"),  # eval: resize + normalize
    ("train", "[{name: HorizontalFlip, p: 1.0}, {name: VerticalFlip, p: 1.0}]"),  # flips that always fire
])
def test_device_path_matches_the_worker_path_on_cpu(tmp_path, jpeg_data, split, train_aug):
    task, data, _ = _task_and_data(tmp_path, jpeg_data, train_aug)
    ds = getattr(data, split)
    x, y = _device_batch(task, ds, split == "train", torch.device("cpu"))
    ref = torch.stack([ds[i][0] for i in range(len(ds))])
    assert x.shape == ref.shape == (len(ds), 3, 24, 32) and x.dtype == torch.float32
    assert y.tolist() == [label for _, label in ds.samples]
    assert (x - ref).abs().max() <= TOL, "same pixels as albumentations (EXIF rotation, PNG included)"


def test_random_resized_crop_is_seeded_and_in_bounds(tmp_path, jpeg_data):
    aug = DeviceAugment.from_config(AugmentConfig(image_size=(24, 32), train=[
        {"name": "RandomResizedCrop", "size": [24, 32], "scale": [0.2, 0.9]}, {"name": "HorizontalFlip"}]), train=True)
    assert aug.crop_p == 1.0 and aug.crop_scale == (0.2, 0.9) and aug.hflip == 0.5
    rng = np.random.default_rng(1)
    for _ in range(500):
        h, w = (int(v) for v in rng.integers(8, 300, 2))
        top, left, ch, cw = crop_box(h, w, rng.random(7).tolist(), aug)
        assert 0 <= top and 0 <= left and 1 <= ch and 1 <= cw and top + ch <= h and left + cw <= w
    task, data, _ = _task_and_data(tmp_path, jpeg_data, "[{name: RandomResizedCrop, size: [24, 32]}]")
    a0 = _device_batch(task, data.train, True, torch.device("cpu"), epoch=0)[0]
    assert torch.equal(a0, _device_batch(task, data.train, True, torch.device("cpu"), epoch=0)[0])
    assert not torch.equal(a0, _device_batch(task, data.train, True, torch.device("cpu"), epoch=1)[0])


def test_what_the_device_path_cannot_do_is_refused(tmp_path, jpeg_data):
    with pytest.raises(VisionpipeError, match=r"augment.train\[0\].*'ColorJitter'.*decode: workers"):
        DeviceAugment.from_config(AugmentConfig(train=[{"name": "ColorJitter"}]), train=True)
    task, _, _ = _task_and_data(tmp_path, jpeg_data)
    assert task.device_images(SimpleNamespace(samples=[("a line of text", 0)])) is None
    assert task.device_images(None) is None


@pytest.mark.slow
def test_pipeline_trains_with_device_decoding(tmp_path, jpeg_data):
    _, _, p = _task_and_data(tmp_path, jpeg_data, "[{name: HorizontalFlip, p: 0.5}]", epochs=3)
    run_cli("run", str(p), "--run-dir", "r", "--set", "train.decode=device", cwd=tmp_path, timeout=300)
    hist = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert max(h["val/top1"] for h in hist) >= 0.75


@pytest.mark.gpu
@gpu
def test_cuda_decoding_matches_cpu(tmp_path, jpeg_data):
    task, data, _ = _task_and_data(tmp_path, jpeg_data, "[{name: HorizontalFlip, p: 1.0}]")
    for split, train in (("val", False), ("train", True)):
        ds = getattr(data, split)
        xc, yc = _device_batch(task, ds, train, torch.device("cpu"))
        xg, yg = _device_batch(task, ds, train, torch.device("cuda"))
        assert xg.device.type == "cuda" and torch.equal(yg.cpu(), yc)
        # nvJPEG's IDCT and chroma upsampling differ slightly from libjpeg-turbo's
        assert (xg.cpu() - xc).abs().mean() <= 4 / 255 / 0.25


@pytest.mark.gpu
@pytest.mark.slow
@gpu
def test_pipeline_trains_with_cuda_decoding(tmp_path, jpeg_data):
    _, _, p = _task_and_data(tmp_path, jpeg_data, "[{name: HorizontalFlip, p: 0.5}]", epochs=2)
    run_cli("run", str(p), "--run-dir", "r", "--set", "train.decode=device", "--set", "device=cuda",
            "--set", "train.amp=bf16", "--set", "train.channels_last=true", "--set", "train.num_workers=2",
            "--set", "train.persistent_workers=true", cwd=tmp_path, timeout=300)
    assert (tmp_path / "r" / "checkpoints" / "best.pt").is_file()


def _broken_jpeg(good: Path, out: Path) -> Path:
    """``good`` with a marker byte in the middle of its scan: the header is fine, the pixels cannot be decoded."""
    data = good.read_bytes()
    mid = data.index(b"\xff\x00", len(data) // 2)
    out.write_bytes(data[:mid + 1] + b"\x55" * 64 + data[mid + 65:])
    return out


def test_unreadable_files_are_reported_once_and_left_out_of_the_batch(tmp_path, jpeg_data):
    from visionpipe.engine.device_data import _plain_jpeg

    good = sorted((jpeg_data / "val" / "red").glob("0*.jpg"))
    bad_jpeg = _broken_jpeg(good[0], tmp_path / "broken.jpg")
    assert _plain_jpeg(bad_jpeg.read_bytes()), "it passes the worker's header check and reaches decode_jpeg"
    text = tmp_path / "text.png"
    text.write_text("not an image")
    samples = [(str(good[1]), 0), (str(bad_jpeg), 1), (str(text), 1), (str(tmp_path / "gone.jpg"), 0),
               (str(good[2]), 1)]
    enc = EncodedImages(samples)
    errors = tmp_path / "data_errors.jsonl"
    aug = DeviceAugment.from_config(AugmentConfig(image_size=(24, 32)), train=True)
    transform = DeviceTransform(aug, torch.device("cpu"), errors_file=errors)
    batch = collate_encoded([enc[i] for i in range(len(enc))])
    x, y = transform(batch)  # used to raise RuntimeError: decode_jpeg ... Unsupported marker type 0x55
    # training keeps the batch size: the readable images, in turn, stand in for the others (own flips)
    assert x.shape == (5, 3, 24, 32) and y.tolist() == [0, 0, 1, 0, 1]
    ref, _ = transform(collate_encoded([enc[0], enc[4]]))
    assert torch.equal(x[[0, 4]], ref)
    eval_transform = DeviceTransform(DeviceAugment.from_config(AugmentConfig(image_size=(24, 32)), train=False),
                                     torch.device("cpu"), errors_file=errors)
    x, y = eval_transform(batch)  # evaluation leaves them out
    assert x.shape == (2, 3, 24, 32) and y.tolist() == [0, 1]
    assert torch.equal(x, eval_transform(collate_encoded([enc[0], enc[4]]))[0])
    transform(batch)  # a second epoch: nothing new to report
    reported = [json.loads(line) for line in errors.read_text().splitlines()]
    names = ["broken.jpg", "text.png", "gone.jpg"]
    assert [Path(r["path"]).name for r in reported] == names + names  # once per transform (train, eval)
    assert "cannot decode" in reported[0]["error"] and "file not found" in reported[2]["error"]


def test_a_jpeg_the_device_decoder_rejects_is_read_on_the_cpu(tmp_path, jpeg_data):
    """nvJPEG refuses some JPEGs libjpeg reads: those fall back to read_image, to the ordinary path's pixels."""
    task, data, _ = _task_and_data(tmp_path, jpeg_data)
    src = task.device_images(data.val)
    enc = EncodedImages(src.samples)
    batch = collate_encoded([enc[i] for i in range(len(enc))])
    transform = DeviceTransform(DeviceAugment.from_config(src.augment, train=False), torch.device("cpu"))
    ref, _ = transform(batch)
    items = list(batch[0])
    i = next(k for k, t in enumerate(items) if t.dim() == 1)
    items[i] = torch.frombuffer(bytearray(_broken_jpeg(Path(batch[3][i]), tmp_path / "b.jpg").read_bytes()),
                                dtype=torch.uint8)  # bytes the decoder rejects, for a file that reads fine
    x, y = transform((items, *batch[1:]))
    assert torch.equal(x, ref) and torch.equal(y, batch[2])


def test_a_batch_of_only_unreadable_files(tmp_path, jpeg_data):
    """Training repeats the previous batch (every rank takes the same number of steps); evaluation skips it."""
    from torch.utils.data import DataLoader

    from visionpipe.engine.device_data import DeviceBatches

    good = sorted((jpeg_data / "train" / "blue").glob("0*.jpg"))
    bad = _broken_jpeg(good[0], tmp_path / "broken.jpg")
    enc = EncodedImages([(str(good[1]), 0), (str(good[2]), 1), (str(bad), 1), (str(tmp_path / "gone.png"), 0)])
    for train, labels in ((True, [[0, 1], [0, 1]]), (False, [[0, 1]])):
        aug = DeviceAugment.from_config(AugmentConfig(image_size=(24, 32)), train=train)
        batches = DeviceBatches(DataLoader(enc, batch_size=2, collate_fn=collate_encoded),
                                DeviceTransform(aug, torch.device("cpu")))
        assert [y.tolist() for _, y in batches] == labels


@pytest.mark.slow
def test_a_corrupt_jpeg_does_not_stop_a_device_decoding_run(tmp_path, jpeg_data):
    """Without the load check the corrupt file reaches decode_jpeg mid-epoch: it is reported, the run goes on."""
    one = jpeg_data / "train" / "red" / "001.jpg"
    _broken_jpeg(one, one)  # the same number of files: batches are as large as in a clean run
    _, _, p = _task_and_data(tmp_path, jpeg_data, epochs=1)
    run_cli("run", str(p), "--run-dir", "r", "--set", "train.decode=device", "--set", "load.check_images=false",
            cwd=tmp_path, timeout=300)
    log = (tmp_path / "r" / "run.log").read_text()
    assert "skipping unreadable image" in log and "001.jpg" in log
    assert (tmp_path / "r" / "checkpoints" / "best.pt").is_file()
