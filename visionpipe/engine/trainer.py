"""The training loop shared by every task: readable top to bottom.

The engine owns epochs, optimizers, schedulers, AMP, gradient clipping/accumulation, EMA,
DDP, checkpoints, resume, early stopping, metrics files and progress. A task owns only
``training_step`` (or ``train_step`` for several optimizers) and ``evaluate``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import Dataset

from visionpipe.config import TrainConfig
from visionpipe.engine import distributed as dist
from visionpipe.engine.checkpoint import rng_state, save_checkpoint, set_rng_state
from visionpipe.engine.loaders import make_loader, pin_memory
from visionpipe.engine.meters import Meter
from visionpipe.engine.optim import Warmup, build_optimizer, build_scheduler, retarget_scheduler
from visionpipe.engine.progress import fmt, make_progress
from visionpipe.errors import TrainingError, VisionpipeError, did_you_mean
from visionpipe.task import OptimizationContext, Task

if TYPE_CHECKING:
    from visionpipe.pipeline import RunContext

log = logging.getLogger(__name__)


def to_device(obj: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Move tensors inside nested tuples/lists/dicts to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, dict):
        return {k: to_device(v, device, non_blocking) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device, non_blocking) for v in obj)
    return obj


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for the ``amp`` setting on ``device`` (None = off)."""
    if setting == "off":
        return None
    if device.type != "cuda":
        if setting == "bf16":
            return torch.bfloat16  # CPU autocast runs in bf16; no gradient scaler needed
        if setting == "fp16":
            log.warning("train.amp: fp16 needs CUDA; training in fp32 on %s (use bf16 for mixed precision on CPU)",
                        device.type)
        return None
    if setting == "fp16":
        return torch.float16
    if setting == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


class Trainer:
    """Fits ``model`` for ``task`` with the train block's settings, writing into the run folder."""

    def __init__(self, task: Task, model: nn.Module, ctx: RunContext, cfg: TrainConfig) -> None:
        self.task, self.ctx, self.cfg = task, ctx, cfg
        self.device = ctx.device
        self.model = model.to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            bench = cfg.cudnn_benchmark
            torch.backends.cudnn.benchmark = bench if bench is not None else not ctx.cfg.deterministic
        self.dtype = amp_dtype(cfg.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.non_blocking = self.device.type == "cuda" and pin_memory(cfg, self.device)

        # optimizers first: param_groups may freeze parameters, and DDP must only see trainable ones
        opts = task.configure_optimizers(self.model)
        if opts is None:
            opts = {"main": build_optimizer(task.param_groups(self.model, cfg.optimizer.lr), cfg.optimizer)}
        self.optimizers: dict[str, torch.optim.Optimizer] = opts
        self.train_module: nn.Module = self.model
        if dist.is_distributed():
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_module = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if cfg.compile:
            self.train_module = torch.compile(self.train_module)
        self.schedulers = {k: build_scheduler(o, cfg.scheduler, cfg.epochs) for k, o in opts.items()}
        self.warmups: dict[str, Warmup] = {}
        self.ema = None
        if cfg.ema:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)

        self.monitor = cfg.monitor or task.monitor
        self.mode = cfg.monitor_mode or task.monitor_mode
        for s in self.schedulers.values():
            if isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau):
                s.mode = self.mode
                s._init_is_better(mode=self.mode, threshold=s.threshold, threshold_mode=s.threshold_mode)
                s.best = s.mode_worse
        self.epoch = 0
        self.global_step = 0
        self.best: float | None = None
        self.bad_epochs = 0
        self.history: list[dict[str, Any]] = []
        self.finished = False

    # ------------------------------------------------------------------ state
    def eval_model(self) -> nn.Module:
        """The model to evaluate and export: the EMA when enabled."""
        return self.ema.module if self.ema is not None else self.model

    def state_dict(self) -> dict[str, Any]:
        """Everything resume needs, as tensors and plain data (loadable with weights_only)."""
        return {
            "format": "visionpipe-checkpoint/1",
            "task": self.task.name,
            "config": self.ctx.resolved,
            "info": self.ctx.info,
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "ema_n_averaged": int(self.ema.n_averaged) if self.ema is not None else None,
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items() if s is not None},
            "warmups": {k: w.state_dict() for k, w in self.warmups.items()},
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "best": self.best,
            "bad_epochs": self.bad_epochs,
            "history": self.history,
            "finished": self.finished,
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (resume)."""
        self.model.load_state_dict(state["model"])
        if self.ema is not None and state.get("ema"):
            self.ema.module.load_state_dict(state["ema"])
            # 0 would make the next update copy the live weights; older checkpoints lack the count, and
            # the EMA's update ignores its value once it is above 0
            self.ema.n_averaged.fill_(int(state.get("ema_n_averaged") or 1))
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        retargeted = False
        for k, s in self.schedulers.items():
            if s is not None and k in state.get("schedulers", {}):
                s.load_state_dict(state["schedulers"][k])
                retargeted |= retarget_scheduler(s, self.cfg.scheduler, self.cfg.epochs)
        if retargeted:
            log.info("train.epochs is now %d: the %s schedule is recomputed for %d epochs and continues from epoch %d",
                     self.cfg.epochs, self.cfg.scheduler.name, self.cfg.epochs, int(state["epoch"]))
        self._warm_state = state.get("warmups", {})
        self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.best = state.get("best")
        self.bad_epochs = int(state.get("bad_epochs", 0))
        self.history = list(state.get("history", []))
        self.finished = bool(state.get("finished", False))
        set_rng_state(state["rng"])

    # ------------------------------------------------------------------ loop
    def fit(self, train_ds: Dataset, val_ds: Dataset | None, collate_fn: Callable | None = None) -> dict[str, Any]:
        """Train from ``self.epoch`` to ``cfg.epochs``; return the last epoch's metrics."""
        cfg, ctx = self.cfg, self.ctx
        if len(train_ds) == 0:
            raise VisionpipeError("the training split is empty: nothing to train on")
        steps_per_epoch = math.ceil(len(train_ds) / (cfg.batch_size * dist.world_size()) / cfg.grad_accum)
        warm_steps = int(cfg.scheduler.warmup_epochs * steps_per_epoch)
        self.warmups = {k: Warmup(o, warm_steps, cfg.scheduler.warmup_start_factor) for k, o in self.optimizers.items()}
        for k, w in self.warmups.items():
            if k in getattr(self, "_warm_state", {}):
                w.load_state_dict(self._warm_state[k])
        writer = ctx.tensorboard() if cfg.tensorboard else None
        last: dict[str, Any] = self.history[-1] if self.history else {}
        loader = self._loader(train_ds, collate_fn, train=True)
        val_loader = self._loader(val_ds, collate_fn, train=False) if val_ds is not None and dist.is_main() else None
        progress = make_progress(enabled=dist.is_main())
        with progress:
            ep_bar = progress.add_task("epochs", total=cfg.epochs, completed=self.epoch, info="")
            while self.epoch < cfg.epochs:
                epoch = self.epoch
                loader.sampler.set_epoch(epoch)
                t0 = time.perf_counter()
                train_metrics = self._train_epoch(loader, epoch, progress, writer)
                elapsed = time.perf_counter() - t0
                metrics: dict[str, Any] = {"epoch": epoch + 1}
                metrics.update({f"train/{k}": v for k, v in train_metrics.items()})
                metrics["train/seconds"] = elapsed
                metrics["lr"] = self.optimizers[next(iter(self.optimizers))].param_groups[-1]["lr"]
                if val_ds is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
                    metrics.update(self._validate(val_loader, epoch))
                self.epoch = epoch + 1
                improved = self._track_best(metrics)
                self._step_schedulers(metrics)
                stop = self._early_stop(improved)
                self.finished = self.epoch >= cfg.epochs or stop
                self.history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
                if dist.is_main():
                    state = self.state_dict()
                    if improved:  # best before last: a kill in between must not leave last.pt ahead of best.pt
                        save_checkpoint(state, ctx.run_dir / "checkpoints" / "best.pt")
                    save_checkpoint(state, ctx.run_dir / "checkpoints" / "last.pt")
                    ctx.append_epoch_metrics(self.history[-1])
                    if writer:
                        for k, v in self.history[-1].items():
                            if k != "epoch":
                                writer.add_scalar(k, v, self.epoch)
                        writer.flush()
                ctx.hook.visionpipe_on_epoch_end(ctx=ctx, epoch=self.epoch, metrics=self.history[-1])
                log.info("epoch %d/%d %s", self.epoch, cfg.epochs,
                         fmt({k: v for k, v in self.history[-1].items() if k != "epoch"}))
                progress.update(ep_bar, completed=self.epoch,
                                info=fmt({k: v for k, v in metrics.items() if k.startswith("val/")
                                          and isinstance(v, float)}))
                last = metrics
                if stop:
                    log.info("early stopping: %s has not improved for %d epochs", self.monitor, self.bad_epochs)
                    break
        if writer:
            writer.close()
        if self.best is None:  # no validation: the last epoch is the best we know
            if dist.is_main():
                save_checkpoint(self.state_dict(), ctx.run_dir / "checkpoints" / "best.pt")
        return last

    def _loader(self, ds: Dataset, collate_fn: Callable | None, *, train: bool) -> Any:
        """The loader of one split: the task's transforms in workers, or ``decode: device``."""
        cfg = self.cfg
        if cfg.decode == "device":
            from visionpipe.engine.device_data import (
                DeviceAugment,
                DeviceBatches,
                DeviceTransform,
                EncodedImages,
                collate_encoded,
            )

            src = self.task.device_images(ds)
            try:
                aug = DeviceAugment.from_config(src.augment, train=train) if src is not None else None
            except VisionpipeError:
                if train:
                    raise
                aug = None  # eval transforms the device cannot apply: validate on the ordinary path
            if src is not None and aug is not None:
                loader = make_loader(EncodedImages(src.samples), cfg.batch_size, train=train, seed=self.ctx.seed,
                                     epoch=self.epoch, cfg=cfg, collate_fn=collate_encoded, device=self.device)
                return DeviceBatches(loader, DeviceTransform(aug, self.device, self.non_blocking,
                                                             errors_file=self.ctx.path("data_errors.jsonl")))
            if train:
                raise VisionpipeError(
                    f"train.decode: device is not available for task {self.task.name}: its training set is not "
                    "an image-label dataset with an augment block (see Task.device_images); use decode: workers")
        return make_loader(ds, cfg.batch_size, train=train, seed=self.ctx.seed, epoch=self.epoch, cfg=cfg,
                           collate_fn=collate_fn, device=self.device)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _train_epoch(self, loader: Any, epoch: int, progress: Any, writer: Any) -> dict[str, float]:
        cfg, task = self.cfg, self.task
        self.train_module.train()
        meter = Meter()
        bar = progress.add_task(f"epoch {epoch + 1}", total=len(loader), info="", )
        opt_ctx = OptimizationContext(self.optimizers, self.scaler, self._autocast, cfg.grad_clip)
        # reading a loss on the host waits for the GPU; on CUDA do it every log_every batches, not every batch
        read_every = cfg.log_every if self.device.type == "cuda" else 1
        n_images, t0 = 0, time.perf_counter()
        for i, batch in enumerate(loader):
            batch = to_device(batch, self.device, self.non_blocking)
            if cfg.channels_last and isinstance(batch, (tuple, list)) \
                    and isinstance(batch[0], torch.Tensor) and batch[0].dim() == 4:
                batch = (batch[0].contiguous(memory_format=torch.channels_last), *batch[1:])
            for w in self.warmups.values():
                w.step(self.global_step)
            if task.manual_optimization:
                values: dict[str, Any] = task.train_step(self.train_module, batch, opt_ctx)
                opt_ctx.finish()
                self.global_step += 1
            else:
                values = self._auto_step(batch, i, len(loader), epoch)
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            n = task.batch_size_of(batch)
            n_images += n
            meter.update(values, n)  # tensors stay on the device: no wait here
            if (i + 1) % read_every == 0 or i + 1 == len(loader):
                self._check_finite({k: float(v) for k, v in values.items()}, epoch, i)
                progress.update(bar, info=fmt({**meter.averages(),
                                               "img/s": n_images / max(time.perf_counter() - t0, 1e-9)}))
            if writer and self.global_step % cfg.log_every == 0 and dist.is_main():
                for k, v in values.items():
                    writer.add_scalar(f"step/{k}", float(v), self.global_step)
            progress.update(bar, advance=1)
        progress.remove_task(bar)
        averages = meter.averages()
        self._check_finite(averages, epoch, len(loader) - 1)  # a bad batch between two reads shows here
        totals = dist.all_reduce_sum(meter.totals(), self.device)
        return Meter.averages_from_totals(totals)

    def _auto_step(self, batch: Any, i: int, n_batches: int, epoch: int) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        accum = cfg.grad_accum
        sync = (i + 1) % accum == 0 or i + 1 == n_batches
        ddp_ctx = (self.train_module.no_sync() if not sync and hasattr(self.train_module, "no_sync")
                   else contextlib.nullcontext())
        with ddp_ctx:
            with self._autocast():
                losses = self.task.training_step(self.train_module, batch)
            if "loss" not in losses:
                raise VisionpipeError(f"task {self.task.name}: training_step must return a dict with 'loss'")
            values = {k: v.detach() for k, v in losses.items()}
            if self.device.type != "cuda":  # free on CPU: stop before a non-finite loss reaches the weights
                self._check_finite({k: float(v) for k, v in values.items()}, epoch, i)
            self.scaler.scale(losses["loss"] / accum).backward()
        if sync:
            opt = self.optimizers["main"]
            if cfg.grad_clip:
                self.scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.scaler.step(opt)
            self.scaler.update()
            opt.zero_grad(set_to_none=True)
            self.global_step += 1
        return values

    def _check_finite(self, values: dict[str, float], epoch: int, i: int) -> None:
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if bad:
            raise TrainingError(
                f"non-finite loss at epoch {epoch + 1}, batch {i + 1} (global step {self.global_step + 1}): "
                f"{fmt(bad)}; the last good checkpoint is kept. Lower train.optimizer.lr or set train.grad_clip")

    def _validate(self, loader: Any, epoch: int) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        if dist.is_main():  # one process scores the whole split: metrics equal a single-process run's
            model = self.eval_model()
            model.eval()
            with torch.no_grad(), self._autocast():
                res = self.task.evaluate(model, loader, device=self.device, epoch=epoch + 1,
                                         out_dir=self.ctx.run_dir)
            metrics = {f"val/{k}": v for k, v in res.items() if isinstance(v, (int, float))}
        return dist.broadcast_object(metrics)

    def _track_best(self, metrics: dict[str, Any]) -> bool:
        value = metrics.get(self.monitor)
        if value is None:
            if any(k.startswith("val/") for k in metrics):  # validated, yet the metric is not there: a typo
                names = sorted(k for k in metrics if isinstance(metrics[k], (int, float)))
                raise TrainingError(f"train.monitor: '{self.monitor}' is not a metric of this task"
                                    f"{did_you_mean(self.monitor, names)} (metrics: {', '.join(names)})")
            return False
        better = (self.best is None or (value > self.best if self.mode == "max" else value < self.best))
        min_delta = self.cfg.early_stopping.min_delta if self.cfg.early_stopping else 0.0
        if better and self.best is not None and abs(value - self.best) < min_delta:
            better = False
        if better:
            self.best = float(value)
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        return better

    def _step_schedulers(self, metrics: dict[str, Any]) -> None:
        if any(not w.done for w in self.warmups.values()):
            return  # the schedule starts after warm-up
        for s in self.schedulers.values():
            if s is None:
                continue
            if isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau):
                if self.monitor in metrics:
                    s.step(metrics[self.monitor])
            else:
                s.step()

    def _early_stop(self, improved: bool) -> bool:
        es = self.cfg.early_stopping
        return bool(es and not improved and self.bad_epochs >= es.patience)


def describe_checkpoint(path: Path) -> str:
    """One line about a checkpoint (epoch, best)."""
    from visionpipe.engine.checkpoint import load_checkpoint

    s = load_checkpoint(path)
    return f"{path}: task={s.get('task')} epoch={s.get('epoch')} best={s.get('best')}"
