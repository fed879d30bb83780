"""Rank-aware helpers in one place (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK).

Every collective here runs under the process group's timeout (``VISIONPIPE_DIST_TIMEOUT``
seconds, default 1800), so a rank that never arrives makes the run fail instead of hang.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from visionpipe.errors import VisionpipeError

DEFAULT_TIMEOUT_S = 1800.0


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the torchrun environment, (0, 1, 0) otherwise."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def is_distributed() -> bool:
    """True when a process group is up."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0: the only process that writes files."""
    return rank() == 0


def timeout_seconds() -> float:
    """Seconds any collective may wait for the other ranks (``VISIONPIPE_DIST_TIMEOUT``)."""
    raw = os.environ.get("VISIONPIPE_DIST_TIMEOUT", "")
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise VisionpipeError(f"VISIONPIPE_DIST_TIMEOUT must be a positive number of seconds (got {raw!r})")
    return value


def init_distributed(device: torch.device) -> bool:
    """Start the process group when launched by torchrun (NCCL on CUDA, gloo on CPU)."""
    _, world, local = env_world()
    if world <= 1 or is_distributed():
        return is_distributed()
    port = os.environ.get("MASTER_PORT", "")
    if port == "0":
        # torchrun's static rendezvous hands MASTER_PORT=0 to the workers verbatim; they would
        # retry connecting to port 0 until the timeout.
        raise VisionpipeError(
            "MASTER_PORT is 0: torchrun --master-port 0 does not pick a free port for the workers. "
            "Use `torchrun --standalone --nproc-per-node N ...` on one machine, or "
            "`--rdzv-backend c10d --rdzv-endpoint HOST:PORT` with a real port")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local)
    seconds = timeout_seconds()
    try:
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=seconds))
    except (RuntimeError, ValueError) as e:  # DistStoreError is a RuntimeError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VisionpipeError(
            f"could not start the {backend} process group ({world} processes, "
            f"{os.environ.get('MASTER_ADDR')}:{port}) within {seconds:g}s: {first}") from None
    return True


def barrier() -> None:
    """Wait for every rank (no-op alone)."""
    if is_distributed():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Run the block on rank 0 first, then on the other ranks (e.g. rank 0 writes a cache they read)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def all_reduce_sum(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum float values over ranks (no-op alone); a key missing on some rank counts as 0 there."""
    if not is_distributed():
        return values
    keys_per_rank: list[Any] = [None] * world_size()
    dist.all_gather_object(keys_per_rank, sorted(values))
    keys = sorted(set().union(*keys_per_rank))
    if not keys:
        return {}
    # gloo reduces CPU tensors only; NCCL needs them on this rank's GPU
    where = device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([float(values.get(k, 0.0)) for k in keys], dtype=torch.float64, device=where)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist(), strict=True))


def ensure_same(value: Any, what: str, hint: str = "") -> None:
    """Raise the same VisionpipeError on every rank unless all ranks hold an equal ``value``."""
    if not is_distributed():
        return
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        raise VisionpipeError(f"{what} differs between ranks ({', '.join(f'rank {i}: {v}' for i, v in enumerate(values))})"
                              + (f"; {hint}" if hint else ""))


def broadcast_module(module: torch.nn.Module) -> None:
    """Overwrite ``module``'s parameters and buffers with rank 0's, in place (no-op alone)."""
    if not is_distributed():
        return
    for t in module.state_dict().values():
        dist.broadcast(t, src=0)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


GIL_HANDOVER_SECONDS = 0.1


def cleanup(finished: bool = True) -> None:
    """Tear down the process group if one is up; after a finished run, every rank meets first.

    gloo's worker threads drop a finished collective's work a moment after the caller has moved
    on, and a work holding a tensor made in Python needs the GIL to drop it (a barrier's work
    also holds the works still in flight when it started). A rank that reaches interpreter
    shutdown inside that moment is aborted: "terminate called without an active exception",
    seen under load after the final weight broadcast; see pytorch/pytorch#179291. So after the
    barrier this thread lets go of the GIL briefly, for those threads to finish. After a failure
    the other ranks may be gone: no barrier then.
    """
    if is_distributed():
        if finished:
            dist.barrier()
            time.sleep(GIL_HANDOVER_SECONDS)  # releases the GIL to gloo's threads
        dist.destroy_process_group()
