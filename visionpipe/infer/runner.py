"""Streaming batch prediction over image files of any count, with flat memory.

A pool of decoder threads reads and preprocesses images ahead of the model (bounded
look-ahead, so memory does not grow with the input); outputs are appended and flushed
per batch; a re-run skips paths already written (resume without duplicates).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from visionpipe.engine.progress import make_progress
from visionpipe.errors import ImageReadError
from visionpipe.images import read_image
from visionpipe.infer.backends import Backend
from visionpipe.infer.sources import iter_sources, parse_shard
from visionpipe.io import append_jsonl, write_json
from visionpipe.task import Predictor

log = logging.getLogger(__name__)


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int, window: int) -> Iterator[Any]:
    """``map(fn, items)`` on a thread pool, in input order, with at most ``window`` items in flight."""
    if workers <= 0:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        pending: deque[Future] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


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
            except (ValueError, KeyError):
                break
            good_bytes += len(raw)
    if good_bytes != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
        log.warning("%s: dropped a partial last line left by an interrupted run", path)
    return done


def default_workers() -> int:
    """Decoder threads: one per core, at least 1."""
    return max(1, (os.cpu_count() or 2))


def _stack(items: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([it[k] for it in items]) for k in items[0]}


def predict_images(backend: Backend, predictor: Predictor, source: str, out_dir: Path,
                   options: dict[str, Any]) -> dict[str, Any]:
    """Predict every image under ``source``; write predictions.jsonl, errors.jsonl and a summary."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bs = int(options.get("batch_size") or 16)
    workers = int(options.get("workers") or default_workers())
    shard = parse_shard(options.get("shard"))
    suffix = f".shard{shard[0]}of{shard[1]}" if shard[1] > 1 else ""
    pred_file = out_dir / f"predictions{suffix}.jsonl"
    err_file = out_dir / f"errors{suffix}.jsonl"
    done = read_done(pred_file) | read_done(err_file)
    if done:
        log.info("resuming: %d input(s) already done are skipped", len(done))
    save_images = bool(options.get("save_images"))
    img_dir = out_dir / "images"
    src_root = Path(source) if Path(source).is_dir() else None

    paths = (p for p in iter_sources(source, shard) if str(p) not in done)

    def load(p: Path) -> tuple[Path, Any, Any, np.ndarray | None]:
        try:
            img = read_image(p)
            feed, state = predictor.preprocess(img)
            return p, feed, state, img if save_images else None
        except ImageReadError as e:
            return p, None, e.reason, None
        except Exception as e:  # a bad file must never stop the run
            return p, None, f"{type(e).__name__}: {e}", None

    n_ok = n_err = 0
    t0 = time.perf_counter()
    progress = make_progress()
    with open(pred_file, "a", encoding="utf-8") as fp, open(err_file, "a", encoding="utf-8") as fe, progress:
        bar = progress.add_task("predict", total=None, info="")
        batch: list[tuple[Path, dict, Any, np.ndarray | None]] = []

        def flush() -> None:
            nonlocal n_ok
            if not batch:
                return
            groups: list[list] = []
            if predictor.batchable:
                for item in batch:  # consecutive items of the same input shapes run together
                    key = tuple((k, v.shape) for k, v in item[1].items())
                    if groups and groups[-1][0] == key:
                        groups[-1][1].append(item)
                    else:
                        groups.append([key, [item]])
            else:
                groups = [[None, [item]] for item in batch]
            for _, items in groups:
                outs = backend.run(_stack([it[1] for it in items]))
                for j, (p, _, state, img) in enumerate(items):
                    rec = predictor.postprocess([o[j] for o in outs], state)
                    rec = {"path": str(p), **rec}
                    if img is not None:
                        drawn = predictor.draw(img, rec)
                        if drawn is not None:
                            _save_drawing(drawn, img_dir, p, src_root)
                    append_jsonl(fp, rec)
                    n_ok += 1
            batch.clear()

        for p, feed, state, img in ordered_map(load, paths, workers, window=max(2 * bs, 4 * workers)):
            if feed is None:
                append_jsonl(fe, {"path": str(p), "error": state})
                n_err += 1
                log.warning("skipped %s: %s", p, state)
            else:
                batch.append((p, feed, state, img))
                if len(batch) >= bs:
                    flush()
            total = n_ok + n_err + len(batch)
            progress.update(bar, completed=total, info=f"{total / max(time.perf_counter() - t0, 1e-9):.1f} img/s")
        flush()
    seconds = time.perf_counter() - t0
    extra = predictor.write_extra(out_dir, _iter_jsonl(pred_file))
    summary = {"images": n_ok, "errors": n_err, "skipped_already_done": len(done), "seconds": round(seconds, 3),
               "images_per_second": round(n_ok / seconds, 2) if seconds > 0 else None,
               "predictions": str(pred_file), "errors_file": str(err_file), "shard": f"{shard[0]}/{shard[1]}",
               "backend": getattr(backend, "name", "?"), "extra": [str(e) for e in extra]}
    write_json(out_dir / f"summary{suffix}.json", summary)
    log.info("predicted %d image(s), %d error(s), %.1f img/s -> %s", n_ok, n_err,
             summary["images_per_second"] or 0.0, pred_file)
    return summary


def _iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _save_drawing(img: np.ndarray, img_dir: Path, src: Path, src_root: Path | None) -> None:
    import cv2

    from visionpipe.io import atomic_path

    rel = src.relative_to(src_root) if src_root and src_root in src.parents else Path(src.name)
    dest = (img_dir / rel).with_suffix(".png")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        cv2.imwrite(str(tmp), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))


def merge_outputs(folder: Path, out: Path | None = None) -> dict[str, Any]:
    """Merge sharded ``predictions.shard*.jsonl`` / ``errors.shard*.jsonl`` files, sorted by path."""
    folder = Path(folder)
    out = Path(out or folder)
    result = {}
    for kind in ("predictions", "errors"):
        parts = sorted(folder.glob(f"{kind}.shard*.jsonl"))
        recs: dict[str, dict] = {}
        for part in parts:
            for r in _iter_jsonl(part):
                recs[r["path"]] = r
        from visionpipe.io import atomic_open

        with atomic_open(out / f"{kind}.jsonl", "w", encoding="utf-8") as f:
            for k in sorted(recs):
                f.write(json.dumps(recs[k]) + "\n")
        result[kind] = {"shards": len(parts), "records": len(recs)}
    return result
