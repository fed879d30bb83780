"""Atomic file writes: a temporary file in the same folder, fsync, then rename."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

TMP_PREFIX = ".vp-tmp-"


@functools.cache
def _new_file_mode() -> int:
    """Permissions a plain ``open(path, "w")`` would give a new file (0o666 less the umask)."""
    try:  # Linux: read the umask without changing it (changing it races with other threads)
        with open("/proc/self/status", encoding="ascii") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def _mkstemp_like_open(target: Path, suffix: str = "") -> tuple[int, str]:
    """A temporary file next to ``target`` with the permissions ``open()`` would give it (mkstemp's are 0600)."""
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + target.name + ".", dir=target.parent, suffix=suffix)
    with contextlib.suppress(OSError):
        os.fchmod(fd, _new_file_mode())
    return fd, tmp


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: not every platform can open a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kw: Any) -> Iterator[IO]:
    """Open a temporary sibling of ``path``; on success move it into place, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _mkstemp_like_open(path)
    try:
        with os.fdopen(fd, mode, **kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_path(path: str | os.PathLike) -> contextlib.AbstractContextManager[Path]:
    """Yield a temporary path next to ``path`` for writers that take a filename; fsync and rename it after."""

    @contextlib.contextmanager
    def _ctx() -> Iterator[Path]:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _mkstemp_like_open(target, suffix=target.suffix)
        os.close(fd)
        try:
            yield Path(tmp)
            fd = os.open(tmp, os.O_RDONLY)  # the writer closed the file; its data must be on disk before the rename
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, target)
            _fsync_dir(target.parent)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    return _ctx()


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write text atomically."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (indented, keys in insertion order)."""
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def append_jsonl(f: IO, record: dict) -> None:
    """Append one JSON line and flush it to disk."""
    f.write(json.dumps(record, default=str) + "\n")
    f.flush()


def clean_stale_tmp(folder: str | os.PathLike, only: Callable[[Path], bool] | None = None) -> list[Path]:
    """Remove temporary files left by a killed writer under ``folder`` (those ``only`` accepts); return them."""
    removed = []
    root = Path(folder)
    for p in root.rglob(TMP_PREFIX + "*") if root.is_dir() else []:
        try:
            if p.is_file() and (only is None or only(p)):
                p.unlink()
                removed.append(p)
        except FileNotFoundError:  # its writer finished meanwhile
            continue
    return removed


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
