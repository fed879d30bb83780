"""Predict outputs: append-only JSONL written per batch, resume bookkeeping, merging of shards."""

from __future__ import annotations

import heapq
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from visionpipe.errors import VisionpipeError
from visionpipe.io import atomic_open, write_json

log = logging.getLogger(__name__)
KINDS = ("predictions", "errors")
_ENCODER = json.JSONEncoder(default=str)  # one encoder (json.dumps(default=...) builds a new one per call)
_SHARD_RE = re.compile(r"^(?P<kind>predictions|errors|summary)\.shard(?P<i>\d+)of(?P<n>\d+)\.jsonl?$")


def iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a JSONL file, one at a time."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def read_done(path: Path) -> set[str]:
    """Paths already recorded in a JSONL output; a torn last line (killed writer) is cut off."""
    done: set[str] = set()
    if not path.is_file():
        return done
    good_bytes = 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                done.add(json.loads(raw)["path"])
            except (ValueError, KeyError, TypeError):
                break
            good_bytes += len(raw)
    if good_bytes != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
        log.warning("%s: dropped a partial last line left by an interrupted run", path)
    return done


class JsonlAppender:
    """Appends records to a JSONL file; each :meth:`write` is one write + flush, so a kill loses only
    records not yet handed to it (and at worst leaves a torn last line that resume cuts off)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f: IO[str] = open(path, "a", encoding="utf-8")

    def write(self, records: list[dict[str, Any]]) -> None:
        """Append ``records`` and flush them to the OS."""
        if records:
            self._f.write("".join(_ENCODER.encode(r) + "\n" for r in records))
            self._f.flush()

    def close(self) -> None:
        """Close the file."""
        self._f.close()


class _Unsorted(Exception):
    pass


def _by_index(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    last = -1
    for r in iter_jsonl(path):
        k = r.get("index")
        if not isinstance(k, int) or k < last:
            raise _Unsorted(str(path))
        last = k
        yield k, r


def _strip(r: dict[str, Any]) -> dict[str, Any]:
    r.pop("index", None)
    return r


def _merge_kind(parts: list[Path], dest: Path) -> int:
    """Merge shard files into ``dest`` in input order (streaming); fall back to path order in memory."""
    count = 0
    try:
        with atomic_open(dest, "w", encoding="utf-8") as f:
            last = None
            for k, r in heapq.merge(*(_by_index(p) for p in parts), key=lambda kr: kr[0]):
                if k == last:
                    continue  # the same input written twice (shards re-run): keep one
                last = k
                f.write(json.dumps(_strip(r), default=str) + "\n")
                count += 1
        return count
    except _Unsorted as e:
        log.warning("%s has no input index or is out of order; merging in path order (in memory)", e)
    recs: dict[str, dict[str, Any]] = {}
    for part in parts:
        for r in iter_jsonl(part):
            recs[r["path"]] = _strip(r)
    with atomic_open(dest, "w", encoding="utf-8") as f:
        for key in sorted(recs):
            f.write(json.dumps(recs[key], default=str) + "\n")
    return len(recs)


def find_shards(folder: Path) -> dict[int, dict[str, dict[int, Path]]]:
    """N → kind → shard index → file, for every ``<kind>.shard<I>of<N>.json[l]`` in ``folder``."""
    found: dict[int, dict[str, dict[int, Path]]] = {}
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        m = _SHARD_RE.match(p.name)
        if m:
            found.setdefault(int(m["n"]), {}).setdefault(m["kind"], {})[int(m["i"])] = p
    return found


def merge_outputs(folder: Path, out: Path | None = None, partial: bool = False) -> dict[str, Any]:
    """Merge ``predictions.shard*.jsonl`` / ``errors.shard*.jsonl`` of one sharded run into one file each.

    The merged files list records in the order an unsharded run writes them. Every shard
    1..N must be present (its predictions or errors file) unless ``partial``.
    """
    folder = Path(folder)
    out = Path(out or folder)
    found = find_shards(folder)
    if not found:
        raise VisionpipeError(f"{folder}: no predictions.shard<I>of<N>.jsonl files to merge")
    if len(found) > 1:
        raise VisionpipeError(f"{folder}: shard files of different runs (N = {', '.join(map(str, sorted(found)))}); "
                              f"keep one run's files per folder")
    (n, kinds), = found.items()
    present = set(kinds.get("predictions", {})) | set(kinds.get("errors", {}))
    missing = sorted(set(range(n)) - present)
    if missing and not partial:
        raise VisionpipeError(f"{folder}: shard(s) {', '.join(f'{i}/{n}' for i in missing)} have no output yet; "
                              f"run them (or merge with --partial)")
    result: dict[str, Any] = {"shards": n, "missing_shards": missing}
    for kind in KINDS:
        parts = [kinds.get(kind, {})[i] for i in sorted(kinds.get(kind, {}))]
        result[kind] = {"files": len(parts), "records": _merge_kind(parts, out / f"{kind}.jsonl")}
    summaries = [json.loads(p.read_text()) for _, p in sorted(kinds.get("summary", {}).items())]
    if summaries:
        merged = {"images": sum(s.get("images", 0) for s in summaries),
                  "errors": sum(s.get("errors", 0) for s in summaries),
                  "shards": n, "missing_shards": missing,
                  "slowest_shard_seconds": max(s.get("seconds", 0) for s in summaries),
                  "per_shard": summaries}
        write_json(out / "summary.json", merged)
        result["summary"] = str(out / "summary.json")
    log.info("merged %d shard(s): %d prediction(s), %d error(s) -> %s", n, result["predictions"]["records"],
             result["errors"]["records"], out)
    return result
