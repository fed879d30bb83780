"""Optimizers and LR schedulers from the train block."""

from __future__ import annotations

import math
from typing import Any

import torch

from visionpipe.config import OptimizerConfig, SchedulerConfig


def can_fuse(groups: list[dict[str, Any]]) -> bool:
    """True when torch's fused optimizer kernels take every parameter (floating point, on the CPU or CUDA)."""
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def build_optimizer(groups: list[dict[str, Any]], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """SGD (momentum, nesterov) or Adam/AdamW over the given parameter groups (fused kernel by default)."""
    groups = [g for g in groups if g["params"]]
    fused = can_fuse(groups) if cfg.fused is None else cfg.fused
    kw: dict[str, Any] = {"fused": True} if fused else {}
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay, **kw)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, **kw)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, **kw)


def build_scheduler(opt: torch.optim.Optimizer, cfg: SchedulerConfig, epochs: int) -> Any | None:
    """The epoch-level scheduler named in ``cfg`` (None for 'none')."""
    if cfg.name == "none":
        return None
    if cfg.name == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
    if cfg.name == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=cfg.milestones, gamma=cfg.gamma)
    if cfg.name == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(opt, gamma=cfg.gamma)
    if cfg.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cosine_t_max(cfg, epochs), eta_min=cfg.eta_min)
    if cfg.name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=cfg.factor, patience=cfg.patience)
    raise ValueError(cfg.name)


def cosine_t_max(cfg: SchedulerConfig, epochs: int) -> int:
    """The cosine schedule's length in epochs: ``t_max``, or the epochs after warm-up."""
    return cfg.t_max or max(1, epochs - int(cfg.warmup_epochs))


def retarget_scheduler(sched: Any, cfg: SchedulerConfig, epochs: int) -> bool:
    """Fit a restored scheduler to a changed ``train.epochs``; True when its horizon changed.

    Only cosine depends on the number of epochs: it gets the new length, and the LR is set to the
    new schedule's value at the step the scheduler has reached, from which it anneals as usual.
    """
    if not isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR):
        return False
    t_max = cosine_t_max(cfg, epochs)
    if sched.T_max == t_max:
        return False
    sched.T_max = t_max
    step = min(sched.last_epoch, t_max)
    lrs = [sched.eta_min + (base - sched.eta_min) * (1 + math.cos(math.pi * step / t_max)) / 2
           for base in sched.base_lrs]
    for group, lr in zip(sched.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    sched._last_lr = lrs
    return True


class Warmup:
    """Linear per-step LR warm-up in front of any epoch scheduler; its state is the step count."""

    def __init__(self, opt: torch.optim.Optimizer, steps: int, start_factor: float) -> None:
        self.opt, self.steps, self.start = opt, steps, start_factor
        self.base = [g["lr"] for g in opt.param_groups]
        self.done = steps <= 0

    def step(self, global_step: int) -> None:
        """Set the LR for ``global_step`` (0-based) while warming up."""
        if self.done:
            return
        if global_step >= self.steps:
            for g, b in zip(self.opt.param_groups, self.base, strict=False):
                g["lr"] = b
            self.done = True
            return
        f = self.start + (1.0 - self.start) * global_step / self.steps
        for g, b in zip(self.opt.param_groups, self.base, strict=False):
            g["lr"] = b * f

    def state_dict(self) -> dict[str, Any]:
        """Plain state for checkpoints."""
        return {"base": self.base, "done": self.done, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        self.base, self.done, self.steps = list(state["base"]), bool(state["done"]), int(state["steps"])
