"""The stage runner and the run folder."""

from __future__ import annotations

import inspect
import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import torch
from pydantic import BaseModel

from visionpipe import __version__
from visionpipe.config import LoadedConfig, PipelineConfig, dump_yaml, load_config
from visionpipe.engine import distributed as dist
from visionpipe.engine.checkpoint import (
    load_checkpoint,
    recording_weights_files,
    seed_everything,
    state_mismatch,
)
from visionpipe.errors import ConfigError, UsageError, VisionpipeError
from visionpipe.io import append_jsonl, clean_stale_tmp, sha256_file, write_json, write_text
from visionpipe.manager import PluginManager, get_manager
from visionpipe.paths import resolve_under
from visionpipe.task import DataBundle, Task

log = logging.getLogger(__name__)


@dataclass
class StageDef:
    """A stage kind contributed by a plugin."""

    name: str
    run: Callable[[RunContext, Any], Any]
    """Called as ``run(ctx, block)`` with the validated config block."""
    config: type[BaseModel] | None = None
    description: str = ""


@dataclass
class RunContext:
    """What stages share: config, task, device, run folder, data, model, metrics."""

    loaded: LoadedConfig
    task: Task
    manager: PluginManager
    run_dir: Path
    device: torch.device
    resume_state: dict[str, Any] | None = None
    resume_pending: bool = False
    """A resume whose checkpoint is not yet known to fit the config: nothing in the run folder is rewritten."""
    data: DataBundle | None = None
    model: torch.nn.Module | None = None
    trainer: Any = None
    metrics: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def cfg(self) -> PipelineConfig:
        """The validated pipeline config."""
        return self.loaded.config

    @property
    def seed(self) -> int:
        """The run's seed."""
        return self.cfg.seed

    @property
    def hook(self) -> Any:
        """Plugin hooks (``ctx.hook.visionpipe_...``)."""
        return self.manager.hook

    @property
    def resolved(self) -> dict[str, Any]:
        """The resolved config as plain data."""
        return self.loaded.resolved_dict()

    @property
    def info(self) -> dict[str, Any]:
        """Data info (class names, ...), from the data or the checkpoint being resumed."""
        if self.data is not None:
            return self.data.info
        if self.resume_state is not None:
            return self.resume_state.get("info", {})
        return {}

    def block(self, name: str) -> BaseModel:
        """The config block ``name``, or its defaults (of the task's own schema) when the file left it out."""
        value = getattr(self.cfg, name)
        if value is not None:
            return value
        annotation = type(self.cfg).model_fields[name].annotation
        for cls in (annotation, *get_args(annotation)):
            if isinstance(cls, type) and issubclass(cls, BaseModel):
                return cls()
        raise VisionpipeError(f"the '{name}' stage needs a '{name}:' block in the pipeline")

    def path(self, *parts: str) -> Path:
        """A path inside the run folder (parent folders created); one that would leave it is refused."""
        p = resolve_under(self.run_dir, Path(*parts), what="run-folder path")
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def append_epoch_metrics(self, metrics: dict[str, Any]) -> None:
        """One line of metrics.jsonl (rank 0)."""
        with open(self.path("metrics.jsonl"), "a", encoding="utf-8") as f:
            append_jsonl(f, metrics)

    def tensorboard(self) -> Any:
        """A TensorBoard SummaryWriter on <run>/tb (None off rank 0 or without tensorboard)."""
        if not dist.is_main():
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("tensorboard is not installed; no event files are written")
            return None
        return SummaryWriter(log_dir=str(self.run_dir / "tb"))


# ---------------------------------------------------------------------------- device / run dir


def pick_device(setting: str) -> torch.device:
    """cuda when asked or available (auto), else cpu; a clear error when cuda is asked but absent."""
    if setting == "cuda" and not torch.cuda.is_available():
        raise VisionpipeError("device: cuda was asked for but no CUDA device is available (use device: auto or cpu)")
    if setting in ("cuda", "auto") and torch.cuda.is_available():
        local = dist.env_world()[2]
        return torch.device("cuda", local)
    return torch.device("cpu")


def new_run_dir(cfg: PipelineConfig) -> Path:
    """<output>/<name>, or <name>-2, -3 ... when taken."""
    root = Path(cfg.output).resolve()
    base = resolve_under(root, cfg.name or "run", what="run name")
    if base == root:
        raise ConfigError(f"'{cfg.name}' is the output folder itself; name a folder inside it", field="name")
    path, i = base, 2
    while path.exists():
        path = base.with_name(f"{base.name}-{i}")
        i += 1
    return path


def git_commit() -> str | None:
    """HEAD of the git repository around the current folder, if any."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=5)
            return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def versions(manager: PluginManager) -> dict[str, Any]:
    """Versions of Python, the main libraries and every plugin."""
    import importlib.metadata as md

    out: dict[str, Any] = {"python": platform.python_version(), "visionpipe": __version__,
                           "platform": platform.platform()}
    for pkg in ("torch", "torchvision", "onnx", "onnxruntime", "albumentations", "pycocotools", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    out["plugins"] = {i.name: {"version": i.version, "error": i.error} for i in manager.infos}
    return out


# ---------------------------------------------------------------------------- built-in stages


def stage_load(ctx: RunContext) -> dict[str, Any]:
    """Load the datasets and report unreadable inputs."""
    with dist.main_first():  # rank 0 first: it may generate the built-in data
        ctx.data = ctx.task.build_data()
    if ctx.data.skipped and dist.is_main():
        with open(ctx.path("data_errors.jsonl"), "w", encoding="utf-8") as f:
            for b in ctx.data.skipped:
                append_jsonl(f, {"path": b.path, "error": b.reason})
        log.warning("%d unreadable input(s) skipped; see %s", len(ctx.data.skipped), ctx.path("data_errors.jsonl"))
    sizes = {k: len(getattr(ctx.data, k)) for k in ("train", "val", "test") if getattr(ctx.data, k) is not None}
    log.info("data: %s", ", ".join(f"{k}={v}" for k, v in sizes.items()))
    return {"sizes": sizes, "skipped": len(ctx.data.skipped)}


def stage_augment(ctx: RunContext) -> dict[str, Any]:
    """Attach the augment block's transforms (train and eval) to the datasets."""
    if ctx.data is None:
        raise VisionpipeError("stage 'augment' needs the 'load' stage before it")
    return {"augment": ctx.task.augment(ctx.data) if hasattr(ctx.task, "augment") else None}


def stage_model(ctx: RunContext) -> dict[str, Any]:
    """Build the model (and load local weights if the model block names them)."""
    params = inspect.signature(ctx.task.build_model).parameters  # a task may leave out `pretrained`
    takes_pretrained = "pretrained" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    restores = ctx.resume_state is not None and "train" in ctx.cfg.stage_list(ctx.loaded.extra_stages)
    # a resume needs no weights file: the checkpoint has every weight
    with recording_weights_files() as weights_files:  # whatever the task loads: a path, torchvision's cache, ...
        model = ctx.task.build_model(ctx.info, pretrained=False) if restores and takes_pretrained \
            else ctx.task.build_model(ctx.info)
    ctx.model = model.to(ctx.device)
    if ctx.resume_state is not None:
        _check_resumable_model(ctx)
    elif dist.is_main():  # local weights files the model started from decide the result: hashed like the data
        for path in dict.fromkeys(weights_files):
            ctx.manifest["inputs"][str(path)] = sha256_file(path)
    n = sum(p.numel() for p in ctx.model.parameters())
    trainable = sum(p.numel() for p in ctx.model.parameters() if p.requires_grad)
    log.info("model: %s parameters (%s trainable)", f"{n:,}", f"{trainable:,}")
    return {"parameters": n, "trainable": trainable}


def _changes(old: Any, new: Any, prefix: str) -> list[str]:
    """``key: old -> new`` for every value that differs between two config blocks (plain data)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [c for k in dict.fromkeys([*old, *new]) for c in _changes(old.get(k), new.get(k), f"{prefix}.{k}")]
    return [] if old == new else [f"{prefix}: {old} -> {new}"]


def _last_checkpoint(ctx: RunContext) -> Path:
    return ctx.run_dir / "checkpoints" / "last.pt"


def _check_resumable_model(ctx: RunContext) -> None:
    """Refuse to resume when the checkpoint's weights do not fit the model the config builds now."""
    problem = state_mismatch(ctx.model.state_dict(), ctx.resume_state.get("model") or {})
    if problem is None:
        return
    changed = _changes(ctx.resume_state.get("config", {}).get("model"), ctx.resolved.get("model"), "model")
    why = "; ".join(changed[:3]) if changed else f"{problem}; did the data change?"
    raise ConfigError(f"does not match the model in the config ({why}): --set on resume cannot change the model",
                      file=str(_last_checkpoint(ctx)))


def _confirm_resume(ctx: RunContext) -> None:
    """The checkpoint fits the config: from now on the resume may rewrite config.yaml and the manifest."""
    if not ctx.resume_pending:
        return
    ctx.resume_pending = False
    if dist.is_main():
        write_text(ctx.run_dir / "config.yaml", dump_yaml(ctx.resolved))
        _write_manifest(ctx, "running")


def _warn_ignored_train_settings(ctx: RunContext) -> None:
    """Say when --set changed optimizer or scheduler settings that the restored state overrides."""
    before = ctx.resume_state.get("config", {}).get("train", {})
    now = ctx.resolved.get("train", {})
    changed = [c for k in ("optimizer", "scheduler") for c in _changes(before.get(k), now.get(k), f"train.{k}")
               if not c.startswith("train.scheduler.t_max:")]
    if changed:
        log.warning("%s: changed on resume, but the optimizer and its schedule continue from the state in %s "
                    "(only the cosine schedule's length follows train.epochs); this may not take effect",
                    "; ".join(changed[:3]), _last_checkpoint(ctx))


def stage_train(ctx: RunContext) -> dict[str, Any]:
    """Fit the model with the shared engine; then keep the best weights for what follows."""
    from visionpipe.engine.trainer import Trainer

    if ctx.model is None or ctx.data is None or ctx.data.train is None:
        raise VisionpipeError("stage 'train' needs 'load' (with a train split) and 'model' before it")
    cfg = ctx.block("train")
    trainer = Trainer(ctx.task, ctx.model, ctx, cfg)
    ctx.trainer = trainer
    if ctx.resume_state is not None:
        try:
            trainer.load_state_dict(ctx.resume_state)
        except (KeyError, ValueError, RuntimeError) as e:
            before = ctx.resume_state.get("config", {})
            changed = [c for k in ("model", "train") for c in _changes(before.get(k), ctx.resolved.get(k), k)
                       if not c.startswith("train.epochs:")]
            first = (str(e).strip().splitlines() or [""])[0][:200]
            why = "; ".join([*changed[:3], f"{type(e).__name__}: {first}"])
            raise ConfigError(f"cannot restore its training state ({why}): --set on resume "
                              "cannot change the model, the optimizers or which parameters train",
                              file=str(_last_checkpoint(ctx))) from None
        _confirm_resume(ctx)
        _warn_ignored_train_settings(ctx)
        log.info("resumed at epoch %d/%d", trainer.epoch, cfg.epochs)
        if dist.is_main():  # the checkpoint's history is authoritative: no gaps or repeats after a kill
            write_text(ctx.run_dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in trainer.history))
    stopped_early = trainer.finished and cfg.early_stopping and trainer.bad_epochs >= cfg.early_stopping.patience
    if trainer.epoch >= cfg.epochs or stopped_early:
        log.info("training already finished (epoch %d/%d); not training again", trainer.epoch, cfg.epochs)
    else:
        trainer.fit(ctx.data.train, ctx.data.val, ctx.data.collate_fn)
    dist.barrier()
    if dist.is_main():  # other nodes may not see the run folder: rank 0 reads best.pt and sends the weights
        state = load_checkpoint(ctx.run_dir / "checkpoints" / "best.pt", map_location=ctx.device)
        ctx.model.load_state_dict(state.get("ema") or state["model"])
    dist.broadcast_module(ctx.model)
    ctx.metrics.update({"train/epochs": trainer.epoch, "train/best_" + trainer.monitor: trainer.best})
    return {"epochs": trainer.epoch, "best": trainer.best, "monitor": trainer.monitor}


def stage_evaluate(ctx: RunContext) -> dict[str, Any]:
    """Score the model on the evaluation split; write metrics.json and plots."""
    from visionpipe.engine.loaders import make_loader
    from visionpipe.plots import plot_history

    if not dist.is_main():
        return {}
    cfg = ctx.block("evaluate")
    split = cfg.split
    ds = getattr(ctx.data, split, None) if ctx.data else None
    if ds is None or ctx.model is None:
        raise VisionpipeError(f"stage 'evaluate' needs a model and a '{split}' split (stages 'load' and 'model')")
    train_cfg = ctx.block("train")
    bs = cfg.batch_size or train_cfg.batch_size
    loader = make_loader(ds, bs, train=False, seed=0, epoch=0, cfg=train_cfg, collate_fn=ctx.data.collate_fn,
                         device=ctx.device)
    ctx.model.eval()
    with torch.no_grad():
        res = ctx.task.evaluate(ctx.model, loader, device=ctx.device, out_dir=ctx.run_dir)
    ctx.metrics.update({f"{split}/{k}": v for k, v in res.items()})
    history = ctx.trainer.history if ctx.trainer else _read_history(ctx.run_dir)
    if history:
        plot_history(history, ctx.path("plots", "curves.png"))
    return {k: v for k, v in res.items() if isinstance(v, (int, float))}


def _read_history(run_dir: Path) -> list[dict[str, Any]]:
    p = run_dir / "metrics.jsonl"
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


RESERVED_DIRS = ("checkpoints", "plots", "tb")  # run-folder entries that export.file and predict.out may not touch


def _in_reserved(ctx: RunContext, path: Path) -> bool:
    """True when ``path`` is one of the run folder's own files or folders, or lies in one of those folders."""
    run = ctx.run_dir.resolve()
    own = [run / d for d in RESERVED_DIRS]
    files = [run / f for f in ("config.yaml", "manifest.json", "metrics.json", "metrics.jsonl", "run.log",
                               "data_errors.jsonl")]
    return path in files or any(path == d or d in path.parents for d in own)


def stage_export(ctx: RunContext) -> dict[str, Any]:
    """Export to ONNX with a parity check; fail when outside tolerance."""
    from visionpipe.export.onnx import export_onnx

    if not dist.is_main():
        return {}
    if ctx.model is None:
        raise VisionpipeError("stage 'export' needs the 'model' stage before it")
    cfg = ctx.block("export")
    out = resolve_under(ctx.run_dir, cfg.file, what="export.file")
    if out.suffix != ".onnx" or out.is_dir() or _in_reserved(ctx, out):
        raise ctx.loaded.source.error(f"'{cfg.file}' must be an .onnx file of its own in the run folder (not a "
                                      f"folder, and not in {', '.join(RESERVED_DIRS)})", ("export", "file"))
    ctx.model.eval()
    spec = ctx.task.export_spec(ctx.model.cpu(), ctx.data, ctx.info, cfg.parity_samples)
    report = export_onnx(spec, out, opset=cfg.opset, tolerance=cfg.tolerance, dynamic_batch=cfg.dynamic_batch,
                         conv_to_matmul=cfg.conv_to_matmul)
    ctx.model.to(ctx.device)
    ctx.outputs["onnx"] = str(out)
    ctx.manifest["export"] = report
    ctx.metrics["export/max_abs_diff"] = report["max_abs_diff"]
    return report


def stage_predict(ctx: RunContext) -> dict[str, Any]:
    """Predict over the predict block's source with the exported model (or the PyTorch model)."""
    from visionpipe.infer.backends import open_backend
    from visionpipe.infer.runner import run_predict

    if not dist.is_main():
        return {}
    cfg = ctx.block("predict")
    options = {**cfg.options, **({"top_k": cfg.top_k} if cfg.top_k is not None else {})}  # checked by load_config
    out_dir = resolve_under(ctx.run_dir, cfg.out, what="predict.out")
    onnx = Path(ctx.outputs["onnx"]).resolve() if ctx.outputs.get("onnx") else None
    if (out_dir == ctx.run_dir.resolve() or _in_reserved(ctx, out_dir) or (out_dir.exists() and not out_dir.is_dir())
            or (onnx is not None and out_dir in onnx.parents)):  # the stage may delete its folder (below)
        raise ctx.loaded.source.error(f"'{cfg.out}' must be a folder of its own inside the run folder: not the run "
                                      f"folder, a file, a folder holding the exported model, or in "
                                      f"{', '.join(RESERVED_DIRS)}", ("predict", "out"))
    model_path = ctx.outputs.get("onnx") or (ctx.run_dir / "checkpoints" / "best.pt")
    backend, metadata = open_backend(str(model_path), device=cfg.device, streams=cfg.streams)  # None: sized for predict
    # shard 0/1: under torchrun only the main process runs this stage, and it predicts every input
    # (left to the environment, RANK/WORLD_SIZE would make it write shard 0 of N and stop)
    opts = {**options, "batch_size": cfg.batch_size, "save_images": cfg.save_images,
            "workers": cfg.workers, "decode": cfg.decode, "shard": "0/1"}
    task_cls = ctx.manager.task(metadata["task"])
    # the stage owns its folder: predictions of another model or with other options are started over
    summary = run_predict(task_cls, backend, metadata, cfg.source, out_dir, opts, on_change="restart")
    ctx.outputs["predictions"] = str(out_dir)
    return summary


BUILTIN_STAGES: dict[str, Callable[[RunContext], Any]] = {
    "load": stage_load, "augment": stage_augment, "model": stage_model, "train": stage_train,
    "evaluate": stage_evaluate, "export": stage_export, "predict": stage_predict,
}


# ---------------------------------------------------------------------------- runner


def _setup_file_log(run_dir: Path) -> logging.Handler:
    h = logging.FileHandler(run_dir / "run.log", encoding="utf-8")
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(h)
    return h


def _write_manifest(ctx: RunContext, status: str) -> None:
    m = ctx.manifest
    m["status"] = status
    outs = {}
    for p in sorted(ctx.run_dir.rglob("*")):
        if p.is_file() and p.suffix in (".pt", ".onnx", ".json", ".jsonl", ".png", ".yaml", ".data") \
                and p.name != "manifest.json" and "tb" not in p.relative_to(ctx.run_dir).parts[:1]:
            outs[str(p.relative_to(ctx.run_dir))] = sha256_file(p)
    m["outputs"] = outs
    write_json(ctx.run_dir / "manifest.json", m)


def _read_manifest(run_path: Path) -> dict[str, Any]:
    p = run_path / "manifest.json"
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise VisionpipeError(f"{p}: cannot read the run's manifest ({e})") from None


def _check_resume_pipeline(path: Path, given: str, run_path: Path, prev: dict[str, Any],
                           manager: PluginManager) -> None:
    """Accept a PIPELINE given with --resume only when it is the pipeline the run was started from."""
    if not path.is_file():
        raise ConfigError("file not found", file=given)
    recorded = (prev.get("pipeline") or {}).get("sha256") or next(iter((prev.get("inputs") or {}).values()), None)
    if recorded is not None and sha256_file(path) == recorded:  # (older manifests: the first input is the pipeline)
        return
    mine = load_config(str(path), manager=manager).resolved_dict()
    if mine == load_config(str(run_path / "config.yaml"), manager=manager).resolved_dict():
        return
    raise ConfigError(f"is not the pipeline the run {run_path} was started from, and differs from its config.yaml; "
                      "--resume continues with the run's own config.yaml: leave PIPELINE out (change values with "
                      "--set), or start a new run without --resume", file=given)


def run_pipeline(path: str | None, overrides: list[str] | None = None, *, run_dir: str | None = None,
                 resume: str | None = None, manager: PluginManager | None = None) -> RunContext:
    """Run a pipeline file (or resume a run folder); return the finished run context.

    A resume runs in the folder the run was started in (recorded in its manifest), so that the
    relative paths of its config mean what they meant then; the current folder is restored after.
    """
    manager = manager or get_manager()
    if not resume:
        return _run(path, overrides, manager, run_dir=run_dir)
    if run_dir:
        raise UsageError(f"--run-dir {run_dir} with --resume {resume}: a resumed run stays in its own folder; "
                              "give only one of them")
    run_path = Path(resume).resolve()
    if not (run_path / "config.yaml").is_file():
        raise VisionpipeError(f"{resume}: not a run folder (no config.yaml)")
    prev = _read_manifest(run_path)
    here = os.getcwd()
    started_in = prev.get("cwd")
    if started_in and not Path(started_in).is_dir():
        raise VisionpipeError(
            f"{resume}: the run was started in {started_in}, which no longer exists, and the relative paths in its "
            f"config.yaml (e.g. load.root) resolve there: recreate that folder, or make them absolute in "
            f"{run_path / 'config.yaml'}")
    if not started_in:
        log.warning("%s: no working directory recorded; relative paths in its config resolve against %s",
                    resume, here)
    pipeline = Path(path).resolve() if path else None
    work = Path(started_in or here)
    if work.resolve() != Path(here).resolve():
        log.info("resuming in %s, the folder the run was started in (relative paths in its config resolve there)",
                 work)
    os.chdir(work)
    try:
        if pipeline is not None:
            _check_resume_pipeline(pipeline, str(path), run_path, prev, manager)
        return _run(str(pipeline) if pipeline else None, overrides, manager, resume=run_path, prev=prev,
                    invoked_in=here)
    finally:
        os.chdir(here)


def _check_outputs_stay_in(run_path: Path, cfg: PipelineConfig, stages: list[str]) -> None:
    """Refuse an export.file or predict.out that leaves the run folder before any stage runs, not after training."""
    if "export" in stages and cfg.export is not None:
        resolve_under(run_path, cfg.export.file, what="export.file")
    if "predict" in stages and cfg.predict is not None:
        resolve_under(run_path, cfg.predict.out, what="predict.out")


def _run(path: str | None, overrides: list[str] | None, manager: PluginManager, *, run_dir: str | None = None,
         resume: Path | None = None, prev: dict[str, Any] | None = None, invoked_in: str | None = None) -> RunContext:
    """Run a pipeline file, or continue the run folder ``resume`` (an absolute path, in its working directory)."""
    resume_state = None
    prev = prev or {}
    if resume:
        run_path = resume
        loaded = load_config(str(run_path / "config.yaml"), overrides, manager=manager)
        if prev.get("status") == "finished" and not overrides:
            log.info("run %s already finished (stages: %s); nothing to do", run_path,
                     ", ".join(prev.get("stages_done", [])))
            raise RunAlreadyFinished(str(run_path))
        last = run_path / "checkpoints" / "last.pt"
        if last.is_file():
            resume_state = load_checkpoint(last)
    else:
        loaded = load_config(path, overrides, manager=manager)
        run_path = Path(run_dir).resolve() if run_dir else new_run_dir(loaded.config)
        if (run_path / "manifest.json").is_file():
            raise UsageError(
                f"--run-dir {run_dir}: already holds a run (manifest.json); continue it with "
                f"`visionpipe run --resume {run_dir}`, or choose another --run-dir")
    cfg = loaded.config
    device = pick_device(cfg.device)
    distributed = dist.init_distributed(device)
    if distributed:
        run_path = Path(dist.broadcast_object(str(run_path)))
        if resume:  # every rank must restart from the same epoch, or their collectives would not match
            dist.ensure_same(resume_state.get("epoch") if resume_state else None, "the epoch of checkpoints/last.pt",
                             "resume under torchrun needs the run folder on a file system every node sees")
    seed_everything(cfg.seed + dist.rank())
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    task = manager.task(cfg.task)(cfg, None)
    stages = cfg.stage_list(loaded.extra_stages)
    _check_outputs_stay_in(run_path, cfg, stages)
    # until the checkpoint is known to fit the (overridden) config, a resume rewrites nothing in the run folder
    pending = resume_state is not None and ("train" in stages or "model" in stages)
    ctx = RunContext(loaded, task, manager, run_path, device, resume_state=resume_state, resume_pending=pending)
    task.ctx = ctx
    ctx.manifest.update(_manifest(ctx, path, overrides, prev, invoked_in))
    handler = None
    if dist.is_main():
        run_path.mkdir(parents=True, exist_ok=True)
        stale = clean_stale_tmp(run_path)
        if stale:
            log.info("removed %d stale temporary file(s) from a killed run", len(stale))
        handler = _setup_file_log(run_path)
        if not pending:
            write_text(run_path / "config.yaml", dump_yaml(loaded.resolved_dict()))
            _write_manifest(ctx, "running")
    log.info("run folder: %s (device %s)", run_path, device)
    ctx.hook.visionpipe_before_run(ctx=ctx)
    finished = False  # every rank got through every stage: they can meet before the process group goes
    try:
        for stage in stages:
            ctx.hook.visionpipe_before_stage(stage=stage, ctx=ctx)
            t0 = time.perf_counter()
            try:
                if stage in BUILTIN_STAGES:
                    result = BUILTIN_STAGES[stage](ctx)
                else:
                    sdef = manager.stages.get(stage)
                    if sdef is None:
                        raise VisionpipeError(f"unknown stage '{stage}'")
                    result = sdef.run(ctx, loaded.extra_stages.get(stage))
            except BaseException as e:
                ctx.hook.visionpipe_on_stage_error(stage=stage, ctx=ctx, error=e)
                raise
            if stage == "model" and "train" not in stages:
                _confirm_resume(ctx)  # the model stage checked the weights; nothing else restores state
            ctx.manifest["stages"][stage] = {"seconds": round(time.perf_counter() - t0, 3)}
            ctx.manifest["stages_done"].append(stage)
            ctx.hook.visionpipe_after_stage(stage=stage, ctx=ctx, result=result)
            if dist.is_main():
                if ctx.data is not None:
                    for p in ctx.data.inputs:
                        if Path(p).is_file() and str(p) not in ctx.manifest["inputs"]:
                            ctx.manifest["inputs"][str(p)] = sha256_file(p)
                if not ctx.resume_pending:
                    _write_manifest(ctx, "running")
        _confirm_resume(ctx)
        if dist.is_main():
            final = {k: v for k, v in ctx.metrics.items()}
            write_json(run_path / "metrics.json", final)
            ctx.manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            _write_manifest(ctx, "finished")
        ctx.hook.visionpipe_after_run(ctx=ctx, metrics=ctx.metrics)
        finished = True
    except BaseException:
        if dist.is_main() and run_path.is_dir() and not ctx.resume_pending:  # a refused resume leaves it as it was
            try:
                _write_manifest(ctx, "failed")
            except Exception:  # never mask the real error
                log.debug("could not write manifest", exc_info=True)
        raise
    finally:
        if handler:
            logging.getLogger().removeHandler(handler)
            handler.close()
        dist.cleanup(finished)
    return ctx


def _manifest(ctx: RunContext, path: str | None, overrides: list[str] | None, prev: dict[str, Any],
              invoked_in: str | None) -> dict[str, Any]:
    """The manifest at the start of a run; a resume keeps the run's origin and appends itself to ``resumes``."""
    cfg, device, now = ctx.cfg, ctx.device, time.strftime("%Y-%m-%dT%H:%M:%S%z")
    epoch = ctx.resume_state.get("epoch") if ctx.resume_state else None
    current = {
        "visionpipe_manifest": 1, "task": cfg.task, "name": cfg.name, "seed": cfg.seed,
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "world_size": dist.world_size(), "git_commit": git_commit(), "versions": versions(ctx.manager),
    }
    if invoked_in is None:  # a new run
        inputs = {str(path): sha256_file(path)} if path and Path(path).is_file() else {}
        pipeline = {"path": str(path), "sha256": inputs[str(path)]} if inputs else None
        return {**current, "command": sys.argv, "cwd": os.getcwd(), "pipeline": pipeline, "inputs": inputs, "stages": {},
                "stages_done": [], "resumed_from_epoch": None, "started": now}
    m = {k: v for k, v in prev.items() if k not in ("finished", "export", "outputs", "status")}
    m.update(current)
    m.setdefault("command", None)
    m.setdefault("cwd", os.getcwd())
    m.setdefault("inputs", {})
    m.setdefault("started", None)
    m.update({"stages": {}, "stages_done": [], "resumed_from_epoch": epoch})
    m["resumes"] = [*prev.get("resumes", []), {
        "command": sys.argv, "cwd": invoked_in, "time": now, "overrides": list(overrides or []),
        "from_epoch": epoch, "git_commit": current["git_commit"]}]
    return m


class RunAlreadyFinished(VisionpipeError):
    """``--resume`` on a run whose stages all finished."""

    def __init__(self, run_dir: str) -> None:
        super().__init__(f"run {run_dir} already finished; nothing to resume (start a new run instead)")
