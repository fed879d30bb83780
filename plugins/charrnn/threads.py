"""Run hooks that apply ``train.cpu_threads`` for the length of a char-RNN run on the CPU."""

from __future__ import annotations

import logging
from typing import Any

import torch

from visionpipe import hookimpl

log = logging.getLogger(__name__)
_saved: list[int] = []


def _is_charrnn_cpu_run(ctx: Any) -> int | None:
    from visionpipe_plugins.charrnn.task import CharRnnTask

    train = getattr(ctx.cfg, "train", None)
    threads = getattr(train, "cpu_threads", None)
    if isinstance(ctx.task, CharRnnTask) and threads and ctx.device.type == "cpu":
        return int(threads)
    return None


def _restore() -> None:
    if _saved:
        torch.set_num_threads(_saved.pop())


@hookimpl
def visionpipe_before_run(ctx: Any) -> None:
    """Set PyTorch's CPU thread count from ``train.cpu_threads``."""
    threads = _is_charrnn_cpu_run(ctx)
    if threads:
        _saved.append(torch.get_num_threads())
        torch.set_num_threads(threads)
        log.info("PyTorch CPU threads: %d (train.cpu_threads)", threads)


@hookimpl
def visionpipe_after_run(ctx: Any, metrics: dict[str, float]) -> None:
    """Give the previous thread count back."""
    if _is_charrnn_cpu_run(ctx):
        _restore()


@hookimpl
def visionpipe_on_stage_error(stage: str, ctx: Any, error: BaseException) -> None:
    """Give the previous thread count back when the run fails."""
    if _is_charrnn_cpu_run(ctx):
        _restore()
