"""Speed options of the train block: validated at load time, and each runs on CPU where it can."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from tests.conftest import run_cli
from visionpipe.config import load_config
from visionpipe.errors import ConfigError
from visionpipe.task import OptimizationContext


@pytest.mark.parametrize(("sets", "message"), [
    (["train.persistent_workers=true"], "persistent_workers needs num_workers > 0"),
    (["train.prefetch_factor=2"], "prefetch_factor needs num_workers > 0"),
    (["train.prefetch_factor=0", "train.num_workers=1"], "must be > 0"),
    (["train.cudnn_benchmark=true", "deterministic=true"], "contradicts deterministic: true"),
    (["train.decode=gpu"], "must be one of 'workers' or 'device'"),
])
def test_speed_options_are_validated(tiny_pipeline, sets, message):
    with pytest.raises(ConfigError, match=message):
        load_config(str(tiny_pipeline()), sets)


def test_speed_options_accepted(tiny_pipeline):
    cfg = load_config(str(tiny_pipeline()), ["train.num_workers=2", "train.persistent_workers=true",
                                             "train.prefetch_factor=2", "train.cudnn_benchmark=false",
                                             "train.pin_memory=true"]).config.train
    assert (cfg.num_workers, cfg.persistent_workers, cfg.prefetch_factor) == (2, True, 2)
    assert cfg.cudnn_benchmark is False and cfg.pin_memory is True and cfg.decode == "workers"


def test_fp16_loss_scale_updates_once_per_training_step():
    nets = {"a": torch.nn.Linear(3, 1), "b": torch.nn.Linear(3, 1)}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.1) for k, m in nets.items()}
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0, growth_interval=2)
    ctx = OptimizationContext(opts, scaler, contextlib.nullcontext, grad_clip=1.0)
    x = torch.randn(4, 3)
    for _ in range(2):  # two training steps of two optimizers each (a GAN's D then G)
        for k, m in nets.items():
            ctx.step(k, m(x).pow(2).mean())
        ctx.finish()
    assert scaler.get_scale() == 8.0, "grown once after 2 training steps, not after 4 optimizer steps"
    ctx.step("a", nets["a"](x).pow(2).mean())
    ctx.step("a", nets["a"](x).pow(2).mean())  # the same optimizer twice in one step is allowed
    ctx.finish()
    assert scaler.get_scale() == 16.0


def _history(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_persistent_workers_reproduce_the_in_process_run(tmp_path, tiny_pipeline):
    p = tiny_pipeline(epochs=2)
    run_cli("run", str(p), "--run-dir", "main", cwd=tmp_path, timeout=300)
    run_cli("run", str(p), "--run-dir", "workers", "--set", "train.num_workers=1", "--set",
            "train.persistent_workers=true", "--set", "train.prefetch_factor=2", cwd=tmp_path, timeout=300)
    a, b = _history(tmp_path / "main"), _history(tmp_path / "workers")
    key = ("train/loss", "train/acc", "val/loss")
    # same augmentation in every epoch although the worker outlives epoch 1
    assert [[h[k] for k in key] for h in a] == [[h[k] for k in key] for h in b]


@pytest.mark.slow
def test_speed_options_train_on_cpu(tmp_path, tiny_pipeline):
    p = tiny_pipeline(epochs=2)
    run_cli("run", str(p), "--run-dir", "r", "--set", "train.channels_last=true", "--set", "train.amp=bf16",
            "--set", "train.grad_accum=2", "--set", "train.ema=0.5", "--set", "train.cudnn_benchmark=true",
            cwd=tmp_path, timeout=300)
    hist = _history(tmp_path / "r")
    assert [h["epoch"] for h in hist] == [1, 2]
    assert all(0 <= h["train/loss"] < 10 for h in hist)
    ckpt = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["ema"] is not None and ckpt["global_step"] == 2, "2 epochs x 2 batches / grad_accum 2"


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_speed_options_train_on_cuda(tmp_path, tiny_pipeline):
    p = tiny_pipeline(epochs=2)
    run_cli("run", str(p), "--run-dir", "r", "--set", "device=cuda", "--set", "train.amp=fp16",
            "--set", "train.channels_last=true", "--set", "train.cudnn_benchmark=true", "--set", "train.pin_memory=true",
            "--set", "train.num_workers=2", "--set", "train.persistent_workers=true", "--set", "train.ema=0.5",
            "--set", "train.compile=true", cwd=tmp_path, timeout=600)
    ckpt = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["scaler"], "fp16 trains with a gradient scaler"
