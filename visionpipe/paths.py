"""Resolve user-given paths and refuse those that escape their root."""

from __future__ import annotations

import os
from pathlib import Path

from visionpipe.errors import UnsafePathError


def resolve_under(root: str | os.PathLike, relative: str | os.PathLike, what: str = "path") -> Path:
    """Resolve ``relative`` against ``root``; raise UnsafePathError if it lands outside ``root``."""
    root_r = Path(root).resolve()
    rel = Path(relative)
    candidate = (rel if rel.is_absolute() else root_r / rel).resolve()
    if candidate != root_r and root_r not in candidate.parents:
        raise UnsafePathError(f"{what} '{relative}' resolves to {candidate}, outside its root {root_r}; refused")
    return candidate


def resolve_config_path(base_dir: str | os.PathLike, value: str | os.PathLike) -> Path:
    """Resolve a path written in a config file relative to that file's folder (absolute stays)."""
    p = Path(os.path.expandvars(os.path.expanduser(str(value))))
    return (p if p.is_absolute() else Path(base_dir) / p).resolve()
