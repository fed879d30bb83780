"""Rich progress bars that stay quiet when disabled (callers disable them off rank 0)."""

from __future__ import annotations

import os
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


def progress_enabled() -> bool:
    """False when VISIONPIPE_PROGRESS=0 (e.g. logs to a file)."""
    return os.environ.get("VISIONPIPE_PROGRESS", "1") != "0"


def make_progress(transient: bool = False, enabled: bool = True) -> Progress:
    """A progress bar with count, elapsed, ETA and a free-text field ``info``."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
        console=console, transient=transient, disable=not (enabled and progress_enabled()),
    )


def fmt(values: dict[str, Any]) -> str:
    """``k=v`` pairs with short floats."""
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
