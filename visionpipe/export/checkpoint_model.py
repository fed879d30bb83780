"""Rebuild a task's model from a visionpipe checkpoint (for export and predict)."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from visionpipe.config import load_config
from visionpipe.engine.checkpoint import load_checkpoint, state_mismatch
from visionpipe.errors import VisionpipeError
from visionpipe.manager import get_manager
from visionpipe.task import ExportSpec, Task


def task_and_model_from_checkpoint(path: str | os.PathLike) -> tuple[Task, nn.Module, dict]:
    """(task instance, model with the checkpoint's best weights, checkpoint dict)."""
    p = Path(path)
    state = load_checkpoint(p)
    if not isinstance(state.get("config"), dict) or not isinstance(state.get("task"), str):
        raise VisionpipeError(f"{p}: not a visionpipe checkpoint (no task name and config inside); "
                              "export and predict need one written by `visionpipe run`")
    loaded = load_config(str(p), data=state["config"], manager=get_manager())
    task = get_manager().task(state["task"])(loaded.config, None)
    model = task.build_model(state.get("info") if isinstance(state.get("info"), dict) else {}, pretrained=False)
    weights = state.get("ema") or state.get("model")
    problem = state_mismatch(model.state_dict(), weights) if isinstance(weights, dict) else "no model weights"
    if problem:
        raise VisionpipeError(f"{p}: its weights do not fit the model its config builds ({problem})")
    model.load_state_dict(weights)
    return task, model.eval(), state


def module_from_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, ExportSpec]:
    """The export module and spec (no parity inputs) for a checkpoint."""
    task, model, state = task_and_model_from_checkpoint(path)
    spec = task.export_spec(model, None, state.get("info", {}), 0)
    return spec.module, spec
