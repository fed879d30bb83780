"""Rebuild a task's model from a visionpipe checkpoint (for export and predict)."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from visionpipe.config import load_config
from visionpipe.engine.checkpoint import load_checkpoint
from visionpipe.errors import VisionpipeError
from visionpipe.manager import get_manager
from visionpipe.task import ExportSpec, Task


def task_and_model_from_checkpoint(path: str | os.PathLike) -> tuple[Task, nn.Module, dict]:
    """(task instance, model with the checkpoint's best weights, checkpoint dict)."""
    p = Path(path)
    state = load_checkpoint(p)
    if "config" not in state or "task" not in state:
        raise VisionpipeError(f"{p}: not a visionpipe checkpoint (no task/config inside); export needs one")
    loaded = load_config(str(p), data=state["config"], manager=get_manager())
    task = get_manager().task(state["task"])(loaded.config, None)
    model = task.build_model(state.get("info", {}), pretrained=False)
    model.load_state_dict(state.get("ema") or state["model"])
    return task, model.eval(), state


def module_from_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, ExportSpec]:
    """The export module and spec (no parity inputs) for a checkpoint."""
    task, model, state = task_and_model_from_checkpoint(path)
    spec = task.export_spec(model, None, state.get("info", {}), 0)
    return spec.module, spec
