"""Every visionpipe hook, typed and documented. No logic lives here.

A plugin is a module (or object) with functions named like these specs and decorated
with :data:`visionpipe.hookimpl`. Built-in tasks and third-party packages register the
same way: an entry point in the ``visionpipe`` group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import typer

    from visionpipe.pipeline import RunContext, StageDef
    from visionpipe.task import Task

hookspec = pluggy.HookspecMarker("visionpipe")
hookimpl = pluggy.HookimplMarker("visionpipe")


@hookspec
def visionpipe_register_tasks(register: Callable[[type[Task]], None]) -> None:
    """Register task classes; call ``register(TaskClass)`` once per task."""


@hookspec
def visionpipe_register_stages(register: Callable[[StageDef], None]) -> None:
    """Register extra stage kinds; call ``register(StageDef(...))`` once per stage.

    A stage's config block is validated by ``StageDef.config`` (a pydantic model) and the
    stage runs after the built-in stages unless the pipeline's ``stages:`` list orders it.
    """


@hookspec
def visionpipe_register_commands(app: typer.Typer) -> None:
    """Add sub-commands to the ``visionpipe`` CLI (``@app.command()``)."""


@hookspec
def visionpipe_before_run(ctx: RunContext) -> None:
    """Called once the run folder exists, before the first stage."""


@hookspec
def visionpipe_before_stage(stage: str, ctx: RunContext) -> None:
    """Called before each stage runs."""


@hookspec
def visionpipe_after_stage(stage: str, ctx: RunContext, result: Any) -> None:
    """Called after each stage finished; ``result`` is what the stage returned."""


@hookspec
def visionpipe_on_stage_error(stage: str, ctx: RunContext, error: BaseException) -> None:
    """Called when a stage raises, before the error propagates."""


@hookspec
def visionpipe_on_epoch_end(ctx: RunContext, epoch: int, metrics: dict[str, float]) -> None:
    """Called by the training engine after every epoch with that epoch's metrics."""


@hookspec
def visionpipe_after_run(ctx: RunContext, metrics: dict[str, float]) -> None:
    """Called once all stages finished successfully."""
