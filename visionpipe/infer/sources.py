"""Input files for predict: a file, a folder (recursive), a glob or a .txt list; sharded disjointly."""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from visionpipe.errors import VisionpipeError
from visionpipe.images import is_image_file, iter_image_files

LIST_SUFFIXES = (".txt", ".lst")


def parse_shard(text: str | None) -> tuple[int, int]:
    """``'I/N'`` → (I, N) with 0 <= I < N; None → from torchrun's RANK/WORLD_SIZE, else (0, 1)."""
    if text is None:
        try:
            i, n = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        except ValueError:
            raise VisionpipeError("RANK/WORLD_SIZE must be integers (set by torchrun)") from None
        if not (n > 0 and 0 <= i < n):
            raise VisionpipeError(f"RANK={i} WORLD_SIZE={n}: need 0 <= RANK < WORLD_SIZE")
        return i, n
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise VisionpipeError(f"--shard expects I/N, e.g. 0/4 (got '{text}')") from None
    if not (n > 0 and 0 <= i < n):
        raise VisionpipeError(f"--shard {text}: need 0 <= I < N")
    return i, n


def shard_suffix(shard: tuple[int, int]) -> str:
    """File-name suffix of a shard's outputs: '' unsharded, else '.shard{I}of{N}'."""
    return f".shard{shard[0]}of{shard[1]}" if shard[1] > 1 else ""


def _list_file(p: Path) -> Iterator[Path]:
    base = p.parent
    with open(p, encoding="utf-8") as f:  # streamed: a list of millions of paths is never held in memory
        for line in f:
            name = line.strip()
            if name and not name.startswith("#"):
                q = Path(name)
                yield q if q.is_absolute() else base / q


def check_source(source: str) -> None:
    """Raise VisionpipeError unless ``source`` is an existing file or folder, or a glob pattern."""
    if not (os.path.exists(source) or any(c in source for c in "*?[")):
        raise VisionpipeError(f"{source}: no such file, folder or glob")


def _all_files(source: str, accept: Callable[[str | os.PathLike], bool]) -> Iterator[Path]:
    p = Path(source)
    if p.is_dir():
        if accept is is_image_file:
            return iter_image_files(p)
        return (q for q in sorted(p.rglob("*")) if q.is_file() and accept(q))
    if p.is_file():
        if p.suffix.lower() in LIST_SUFFIXES and accept is is_image_file:
            return _list_file(p)
        return iter([p])
    if any(c in source for c in "*?["):
        return (Path(q) for q in sorted(glob.iglob(source, recursive=True)) if accept(q) and os.path.isfile(q))
    raise VisionpipeError(f"{source}: no such file, folder or glob")


def _scanned_root(source: str) -> str | None:
    """The folder a folder or glob source is read from (absolute); None for a file or a list of files."""
    if os.path.isdir(source):
        return os.path.abspath(source)
    if any(c in source for c in "*?["):
        head = source[:min(source.index(c) for c in "*?[" if c in source)]
        return os.path.abspath(os.path.dirname(head) or ".")
    return None


def iter_indexed(source: str, shard: tuple[int, int] = (0, 1),
                 accept: Callable[[str | os.PathLike], bool] = is_image_file,
                 exclude: str | os.PathLike | None = None) -> Iterator[tuple[int, Path]]:
    """(index in the whole input, path) for this shard's files, in a deterministic order.

    The order is sorted per folder (recursive), a list file's line order, or a glob's sorted
    matches. Shard I of N takes every N-th input from I, so N shards are disjoint and complete.
    Files under ``exclude`` (predict's output folder, where it draws and writes masks) are no inputs
    when that folder lies inside the folder (or a glob's folder) being read; an ``exclude`` that is
    the source folder itself or above it excludes nothing (every input would be under it).
    """
    i, n = shard
    files = _all_files(source, accept)
    root = _scanned_root(source)
    if exclude is not None and root is not None:
        inside = os.path.join(os.path.abspath(exclude), "")
        if inside.startswith(os.path.join(root, "")) and inside != os.path.join(root, ""):
            files = (p for p in files if not os.path.abspath(p).startswith(inside))
    for k, path in enumerate(files):
        if k % n == i:
            yield k, path


def iter_sources(source: str, shard: tuple[int, int] = (0, 1),
                 accept: Callable[[str | os.PathLike], bool] = is_image_file) -> Iterator[Path]:
    """Files named by ``source`` in a deterministic order; only every N-th from I when sharded."""
    for _, path in iter_indexed(source, shard, accept):
        yield path
