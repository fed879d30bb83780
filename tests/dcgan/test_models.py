"""Generator/discriminator shapes, the config's checks, and one training step on real tensors."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import run_cli
from tests.dcgan.conftest import write_pipeline
from visionpipe.config import load_config
from visionpipe.task import OptimizationContext
from visionpipe_plugins.dcgan.models import DCGAN, Discriminator, Generator


@pytest.mark.parametrize("size,channels", [(16, 3), (32, 1), (64, 3)])
def test_shapes_for_every_power_of_two(size, channels):
    g, d = Generator(nz=10, ngf=4, channels=channels, image_size=size), Discriminator(4, channels, size)
    z = torch.randn(3, 10)
    img = g(z)
    assert img.shape == (3, channels, size, size)
    assert img.min() >= -1 and img.max() <= 1  # tanh
    assert torch.equal(g.eval()(z), g(z[:, :, None, None]))  # [B, nz] and [B, nz, 1, 1] are the same input
    assert d(img).shape == (3,)


def test_default_is_the_paper_architecture():
    gan = DCGAN()
    assert gan.generator(torch.randn(2, 100)).shape == (2, 3, 64, 64)
    convs = [m for m in gan.generator.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [c.out_channels for c in convs] == [512, 256, 128, 64, 3]
    dconvs = [m for m in gan.discriminator.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in dconvs] == [64, 128, 256, 512, 1]
    w = torch.cat([c.weight.detach().flatten() for c in convs])
    assert abs(float(w.std()) - 0.02) < 0.002  # N(0, 0.02) init


def test_bad_image_size_is_a_config_error_with_its_line(tmp_path, gan_images):
    p = write_pipeline(tmp_path / "gan.yaml", gan_images)
    p.write_text(p.read_text().replace("image_size: 16", "image_size: 48"))
    proc = run_cli("validate", str(p), cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "gan.yaml:8: augment.image_size: must be a power of two >= 16" in " ".join(proc.stderr.split())


def test_adam_defaults_follow_the_paper(tmp_path, gan_images):
    cfg = load_config(write_pipeline(tmp_path / "gan.yaml", gan_images)).config
    assert cfg.train.optimizer.name == "adam" and cfg.train.optimizer.lr == 2e-4
    assert tuple(cfg.train.optimizer.betas) == (0.5, 0.999)


def test_one_step_updates_both_networks_with_their_own_optimizer(tmp_path, gan_images):
    from visionpipe.manager import get_manager

    loaded = load_config(write_pipeline(tmp_path / "gan.yaml", gan_images))
    task = get_manager().task("dcgan")(loaded.config, None)
    data = task.build_data()
    model = task.build_model(data.info)
    opts = task.configure_optimizers(model)
    assert set(opts) == {"G", "D"}
    g_ids = {id(p) for p in model.generator.parameters()}
    assert {id(p) for g in opts["G"].param_groups for p in g["params"]} == g_ids
    assert not g_ids & {id(p) for g in opts["D"].param_groups for p in g["params"]}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = torch.stack([data.train[i] for i in range(8)])
    assert batch.shape == (8, 3, 16, 16) and batch.min() >= -1 and batch.max() <= 1
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    import contextlib
    model.train()
    out = task.train_step(model, batch, OptimizationContext(opts, scaler, contextlib.nullcontext, None))
    assert set(out) == {"loss_d", "loss_g", "d_real", "d_fake"} and all(map(torch.isfinite, map(torch.tensor, out.values())))
    after = model.state_dict()
    assert not torch.equal(before["generator.main.0.weight"], after["generator.main.0.weight"])
    assert not torch.equal(before["discriminator.main.0.weight"], after["discriminator.main.0.weight"])
    assert all(p.requires_grad for p in model.discriminator.parameters())  # restored after the G step


def test_a_predict_source_is_refused_at_validate_and_on_the_command_line(tmp_path, gan_images):
    p = write_pipeline(tmp_path / "gan.yaml", gan_images)
    p.write_text(p.read_text() + f"predict: {{source: {gan_images}}}\n")
    proc = run_cli("validate", str(p), cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "predict.source: dcgan generates images from noise and reads no source" in " ".join(proc.stderr.split())

    from visionpipe.errors import UsageError
    from visionpipe_plugins.dcgan.task import DcganTask

    with pytest.raises(UsageError, match="takes no SOURCE; use --num N --seed S"):  # before the model is touched
        DcganTask.predict(None, {"nz": 8}, str(gan_images), tmp_path / "out", {"num": 2})
    assert not (tmp_path / "out").exists()
