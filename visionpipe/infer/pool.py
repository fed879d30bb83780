"""Ordered, bounded parallel map: decoders run ahead of the model, never more than a window ahead."""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from itertools import islice
from typing import Any

from visionpipe.errors import VisionpipeError

POOLS = ("threads", "processes")

_worker_fn: Callable[[Any], Any] | None = None


def _init_worker(fn: Callable[[Any], Any]) -> None:
    global _worker_fn
    _worker_fn = fn
    parent = multiprocessing.parent_process()
    if parent is not None:  # a killed predict (SIGKILL) must not leave its decoder processes behind
        threading.Thread(target=_exit_with, args=(parent,), name="exit-with-parent", daemon=True).start()


def _exit_with(parent: Any) -> None:
    parent.join()  # returns once the process that started this worker is gone, however it ended
    os._exit(1)


def _run_chunk_in_worker(chunk: list[Any]) -> list[Any]:
    assert _worker_fn is not None
    return [_worker_fn(x) for x in chunk]


def _run_chunk(fn: Callable[[Any], Any], chunk: list[Any]) -> list[Any]:
    return [fn(x) for x in chunk]


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int, window: int,
                pool: str = "threads", chunk: int = 1) -> Iterator[Any]:
    """``map(fn, items)`` on ``workers`` threads or processes, in input order, at most ``window`` items ahead.

    Items are consumed lazily, so memory stays flat for inputs of any length. With
    ``pool="processes"``, ``fn`` must be picklable and must not raise; it is sent once to each worker.
    """
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS} (got {pool!r})")
    if workers <= 0:
        yield from map(fn, items)
        return
    chunk = max(1, chunk)
    ahead = max(1, window // chunk)
    executor: Executor
    if pool == "threads":
        executor = ThreadPoolExecutor(workers, thread_name_prefix="decode")
        submit = lambda c: executor.submit(_run_chunk, fn, c)  # noqa: E731
    else:
        # forkserver: workers never inherit the parent's model-runtime threads (fork after they start is unsafe).
        ctx = multiprocessing.get_context("forkserver")
        executor = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(fn,))
        submit = lambda c: executor.submit(_run_chunk_in_worker, c)  # noqa: E731
    pending: deque[Future] = deque()

    def result(f: Future) -> list[Any]:
        if pool == "threads":
            return f.result()
        try:
            return f.result()
        except Exception as e:  # the work itself never raises (fn catches); this is the pool failing
            raise VisionpipeError(f"decoder processes failed ({type(e).__name__}: {e}); a worker may have run out "
                                  f"of memory, or the task cannot be sent to processes: use --decode threads") from None

    try:
        for c in _chunks(items, chunk):
            pending.append(submit(c))
            if len(pending) >= ahead:
                yield from result(pending.popleft())
        while pending:
            yield from result(pending.popleft())
    finally:
        for f in pending:
            f.cancel()
        executor.shutdown(wait=True, cancel_futures=True)
