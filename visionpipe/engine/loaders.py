"""Training and evaluation DataLoaders: order and augmentation depend only on (seed, epoch)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, SequentialSampler

from visionpipe.config import TrainConfig
from visionpipe.engine import distributed as dist

log = logging.getLogger(__name__)


def pin_memory(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether batches go to page-locked memory (then host-to-device copies do not block)."""
    return cfg.pin_memory if cfg.pin_memory is not None else device.type == "cuda"


def _seed_worker(worker_id: int) -> None:
    import random

    import numpy as np

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields (epoch, index): the order depends only on (seed, epoch), sharded over ranks under DDP.

    The epoch travels with each index, so persistent DataLoader workers pick up each epoch's
    augmentation stream (``set_epoch``) without being restarted. With ``batch_size``, an epoch
    whose last batch would hold a single sample leaves that sample out: BatchNorm cannot train
    on a batch of one (the sample left out changes from epoch to epoch).
    """

    def __init__(self, ds: Dataset, seed: int, batch_size: int | None = None) -> None:
        self.ds, self.seed, self.epoch, self.batch_size = ds, seed, 0, batch_size
        self.rank, self.world = dist.rank(), dist.world_size()

    def set_epoch(self, epoch: int) -> None:
        """Select ``epoch``'s order (and the dataset's augmentation stream in this process)."""
        self.epoch = epoch
        if hasattr(self.ds, "set_epoch"):
            self.ds.set_epoch(epoch, self.seed)  # may change len(ds) (e.g. text chunk boundaries)

    def _per_rank(self) -> int:
        return math.ceil(len(self.ds) / self.world)  # type: ignore[arg-type]

    def drops_one(self) -> bool:
        """True when this epoch's last batch would hold one sample, which is then left out."""
        n = self._per_rank()
        return bool(self.batch_size) and self.batch_size > 1 and n > 1 and n % self.batch_size == 1

    def __len__(self) -> int:
        return self._per_rank() - self.drops_one()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        n = len(self.ds)  # type: ignore[arg-type]
        g = torch.Generator()
        if self.world > 1:  # the same shards as torch's DistributedSampler(shuffle=True, drop_last=False)
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
            total = self._per_rank() * self.world
            order += (order * math.ceil(total / max(n, 1)))[: total - n]
            order = order[self.rank:total:self.world]
        else:
            g.manual_seed(self.seed * 1000003 + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        if self.drops_one():
            order = order[:-1]
        for i in order:
            yield self.epoch, i


class _EpochIndexed(Dataset):
    """``ds`` indexed by (epoch, index) pairs from :class:`EpochSampler`."""

    def __init__(self, ds: Dataset, seed: int) -> None:
        self.ds, self.seed, self._epoch = ds, seed, None

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, i = key
        if epoch != self._epoch and hasattr(self.ds, "set_epoch"):
            self.ds.set_epoch(epoch, self.seed)
        self._epoch = epoch
        return self.ds[i]


def make_loader(ds: Dataset, batch_size: int, *, train: bool, seed: int, epoch: int, cfg: TrainConfig,
                collate_fn: Callable | None, device: torch.device) -> DataLoader:
    """A DataLoader whose order depends only on (seed, epoch): resume restores it exactly.

    A training loader can be reused for later epochs: call ``loader.sampler.set_epoch(e)``.
    """
    sampler: Any
    if train:
        sampler = EpochSampler(ds, seed, batch_size)
        sampler.set_epoch(epoch)
        if sampler.drops_one():
            log.info("training leaves out 1 of %d images per epoch (a different one each epoch): "
                     "a last batch of one cannot train BatchNorm", len(sampler) + 1)
        ds = _EpochIndexed(ds, seed)
    else:
        sampler = SequentialSampler(ds)
    kw: dict[str, Any] = {}
    if cfg.num_workers > 0:
        kw = {"worker_init_fn": _seed_worker, "persistent_workers": cfg.persistent_workers,
              "prefetch_factor": cfg.prefetch_factor or 4}
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=cfg.num_workers,
                      collate_fn=collate_fn, pin_memory=pin_memory(cfg, device), drop_last=False, **kw)
