"""Streaming batch prediction over image files of any count, with flat memory.

Two bounded stages run ahead of the main thread: decoders read and preprocess images, and
``streams`` model runners each run one batch at a time (several single-threaded model runs
at once keep every core busy without the synchronisation cost of splitting one small batch
over all cores). The main thread postprocesses and writes in input order. Outputs are appended
and flushed per batch; a re-run skips paths already written (resume without duplicates); a bad
file becomes a line of errors.jsonl, never a crash.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from visionpipe.engine.progress import make_progress
from visionpipe.errors import ImageReadError, VisionpipeError
from visionpipe.images import read_image
from visionpipe.infer.backends import Backend, usable_cores
from visionpipe.infer.outputs import (
    FINGERPRINT,
    JsonlAppender,
    clean_stale_temp,
    fingerprint_difference,
    iter_jsonl,
    merge_outputs,
    read_done,
    read_fingerprint,
    shard_files,
)
from visionpipe.infer.pool import POOLS, ordered_map
from visionpipe.infer.sources import check_source, iter_indexed, iter_sources, parse_shard, shard_suffix
from visionpipe.io import sha256_file, write_json
from visionpipe.task import Predictor

if TYPE_CHECKING:
    from visionpipe.task import Task

__all__ = ["run_predict", "predict_images", "merge_outputs", "read_done", "ordered_map", "default_workers",
           "iter_sources"]

log = logging.getLogger(__name__)
DEFAULT_BATCH = 16
MAX_FAILURES_BEFORE_FIRST_SUCCESS = 16
LOGGED_ERRORS = 20


def default_workers(backend: Backend | None = None) -> int:
    """Decoder threads: one per core for a model off the CPU; for a CPU model, a quarter of the cores.

    A model on the CPU already has one runner per core; on small machines (< 4 cores) the main
    thread decodes in between, which costs less than handing every image between threads.
    """
    cores = usable_cores()
    if backend is not None and getattr(backend, "on_cpu", False):
        return cores // 4
    return cores


@dataclass(frozen=True)
class Settings:
    """The predict engine's knobs, from the ``options`` dict of :func:`predict_images`."""

    batch_size: int = DEFAULT_BATCH
    workers: int = 1
    pool: str = "threads"
    window: int = 2 * DEFAULT_BATCH
    streams: int = 1
    shard: tuple[int, int] = (0, 1)
    save_images: bool = False
    count_total: bool = True
    pin: bool | None = None

    @classmethod
    def from_options(cls, options: dict[str, Any], backend: Backend | None = None) -> Settings:
        """Validated settings; missing values get defaults sized from the core count and the backend."""
        bs = int(options.get("batch_size") or DEFAULT_BATCH)
        w = options.get("workers")
        workers = default_workers(backend) if w is None else int(w)
        streams = int(getattr(backend, "streams", 1) or 1)
        pool = str(options.get("decode") or options.get("pool") or "threads")
        if bs < 1 or workers < 0:
            raise VisionpipeError(f"batch_size must be >= 1 and workers >= 0 (got {bs}, {workers})")
        if pool not in POOLS:
            raise VisionpipeError(f"--decode {pool}: use one of {', '.join(POOLS)}")
        window = int(options.get("prefetch") or max(2 * bs, 4 * workers))
        pin = options.get("pin")
        return cls(bs, workers, pool, window, streams, parse_shard(options.get("shard")),
                   bool(options.get("save_images")), options.get("count_total", True) is not False,
                   None if pin is None or pin == "auto" else bool(pin))


@dataclass(slots=True)
class Decoded:
    """One input after decode + preprocess (or the reason it failed)."""

    index: int
    path: Path
    feed: dict[str, np.ndarray] | None = None
    state: Any = None
    image: np.ndarray | None = None
    error: str | None = None


@dataclass
class _Decoder:
    """Picklable decode + preprocess step (runs in decoder threads or processes)."""

    predictor: Predictor
    keep_image: bool

    def __call__(self, item: tuple[int, Path]) -> Decoded:
        k, p = item
        try:
            img = read_image(p)
            feed, state = self.predictor.preprocess(img)
            return Decoded(k, p, feed, state, img if self.keep_image else None)
        except ImageReadError as e:
            return Decoded(k, p, error=e.reason)
        except Exception as e:  # a bad file must never stop the run
            return Decoded(k, p, error=f"preprocess failed: {type(e).__name__}: {e}")


@dataclass
class Stats:
    """Counts and where the time went (model runs, decoding, postprocess + writing)."""

    ok: int = 0
    errors: int = 0
    model_s: float = 0.0
    decode_s: float = 0.0
    output_s: float = 0.0
    batches: int = 0
    error_reasons: dict[str, int] = field(default_factory=dict)


@dataclass
class _Batch:
    """Inputs that go to the model together, the unusable ones met on the way, and the results."""

    items: list[Decoded]
    failed: list[Decoded]
    outputs: list[list[np.ndarray] | None] = field(default_factory=list)
    model_s: float = 0.0


def _stack(items: list[Decoded]) -> dict[str, np.ndarray]:
    first = items[0].feed
    assert first is not None
    if len(items) == 1:
        return {k: np.ascontiguousarray(v[None]) for k, v in first.items()}
    return {k: np.stack([it.feed[k] for it in items]) for k in first}  # type: ignore[index]


def _groups(batch: list[Decoded], batchable: bool) -> list[list[Decoded]]:
    """Consecutive items with the same input shapes run together (all of them when shapes agree)."""
    if not batchable:
        return [[it] for it in batch]
    groups: list[list[Decoded]] = []
    key_of = lambda it: [(k, v.shape, v.dtype) for k, v in it.feed.items()]  # noqa: E731
    last = None
    for it in batch:
        key = key_of(it)
        if groups and key == last:
            groups[-1].append(it)
        else:
            groups.append([it])
            last = key
    return groups


def _batches(decoded: Iterator[Decoded], size: int, stats: Stats) -> Iterator[_Batch]:
    """Group decoded inputs into batches of ``size`` usable ones; unusable ones ride along to be recorded."""
    items: list[Decoded] = []
    failed: list[Decoded] = []
    while True:
        t0 = time.perf_counter()
        it = next(decoded, None)
        stats.decode_s += time.perf_counter() - t0
        if it is None:
            break
        (failed if it.error is not None else items).append(it)
        if len(items) >= size or len(failed) >= size:  # a long run of bad files is recorded as it goes
            yield _Batch(items, failed)
            items, failed = [], []
    if items or failed:
        yield _Batch(items, failed)


def runner_cores(backend: Backend, streams: int, pin: bool | None) -> list[int]:
    """Cores to pin the model runners to, one each (empty: the OS places them).

    Automatic (``pin=None``): when the model runs single-threaded on the CPU with one stream per
    usable core. Left to the OS, a runner is moved between cores whenever the main thread wakes
    to decode, and loses its caches (~2% of throughput on 2 cores); pinned, every core keeps one
    runner and the main thread fills the gaps. The runners share one queue of batches, so a
    runner on a core that something else also uses just takes fewer batches.
    """
    if pin is False or not hasattr(os, "sched_setaffinity") or not getattr(backend, "on_cpu", False):
        return []
    cores = sorted(os.sched_getaffinity(0))
    if pin is None and not (streams == len(cores) > 1 and getattr(backend, "threads", None) == 1):
        return []
    return cores


class _Engine:
    """Runs batches through the backend (from several threads) and writes records (from the main thread)."""

    def __init__(self, backend: Backend, predictor: Predictor, preds: JsonlAppender, errs: JsonlAppender,
                 indexed: bool, img_dir: Path, src_root: Path | None, cores: list[int]) -> None:
        self.backend, self.predictor = backend, predictor
        self.preds, self.errs = preds, errs
        self.indexed, self.img_dir, self.src_root = indexed, img_dir, src_root
        self.stats = Stats()
        self.model_failures = 0
        self.cores = cores  # runner_cores(): each runner thread pins itself on its first batch
        self._pinned = threading.local()
        self._lock = threading.Lock()
        self._next_core = 0

    def _pin_this_runner(self) -> None:
        if getattr(self._pinned, "done", False):
            return
        self._pinned.done = True
        with self._lock:
            core = self.cores[self._next_core % len(self.cores)]
            self._next_core += 1
        try:
            os.sched_setaffinity(0, {core})  # 0: the calling thread only
        except OSError as e:  # e.g. the core was taken away meanwhile: run unpinned
            log.debug("could not pin a model runner to core %d: %s", core, e)

    def _record(self, it: Decoded, extra: dict[str, Any]) -> dict[str, Any]:
        rec: dict[str, Any] = {"path": str(it.path)}
        if self.indexed:
            rec["index"] = it.index
        rec.update(extra)
        return rec

    def error(self, items: list[Decoded]) -> None:
        """Record inputs that could not be used, with why."""
        if not items:
            return
        recs = []
        for it in items:
            recs.append(self._record(it, {"error": it.error}))
            n = self.stats.errors + len(recs)
            if n <= LOGGED_ERRORS:
                log.warning("skipped %s: %s", it.path, it.error)
                if n == LOGGED_ERRORS:
                    log.warning("further unreadable inputs are listed only in %s", self.errs.path)
            head = re.split(r"[:(;]", it.error or "?")[0].strip()[:60]
            self.stats.error_reasons[head] = self.stats.error_reasons.get(head, 0) + 1
        self.errs.write(recs)
        self.stats.errors += len(items)

    def _run(self, items: list[Decoded]) -> list[list[np.ndarray]] | None:
        """Per-item outputs of one group, or None when the model failed on it."""
        try:
            outs = self.backend.run(_stack(items))
        except Exception as e:
            if len(items) == 1:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                items[0].error = f"model failed: {type(e).__name__}: {msg}"
            return None
        return [[o[j] for o in outs] for j in range(len(items))]

    def infer(self, batch: _Batch) -> _Batch:
        """Run the model on one batch (thread-safe); a group it fails on is retried one item at a time."""
        if self.cores:
            self._pin_this_runner()
        t0 = time.perf_counter()
        for group in _groups(batch.items, self.predictor.batchable):
            per_item = self._run(group)
            if per_item is None:  # find the culprit(s): one item at a time
                singles = [self._run([it]) for it in group] if len(group) > 1 else [None]
                per_item = [r[0] if r is not None else None for r in singles]
            batch.outputs += per_item
        batch.model_s = time.perf_counter() - t0
        return batch

    def write(self, batch: _Batch) -> None:
        """Postprocess and write one batch the model has run on, in input order."""
        t0 = time.perf_counter()
        self.stats.model_s += batch.model_s
        records: list[dict[str, Any]] = []
        failed = list(batch.failed)
        for it, outs in zip(batch.items, batch.outputs, strict=True):
            if outs is None:
                failed.append(it)
                self.model_failures += 1
                continue
            self.model_failures = 0
            try:
                rec = self._record(it, self.predictor.postprocess(outs, it.state))
            except Exception as e:
                it.error = f"postprocess failed: {type(e).__name__}: {e}"
                failed.append(it)
                continue
            if it.image is not None:
                self._draw(it, rec)
            records.append(rec)
        self.preds.write(records)
        self.error(sorted(failed, key=lambda it: it.index))
        self.stats.output_s += time.perf_counter() - t0
        self.stats.ok += len(records)
        self.stats.batches += 1
        if self.stats.ok == 0 and self.model_failures >= MAX_FAILURES_BEFORE_FIRST_SUCCESS:
            raise VisionpipeError(f"the model failed on the first {self.model_failures} inputs ({failed[-1].error}); "
                                  f"is this the right model for these inputs? (see {self.errs.path})")

    def _draw(self, it: Decoded, rec: dict[str, Any]) -> None:
        try:
            drawn = self.predictor.draw(it.image, rec)  # type: ignore[arg-type]
            if drawn is not None:
                _save_drawing(drawn, self.img_dir, it.path, self.src_root)
        except Exception as e:  # a drawing is a nicety: never lose the prediction for it
            log.warning("could not draw %s: %s: %s", it.path, type(e).__name__, e)


def _count_in_background(source: str, shard: tuple[int, int], done: set[str], on_total: Any,
                         exclude: Path | None = None) -> threading.Thread:
    """Count this shard's remaining inputs in a daemon thread and report the total (for the ETA)."""

    def count() -> None:
        try:
            n = sum(1 for _, p in iter_indexed(source, shard, exclude=exclude) if os.path.abspath(p) not in done)
        except Exception:  # the count is only for the progress bar
            return
        on_total(n)

    t = threading.Thread(target=count, name="count-inputs", daemon=True)
    t.start()
    return t


ON_CHANGE = ("refuse", "restart", "overwrite")


def run_predict(task_cls: type[Task], backend: Backend, metadata: dict[str, Any], source: str | None, out_dir: Path,
                options: dict[str, Any], *, on_change: str = "refuse") -> dict[str, Any]:
    """Run ``task_cls.predict`` into ``out_dir`` after making sure it resumes only its own model's predictions.

    Temporary files a killed run left in ``out_dir`` are removed first. ``fingerprint.json`` (per
    shard) records the model's sha256 and, for a task whose predict resumes, the options that change
    the records (a task that rewrites its outputs on each run may change its options freely). When
    ``out_dir`` holds this shard's predictions of another fingerprint (or of an unknown one),
    ``on_change`` decides: "refuse" (an error naming what differs), "restart" (delete ``out_dir``, a
    folder the caller owns, and predict again) or "overwrite" (delete this shard's outputs first,
    even when they match). ``backend.model_file`` must name the model (open_backend sets it).
    """
    if on_change not in ON_CHANGE:
        raise ValueError(f"on_change={on_change!r}: use one of {', '.join(ON_CHANGE)}")
    out_dir = Path(out_dir)
    shard = parse_shard(options.get("shard"))
    if backend.model_file is None:
        raise VisionpipeError("predict needs the model file to fingerprint its outputs; open the model with "
                              "visionpipe.infer.backends.open_backend()")
    # a task that rewrites its outputs on every run may change its options; none may take over another model's
    fingerprint = {"task": task_cls.name, "model": str(Path(backend.model_file).resolve()),
                   "model_sha256": sha256_file(backend.model_file),
                   "options": task_cls.record_options(options) if task_cls.predict_resumes else {}}
    if source is not None:
        check_source(source)  # before the output folder is made or claimed
    _claim(out_dir, shard_suffix(shard), fingerprint, on_change)
    stale = clean_stale_temp(out_dir, shard)
    if stale:
        log.info("removed %d temporary file(s) left in %s by a killed run", len(stale), out_dir)
    return task_cls.predict(backend, metadata, source, out_dir, options)


def _claim(out_dir: Path, suffix: str, fingerprint: dict[str, Any], on_change: str) -> None:
    """Make ``out_dir`` hold only this shard's outputs of ``fingerprint`` (see :func:`run_predict`); record it."""
    files = shard_files(out_dir, suffix)
    fp_file = out_dir / f"{FINGERPRINT}{suffix}.json"
    has_outputs = any(f.is_file() and f.stat().st_size > 0 for f in files[:2])
    if on_change == "overwrite":
        gone = [f for f in files if f.is_file()]
        for f in gone:
            f.unlink()
        if gone:
            log.info("--overwrite: removed %s from %s", ", ".join(f.name for f in gone), out_dir)
    elif has_outputs or (on_change == "restart" and out_dir.is_dir() and any(out_dir.iterdir())):
        old = read_fingerprint(fp_file)
        diff = fingerprint_difference(old, fingerprint) if old is not None else None
        if old is None or diff:
            what = (f"predictions made with other settings ({diff})" if old is not None else
                    f"predictions of an unknown model and options (no {fp_file.name})")
            if on_change == "refuse":
                raise VisionpipeError(f"{out_dir}: holds {what}; use another --out, or add --overwrite to "
                                      f"predict every input again")
            log.info("%s holds %s; predicting again", out_dir, what)
            shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(fp_file, fingerprint)


def predict_images(backend: Backend, predictor: Predictor, source: str, out_dir: Path,
                   options: dict[str, Any]) -> dict[str, Any]:
    """Predict every image under ``source``; write predictions.jsonl, errors.jsonl and summary.json.

    ``options``: batch_size, workers (decoders; 0 = decode in the main thread), decode
    ("threads" or "processes"), prefetch (look-ahead in images), shard ("I/N"; default from
    torchrun's RANK/WORLD_SIZE), save_images, count_total (False: no ETA, no second walk), pin
    (model runners to cores: None/"auto" decides, see :func:`runner_cores`).
    How many batches run at once is the backend's ``streams``.
    """
    s = Settings.from_options(options, backend)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = shard_suffix(s.shard)
    pred_file, err_file = out_dir / f"predictions{suffix}.jsonl", out_dir / f"errors{suffix}.jsonl"
    (out_dir / f"summary{suffix}.json").unlink(missing_ok=True)  # written when this run ends: none = not finished
    # compared as absolute paths: a resume that spells the source another way (imgs, ./imgs, /data/imgs) skips the same files
    done = {os.path.abspath(p) for p in read_done(pred_file) | read_done(err_file)}
    if done:
        log.info("resuming: %d input(s) already in %s are skipped", len(done), out_dir)
    src_root = Path(source) if Path(source).is_dir() else None
    # out_dir may lie inside the source folder (predict . from the images' folder): its drawings are no inputs
    items = iter_indexed(source, s.shard, exclude=out_dir)
    if done:
        items = ((k, p) for k, p in items if os.path.abspath(p) not in done)
    decoder = _Decoder(predictor, s.save_images)
    chunk = max(1, min(8, s.batch_size // max(1, s.workers))) if s.pool == "processes" else 1
    decoded = ordered_map(decoder, items, s.workers, s.window, pool=s.pool, chunk=chunk)

    preds, errs = JsonlAppender(pred_file), JsonlAppender(err_file)
    engine = _Engine(backend, predictor, preds, errs, s.shard[1] > 1, out_dir / "images", src_root,
                     runner_cores(backend, s.streams, s.pin))
    stats = engine.stats
    # Each runner holds one batch and as many again wait decoded, so a runner never waits for the main
    # thread (which decodes and writes in between); memory: (2 x streams + 1) batches.
    ran = ordered_map(engine.infer, _batches(decoded, s.batch_size, stats), s.streams, 2 * s.streams + 1)
    # under torchrun the processes of one machine share a terminal: the first one draws its shard's bar
    progress = make_progress(enabled=os.environ.get("LOCAL_RANK", "0") == "0")
    t0 = time.perf_counter()
    try:
        with progress:
            bar = progress.add_task("predict" + (f" {s.shard[0]}/{s.shard[1]}" if suffix else ""), total=None, info="")
            if s.count_total and progress_is_live(progress):
                _count_in_background(source, s.shard, done, lambda n: progress.update(bar, total=n), out_dir)
            for batch in ran:
                engine.write(batch)
                elapsed = time.perf_counter() - t0
                progress.update(bar, completed=stats.ok + stats.errors,
                                info=f"{stats.ok / max(elapsed, 1e-9):.1f} img/s, {stats.errors} error(s)")
    finally:
        ran.close()  # stops the model runners and the decoders, also after an error or Ctrl-C
        decoded.close()
        preds.close()
        errs.close()
    seconds = time.perf_counter() - t0
    if stats.ok + stats.errors == 0 and not done:
        log.warning("%s: no image files%s; nothing was predicted", source,
                    f" for shard {s.shard[0]}/{s.shard[1]}" if suffix else "")
    if suffix and writes_extra(predictor):  # one shard's share would clash with the others': merge writes them
        extra: list[Path] = []
        log.info("shard %d/%d: the files built from all predictions (e.g. COCO results) are written by "
                 "`visionpipe merge %s` once every shard is done", s.shard[0], s.shard[1], out_dir)
    else:
        extra = predictor.write_extra(out_dir, iter_jsonl(pred_file))
    summary = _summary(stats, seconds, len(done), s, backend, pred_file, err_file, extra, bool(engine.cores))
    summary["options"] = {k: v for k, v in options.items() if v is None or isinstance(v, (str, int, float, bool))}
    write_json(out_dir / f"summary{suffix}.json", summary)
    _log_summary(summary, pred_file)
    return summary


def writes_extra(predictor: Predictor) -> bool:
    """Whether the task builds files from all records (:meth:`Predictor.write_extra`), e.g. COCO results."""
    return type(predictor).write_extra is not Predictor.write_extra


def merge_predictions(folder: Path, out: Path | None = None, partial: bool = False) -> dict[str, Any]:
    """:func:`merge_outputs`, then the task's files built from all predictions (e.g. COCO results) from the merged ones.

    Those files need the model's metadata and the shards' options (kept in their summaries); when
    they cannot be built (the model file gone or changed since, a relative ``-o gt=`` from another
    folder), the records are merged and a warning says what is missing.
    """
    from visionpipe.infer.outputs import find_shards

    result = merge_outputs(folder, out, partial=partial)
    out = Path(out or folder)
    fingerprint = read_fingerprint(out / f"{FINGERPRINT}.json")
    (_, kinds), = find_shards(Path(folder)).items()
    summaries = [json.loads(p.read_text()) for _, p in sorted(kinds.get("summary", {}).items())]
    options = next((sm["options"] for sm in summaries if isinstance(sm.get("options"), dict)), None)
    if fingerprint is None or options is None:
        return result  # shards of an older visionpipe: records only
    try:
        extra = _extra_from_merged(fingerprint, options, out)
    except VisionpipeError as e:
        log.warning("the records are merged, but not the files built from all of them (e.g. COCO results): %s", e)
        return result
    if extra is not None:
        result["extra"] = [str(e) for e in extra]
        if result.get("summary"):
            merged = json.loads(Path(result["summary"]).read_text())
            write_json(Path(result["summary"]), {**merged, "extra": result["extra"]})
    return result


def _extra_from_merged(fingerprint: dict[str, Any], options: dict[str, Any], out: Path) -> list[Path] | None:
    """The task's files built from all records in ``out``/predictions.jsonl (None: the task writes none)."""
    from visionpipe.manager import get_manager

    task_cls = get_manager().task(str(fingerprint["task"]))
    if not task_cls.image_predict:  # a task with its own predict writes no files from all records
        return None
    model = Path(str(fingerprint["model"]))
    if not model.is_file() or sha256_file(model) != fingerprint.get("model_sha256"):
        raise VisionpipeError(f"{model} is gone or changed since the shards ran; predict again to get them")
    if model.suffix == ".onnx":
        from visionpipe.export.onnx import read_metadata

        metadata = read_metadata(model)
    else:
        from visionpipe.infer.backends import open_backend

        metadata = open_backend(str(model), device="cpu")[1]
    try:
        predictor = task_cls.build_predictor(metadata, options)
    except VisionpipeError as e:  # e.g. -o gt=FILE given relative to the folder the shards ran in
        raise VisionpipeError(f"{e} (run merge from the folder the shards ran in)") from None
    if not writes_extra(predictor):
        return None
    return predictor.write_extra(out, iter_jsonl(out / "predictions.jsonl"))


def progress_is_live(progress: Any) -> bool:
    """True when the progress bar is shown (counting inputs for an ETA is then worth it)."""
    return not getattr(progress, "disable", False)


def _summary(stats: Stats, seconds: float, skipped: int, s: Settings, backend: Backend, pred_file: Path,
             err_file: Path, extra: list[Path], pinned: bool) -> dict[str, Any]:
    share = (lambda x, n=1: round(100.0 * x / (n * seconds), 1) if seconds > 0 else None)  # noqa: E731
    return {
        "images": stats.ok, "errors": stats.errors, "skipped_already_done": skipped,
        "seconds": round(seconds, 3),
        "images_per_second": round(stats.ok / seconds, 2) if seconds > 0 else None,
        "predictions": str(pred_file), "errors_file": str(err_file), "shard": f"{s.shard[0]}/{s.shard[1]}",
        "backend": getattr(backend, "name", "?"),
        "engine": {**(backend.describe() if hasattr(backend, "describe") else {}),
                   "batch_size": s.batch_size, "streams": s.streams, "decoders": s.workers, "decode": s.pool,
                   "prefetch": s.window, "runners_pinned": pinned},
        # model: the share of the runners' time spent in model calls (all runners together);
        # decode: the time spent getting decoded inputs (waiting for the decoders, or decoding in
        # the main thread when there are none); postprocess_and_write: the main thread's writing.
        "time_percent": {"model": share(stats.model_s, s.streams), "decode": share(stats.decode_s),
                         "postprocess_and_write": share(stats.output_s)},
        "error_reasons": stats.error_reasons,
        "extra": [str(e) for e in extra],
    }


def _log_summary(summary: dict[str, Any], pred_file: Path) -> None:
    tp = summary["time_percent"]
    log.info("predicted %d image(s), %d error(s) in %.1f s: %.1f img/s (model runners busy %s%% of the time, "
             "decoding %s%%, writing %s%%) -> %s", summary["images"], summary["errors"], summary["seconds"],
             summary["images_per_second"] or 0.0, tp["model"], tp["decode"], tp["postprocess_and_write"], pred_file)
    if summary["errors"]:
        log.info("errors by reason: %s", ", ".join(f"{k}: {v}" for k, v in summary["error_reasons"].items()))


def _save_drawing(img: np.ndarray, img_dir: Path, src: Path, src_root: Path | None) -> None:
    import cv2

    from visionpipe.io import atomic_path

    rel = src.relative_to(src_root) if src_root and src_root in src.parents else Path(src.name)
    dest = (img_dir / rel).with_suffix(".png")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        cv2.imwrite(str(tmp), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
