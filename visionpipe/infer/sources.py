"""Input files for predict: a file, a folder (recursive) or a glob; sharded disjointly."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from pathlib import Path

from visionpipe.errors import VisionpipeError
from visionpipe.images import is_image_file, iter_image_files


def parse_shard(text: str | None) -> tuple[int, int]:
    """``'I/N'`` → (I, N) with 0 <= I < N; None → from torchrun's RANK/WORLD_SIZE, else (0, 1)."""
    if text is None:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise VisionpipeError(f"--shard expects I/N, e.g. 0/4 (got '{text}')") from None
    if not (n > 0 and 0 <= i < n):
        raise VisionpipeError(f"--shard {text}: need 0 <= I < N")
    return i, n


def iter_sources(source: str, shard: tuple[int, int] = (0, 1),
                 accept: callable = is_image_file) -> Iterator[Path]:
    """Files named by ``source`` in a deterministic order; only every N-th from I when sharded."""
    p = Path(source)
    if p.is_dir():
        it: Iterator[Path] = iter_image_files(p) if accept is is_image_file else (
            q for q in sorted(p.rglob("*")) if q.is_file() and accept(q))
    elif p.is_file():
        if p.suffix.lower() in (".txt", ".lst") and accept is is_image_file:
            base = p.parent
            it = (Path(line.strip()) if Path(line.strip()).is_absolute() else base / line.strip()
                  for line in p.read_text(encoding="utf-8").splitlines() if line.strip())
        else:
            it = iter([p])
    elif any(c in source for c in "*?["):
        it = (Path(q) for q in sorted(glob.iglob(source, recursive=True)) if accept(q))
    else:
        raise VisionpipeError(f"{source}: no such file, folder or glob")
    i, n = shard
    for k, path in enumerate(it):
        if k % n == i:
            yield path
