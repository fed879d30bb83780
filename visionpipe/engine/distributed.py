"""Rank-aware helpers in one place (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK)."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


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


def init_distributed(device: torch.device) -> bool:
    """Start the process group when launched by torchrun (NCCL on CUDA, gloo on CPU)."""
    _, world, local = env_world()
    if world <= 1 or is_distributed():
        return is_distributed()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend)
    return True


def barrier() -> None:
    """Wait for every rank (no-op alone)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum float values over ranks (no-op alone)."""
    if not is_distributed() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cleanup() -> None:
    """Tear down the process group if one is up."""
    if is_distributed():
        dist.destroy_process_group()
