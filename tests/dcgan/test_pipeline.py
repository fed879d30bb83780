"""The DCGAN pipeline end to end on tiny data: run folder, grids, Fréchet distance, ONNX, predict, resume."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import run_cli
from tests.dcgan.conftest import make_images, write_pipeline
from visionpipe.engine.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One tiny run (2 epochs, evaluate, export, predict) shared by the tests below."""
    tmp = tmp_path_factory.mktemp("gan")
    data = make_images(tmp / "imgs")
    (data / "broken.png").write_bytes(b"not an image")
    p = write_pipeline(tmp / "tiny.yaml", data, epochs=2, extra="predict: {batch_size: 4}\n")
    proc = run_cli("run", str(p), cwd=tmp)
    return tmp / "runs" / "tiny", tmp, proc


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.png"))}


def test_run_folder_has_grids_metrics_and_generator(finished_run):
    run, _, proc = finished_run
    for rel in ("checkpoints/last.pt", "checkpoints/best.pt", "plots/samples_epoch_001.png",
                "plots/samples_epoch_002.png", "plots/samples_final.png", "plots/curves.png", "generator.onnx",
                "metrics.json", "metrics.jsonl", "manifest.json", "data_errors.jsonl"):
        assert (run / rel).is_file(), rel
    grid = np.asarray(Image.open(run / "plots" / "samples_epoch_002.png"))
    assert grid.ndim == 3 and grid.shape[2] == 3 and grid.shape[0] >= 2 * 16  # 4 samples, 2x2, enlarged
    assert "val/fid" in proc.stdout


def test_fid_per_epoch_and_final(finished_run):
    run = finished_run[0]
    epochs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2]
    for e in epochs:
        assert e["val/fid"] > 0 and np.isfinite(e["val/fid"])
        assert {"train/loss_d", "train/loss_g", "train/d_real", "train/d_fake"} <= set(e)
        assert e["val/fid_real_images"] == 24 and e["val/fid_fake_images"] == 16  # the broken file is left out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val/fid"] == pytest.approx(min(e["val/fid"] for e in epochs))  # best.pt = lowest distance
    assert metrics["train/best_val/fid"] == pytest.approx(metrics["val/fid"])


def test_unreadable_image_is_skipped_and_reported(finished_run):
    run = finished_run[0]
    errors = [json.loads(x) for x in (run / "data_errors.jsonl").read_text().splitlines()]
    assert len(errors) == 1 and errors[0]["path"].endswith("broken.png") and errors[0]["error"]


def test_onnx_generator_matches_pytorch(finished_run):
    import onnxruntime as ort

    from visionpipe.export.checkpoint_model import task_and_model_from_checkpoint
    from visionpipe.export.onnx import read_metadata

    run = finished_run[0]
    meta = read_metadata(run / "generator.onnx")
    assert meta["task"] == "dcgan" and meta["nz"] == 8 and meta["image_size"] == 16 and meta["channels"] == 3
    assert meta["inputs"] == ["z"] and meta["outputs"] == ["image"]
    _, model, _ = task_and_model_from_checkpoint(run / "checkpoints" / "best.pt")
    z = np.random.default_rng(5).standard_normal((7, 8), dtype=np.float32)
    got = ort.InferenceSession(str(run / "generator.onnx")).run(None, {"z": z})[0]
    with torch.no_grad():
        ref = ((model.generator(torch.from_numpy(z)) + 1) / 2).numpy()
    assert got.shape == (7, 3, 16, 16) and 0 <= got.min() and got.max() <= 1
    assert np.abs(ref - got).max() < 1e-4
    m = json.loads((run / "manifest.json").read_text())
    assert m["export"]["max_abs_diff"] < 1e-4 and m["export"]["parity_inputs"] == 2


def test_pipeline_predict_stage_writes_samples(finished_run):
    out = finished_run[0] / "predictions"
    assert len(list(out.glob("seed0_*.png"))) == 16
    assert json.loads((out / "summary.json").read_text())["images"] == 16


def test_predict_writes_n_pngs_deterministically(finished_run, tmp_path):
    from visionpipe.infer.backends import open_backend
    from visionpipe_plugins.dcgan.task import DcganTask

    run = finished_run[0]
    model = str(run / "generator.onnx")
    proc = run_cli("predict", model, "--num", "5", "--seed", "3", "--out", "a", cwd=tmp_path)
    assert json.loads(proc.stdout)["images"] == 5
    backend, meta = open_backend(model, device="cpu")
    for name, num, seed, bs in (("b", 5, 3, 2), ("c", 3, 3, 16), ("d", 5, 4, 16)):
        DcganTask.predict(backend, meta, None, tmp_path / name, {"num": num, "seed": seed, "batch_size": bs})
    da, db, dc, dd = (_digests(tmp_path / x) for x in "abcd")
    assert len(da) == 5 and sorted(da) == [f"seed3_{i:05d}.png" for i in range(5)]
    assert da == db  # same seed: same images, whatever the batch size
    assert dc == {k: da[k] for k in sorted(da)[:3]}  # sample i depends on (seed, i) only
    assert set(dd.values()).isdisjoint(da.values())  # another seed: other images
    img = np.asarray(Image.open(tmp_path / "a" / "seed3_00000.png"))
    assert img.shape == (16, 16, 3) and img.dtype == np.uint8


def test_predict_with_checkpoint_matches_onnx(finished_run, tmp_path):
    from visionpipe.infer.backends import open_backend
    from visionpipe_plugins.dcgan.task import DcganTask

    run = finished_run[0]
    for name, model in (("onnx", "generator.onnx"), ("pt", "checkpoints/best.pt")):
        backend, meta = open_backend(str(run / model), device="cpu")
        summary = DcganTask.predict(backend, meta, None, tmp_path / name, {"num": 4, "seed": 1})
        assert summary["images"] == 4 and summary["backend"] == ("onnxruntime" if name == "onnx" else "torch")
    for p in sorted((tmp_path / "onnx").glob("*.png")):
        a = np.asarray(Image.open(p)).astype(int)
        b = np.asarray(Image.open(tmp_path / "pt" / p.name)).astype(int)
        assert np.abs(a - b).max() <= 1  # rounding to 8 bits may differ by one level


def test_export_command_from_run_folder(finished_run, tmp_path):
    run, tmp, _ = finished_run
    out = tmp_path / "g.onnx"
    proc = run_cli("export", str(run), "--out", str(out), cwd=tmp)
    assert out.is_file() and "parity max abs diff" in proc.stdout


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def test_resume_continues_exactly(tmp_path, gan_images):
    """1 epoch + resume to 2 == 2 epochs straight: both networks, both optimizers, RNG and data order."""
    from visionpipe.pipeline import run_pipeline

    p = str(write_pipeline(tmp_path / "gan.yaml", gan_images, epochs=2, extra="stages: [load, augment, model, train]\n"))
    run_pipeline(p, run_dir=str(tmp_path / "straight"))
    run_pipeline(p, ["train.epochs=1"], run_dir=str(tmp_path / "split"))
    ctx = run_pipeline(None, ["train.epochs=2"], resume=str(tmp_path / "split"))
    assert ctx.manifest["resumed_from_epoch"] == 1
    a, b = _weights(tmp_path / "straight/checkpoints/last.pt"), _weights(tmp_path / "split/checkpoints/last.pt")
    assert a.keys() == b.keys() and any(k.startswith("discriminator.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    opt = load_checkpoint(tmp_path / "split/checkpoints/last.pt")["optimizers"]
    assert set(opt) == {"G", "D"}
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    p = write_pipeline(tmp_path / "gan.yaml", tmp_path / "empty")
    proc = run_cli("run", str(p), cwd=tmp_path, check=False)
    assert proc.returncode == 1
    msg = " ".join(proc.stderr.split())
    assert "load.root:" in msg and "contains no images" in msg and "Traceback" not in proc.stderr


def test_folder_of_only_broken_images_is_a_clear_error(tmp_path):
    from visionpipe.errors import DataError
    from visionpipe.pipeline import run_pipeline

    (tmp_path / "bad").mkdir()
    for i in range(3):
        (tmp_path / "bad" / f"{i}.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match=r"load.root: none of the 3 image file\(s\) could be read"):
        run_pipeline(str(write_pipeline(tmp_path / "gan.yaml", tmp_path / "bad")), run_dir=str(tmp_path / "r1"))


def test_missing_root_without_generate_is_a_clear_error(tmp_path):
    from visionpipe.errors import DataError
    from visionpipe.pipeline import run_pipeline

    with pytest.raises(DataError, match="does not exist .*load.generate"):
        run_pipeline(str(write_pipeline(tmp_path / "gan.yaml", tmp_path / "nope")), run_dir=str(tmp_path / "r2"))


def test_builtin_data_is_generated_and_grayscale_works(tmp_path):
    """load.generate creates the image set on first run; channels: 1 trains and predicts grayscale."""
    p = write_pipeline(tmp_path / "gan.yaml", tmp_path / "data" / "gen",
                       extra="predict: {}\n").read_text()
    p = p.replace("  reference_images: 24\n", "  reference_images: 24\n  generate: {count: 20, image_size: 24}\n")
    p = p.replace("model: {nz: 8, ngf: 8, ndf: 8}", "model: {nz: 8, ngf: 8, ndf: 8, channels: 1}")
    (tmp_path / "gan.yaml").write_text(p)
    run_cli("run", str(tmp_path / "gan.yaml"), cwd=tmp_path)
    generated = list((tmp_path / "data" / "gen").rglob("*.png"))
    assert len(generated) == 20 and {p.parent.name for p in generated} <= {"circle", "square", "triangle", "cross"}
    run = tmp_path / "runs" / "tiny"
    sample = np.asarray(Image.open(next((run / "predictions").glob("*.png"))))
    assert sample.shape == (16, 16)
    meta = json.loads((run / "metrics.json").read_text())
    assert meta["val/fid_real_images"] == 20


def test_classifier_checkpoint_as_feature_extractor(tmp_path, gan_images, caplog):
    """A classifier trained with visionpipe's classification task gives the Fréchet distance features."""
    import logging

    from tests.conftest import TINY_CLASSIFY, make_color_folder
    from visionpipe.pipeline import run_pipeline

    cls_data = make_color_folder(tmp_path / "cls", per_class=4, size=16)
    (tmp_path / "cls.yaml").write_text(TINY_CLASSIFY.format(root=cls_data, epochs=1).replace(
        "image_size: [32, 32]", "image_size: [16, 16]").replace("export:\n  opset: 17\n", ""))
    run_pipeline(str(tmp_path / "cls.yaml"), run_dir=str(tmp_path / "cls_run"))
    ckpt = tmp_path / "cls_run" / "checkpoints" / "best.pt"
    p = write_pipeline(tmp_path / "gan.yaml", gan_images, extra="stages: [load, augment, model, train]\n")
    p.write_text(p.read_text().replace("evaluate: {fid_samples: 16, grid: 4}",
                                       f"evaluate: {{fid_samples: 16, grid: 4, feature_extractor: {ckpt}}}"))
    caplog.set_level(logging.INFO, logger="visionpipe_plugins.dcgan")
    run_pipeline(str(p), run_dir=str(tmp_path / "gan_run"))
    assert any("classification checkpoint" in r.getMessage() and "at 16px" in r.getMessage() for r in caplog.records)
    epoch = json.loads((tmp_path / "gan_run" / "metrics.jsonl").read_text().splitlines()[0])
    assert epoch["val/fid"] > 0 and np.isfinite(epoch["val/fid"])
