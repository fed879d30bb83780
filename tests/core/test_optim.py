"""LR schedules across a resume that changes train.epochs."""

from __future__ import annotations

import pytest
import torch

from visionpipe.config import SchedulerConfig
from visionpipe.engine.optim import build_scheduler, retarget_scheduler


def _scheduled(epochs: int, steps: int, cfg: SchedulerConfig) -> tuple[torch.optim.Optimizer, object]:
    """An SGD optimizer and its scheduler for ``epochs``, stepped ``steps`` epochs."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    sched = build_scheduler(opt, cfg, epochs)
    for _ in range(steps):
        opt.step()
        sched.step(1.0) if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau) else sched.step()
    return opt, sched


def _restored(epochs: int, steps: int, new_epochs: int, cfg: SchedulerConfig) -> tuple[torch.optim.Optimizer, object]:
    """As a resume does it: state of a run of ``epochs`` after ``steps``, loaded into a run of ``new_epochs``."""
    old_opt, old = _scheduled(epochs, steps, cfg)
    opt, sched = _scheduled(new_epochs, 0, cfg)
    opt.load_state_dict(old_opt.state_dict())
    sched.load_state_dict(old.state_dict())
    return opt, sched


@pytest.mark.parametrize(("epochs", "steps", "new_epochs"), [(2, 2, 5), (6, 1, 4), (3, 1, 8)])
def test_cosine_follows_the_new_total(epochs, steps, new_epochs):
    cfg = SchedulerConfig(name="cosine", eta_min=0.001)
    opt, sched = _restored(epochs, steps, new_epochs, cfg)
    assert retarget_scheduler(sched, cfg, new_epochs)
    straight_opt, straight = _scheduled(new_epochs, steps, cfg)
    for _ in range(steps, new_epochs):
        assert opt.param_groups[0]["lr"] == pytest.approx(straight_opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15)
        opt.step(), sched.step(), straight_opt.step(), straight.step()


def test_the_same_total_leaves_the_restored_schedule_untouched():
    cfg = SchedulerConfig(name="cosine")
    opt, sched = _restored(4, 2, 4, cfg)
    before = (opt.state_dict()["param_groups"][0]["lr"], sched.state_dict())
    assert not retarget_scheduler(sched, cfg, 4)
    assert (opt.state_dict()["param_groups"][0]["lr"], sched.state_dict()) == before


def test_an_explicit_t_max_and_schedules_without_a_horizon_are_kept():
    cfg = SchedulerConfig(name="cosine", t_max=3)
    assert not retarget_scheduler(_restored(4, 2, 8, cfg)[1], cfg, 8)
    for name in ("step", "multistep", "exponential", "plateau"):
        cfg = SchedulerConfig(name=name)
        assert not retarget_scheduler(_restored(4, 2, 8, cfg)[1], cfg, 8), name
