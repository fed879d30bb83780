"""Predict outputs: append-only JSONL written per batch, resume bookkeeping, merging of shards."""

from __future__ import annotations

import heapq
import json
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from visionpipe.errors import VisionpipeError
from visionpipe.io import atomic_open, clean_stale_tmp, write_json

log = logging.getLogger(__name__)
KINDS = ("predictions", "errors")
_ENCODER = json.JSONEncoder(default=str)  # one encoder (json.dumps(default=...) builds a new one per call)
_SHARD_RE = re.compile(r"^(?P<kind>predictions|errors|summary|fingerprint)\.shard(?P<i>\d+)of(?P<n>\d+)\.jsonl?$")
FINGERPRINT = "fingerprint"
"""``fingerprint.json`` (``fingerprint.shardIofN.json``): the model and options that made the predictions beside it."""
STALE_TMP_SECONDS = 600
"""A temporary file of another shard this much older than now is left over from a kill (a write takes moments)."""


def iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a JSONL file, one at a time; a torn last line (a killed writer) is skipped with a warning."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                if not line.endswith("\n"):
                    log.warning("%s:%d: skipped a partial last line left by an interrupted run", path, lineno)
                    return
                raise VisionpipeError(f"{path}:{lineno}: not a JSON record ({e})") from None
            if not isinstance(record, dict):
                raise VisionpipeError(f"{path}:{lineno}: not a JSON record (an object) but {type(record).__name__}")
            yield record


def read_done(path: Path) -> set[str]:
    """Paths already recorded in a JSONL output; a torn last line (killed writer) is cut off.

    A broken line with records after it is no torn line: an error naming it, and nothing is cut."""
    done: set[str] = set()
    if not path.is_file():
        return done
    good_bytes = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                if not raw.endswith(b"\n"):
                    raise ValueError("no end of line")
                if raw.strip():
                    done.add(json.loads(raw)["path"])
            except (ValueError, KeyError, TypeError) as e:
                if any(rest.strip() for rest in f):  # records (not just blank lines) after it
                    raise VisionpipeError(f"{path}:{lineno}: not a predict record ({type(e).__name__}: {e}) and more "
                                          "records follow; repair or move the file, or predict again with --overwrite"
                                          ) from None
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


def shard_files(out_dir: Path, suffix: str) -> list[Path]:
    """The files one predict run (of one shard) writes and resumes from: predictions, errors, summary, fingerprint."""
    return [out_dir / f"predictions{suffix}.jsonl", out_dir / f"errors{suffix}.jsonl", out_dir / f"summary{suffix}.json",
            out_dir / f"{FINGERPRINT}{suffix}.json"]


def read_fingerprint(path: Path) -> dict[str, Any] | None:
    """The fingerprint in ``path``; None when there is none (or it cannot be read)."""
    try:
        fp = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return fp if isinstance(fp, dict) else None


def fingerprint_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What differs between two fingerprints, as 'model sha256 A → B, top_k 5 → 2' ('' when they match)."""
    parts = []
    a, b = old.get("model_sha256"), new.get("model_sha256")
    if a != b:
        parts.append(f"model sha256 {str(a)[:12]} → {str(b)[:12]}")
    o, n = old.get("options") or {}, new.get("options") or {}
    for k in sorted(set(o) | set(n)):
        if o.get(k) != n.get(k):
            parts.append(f"{k} {o.get(k)!r} → {n.get(k)!r}")
    return ", ".join(parts)


def clean_stale_temp(out_dir: Path, shard: tuple[int, int]) -> list[Path]:
    """Remove temporary files (``.vp-tmp-*``) a killed predict left in ``out_dir`` and its sub-folders.

    Other shards may be writing into the same folder: a sharded run removes only its own files and
    those untouched for :data:`STALE_TMP_SECONDS`."""
    if shard[1] == 1:
        return clean_stale_tmp(out_dir)
    own, old = f".shard{shard[0]}of{shard[1]}.", time.time() - STALE_TMP_SECONDS
    return clean_stale_tmp(out_dir, lambda p: own in p.name or p.stat().st_mtime < old)


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


def _same_fingerprint(folder: Path, n: int, files: dict[int, Path], present: set[int]) -> dict[str, Any] | None:
    """The fingerprint every shard with output shares; an error naming the shards when they differ.

    None when a shard has no fingerprint (written by an older visionpipe): nothing to compare."""
    prints = {i: read_fingerprint(files[i]) if i in files else None for i in sorted(present)}
    if not prints or any(fp is None for fp in prints.values()):
        return None
    first_i, first = next(iter(prints.items()))
    for i, fp in prints.items():
        diff = fingerprint_difference(first, fp)  # type: ignore[arg-type]
        if diff:
            raise VisionpipeError(f"{folder}: shards {first_i}/{n} and {i}/{n} come from different models or options "
                                  f"({diff}); predict shard {i}/{n} again like the others, with --overwrite")
    return first


def merge_outputs(folder: Path, out: Path | None = None, partial: bool = False) -> dict[str, Any]:
    """Merge ``predictions.shard*.jsonl`` / ``errors.shard*.jsonl`` of one sharded run into one file each.

    The merged files list records in the order an unsharded run writes them. Every shard
    1..N must be present (its predictions or errors file) and finished (its summary file) unless ``partial``.
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
    unfinished = sorted(present - set(kinds.get("summary", {})))  # a shard writes its summary when it ends
    if unfinished and not partial:
        raise VisionpipeError(f"{folder}: shard(s) {', '.join(f'{i}/{n}' for i in unfinished)} have not finished (no "
                              f"summary.shard<I>of{n}.json: killed or failed?); run them again to resume them "
                              f"(or merge with --partial)")
    fingerprint = _same_fingerprint(folder, n, kinds.get(FINGERPRINT, {}), present)
    result: dict[str, Any] = {"shards": n, "missing_shards": missing, "unfinished_shards": unfinished}
    for kind in KINDS:
        parts = [kinds.get(kind, {})[i] for i in sorted(kinds.get(kind, {}))]
        result[kind] = {"files": len(parts), "records": _merge_kind(parts, out / f"{kind}.jsonl")}
    summaries = [json.loads(p.read_text()) for _, p in sorted(kinds.get("summary", {}).items())]
    if summaries:
        # the merged records, not the shards' summaries: a resumed shard's summary counts its last run only
        merged = {"images": result["predictions"]["records"], "errors": result["errors"]["records"],
                  "shards": n, "missing_shards": missing, "unfinished_shards": unfinished,
                  "slowest_shard_seconds": max(s.get("seconds", 0) for s in summaries),
                  "per_shard": summaries}
        write_json(out / "summary.json", merged)
        result["summary"] = str(out / "summary.json")
    if fingerprint is not None:  # the merged folder resumes like one unsharded run's
        write_json(out / f"{FINGERPRINT}.json", fingerprint)
    log.info("merged %d shard(s): %d prediction(s), %d error(s) -> %s", n, result["predictions"]["records"],
             result["errors"]["records"], out)
    return result
