"""Resuming the data order mid-epoch: a shuffling sampler whose position is part of the checkpoint."""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """A random sampler that can be saved and resumed exactly, mid-epoch.

    Epoch ``e`` visits ``torch.randperm(n)`` drawn from a generator seeded with ``seed + e``;
    the sampler counts the indices it has handed out. ``state_dict()`` records the epoch and that
    position, so a run resumed from a checkpoint sees exactly the batches the interrupted run
    would have seen next. An epoch that runs to the end moves on to the next one.

    With ``DataLoader(num_workers=0)`` the position is exact at batch boundaries. Worker
    processes prefetch indices ahead of training; then save ``batches_done * batch_size`` as the
    position yourself: ``sampler.load_state_dict({"epoch": e, "position": p, "seed": s})``.

    Across ranks (DDP, FSDP) it replaces ``DistributedSampler``: rank ``r`` of ``R`` takes every
    ``R``-th index of the epoch's order from ``r`` (the order padded to a multiple of ``R`` by
    repeating its start, as DistributedSampler does, unless ``drop_last``). The position counts the
    samples all ranks have consumed together, so every rank's state is the same (save it once, as
    shared state) and a run resumed with another number of ranks continues from that global
    position: no sample of the epoch is seen twice or skipped.

    Example:
        >>> sampler = ResumableSampler(dataset, seed=0)
        >>> loader = DataLoader(dataset, batch_size=16, sampler=sampler)
        >>> mgr.save(step, model=model, optimizer=opt, components={"sampler": sampler})
    """

    def __init__(
        self,
        data_source: Sized | int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ) -> None:
        self.size = data_source if isinstance(data_source, int) else len(data_source)
        self.seed = seed
        self.shuffle = shuffle
        initialised = dist.is_available() and dist.is_initialized()
        self.num_replicas = num_replicas if num_replicas is not None else dist.get_world_size() if initialised else 1
        self.rank = rank if rank is not None else dist.get_rank() if initialised else 0
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} is not in [0, {self.num_replicas})")
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0  # samples of this epoch consumed by all ranks together

    @property
    def total(self) -> int:
        """The epoch's length across ranks: the order cut or padded to a multiple of the ranks."""
        whole, rest = divmod(self.size, self.num_replicas)
        return (whole + (rest > 0 and not self.drop_last)) * self.num_replicas

    def __len__(self) -> int:
        return len(range(self.position + self.rank, self.total, self.num_replicas))

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self.order(self.epoch)
        while self.position + self.rank < self.total:
            index = order[(self.position + self.rank) % self.size]  # past the end: the padding
            self.position += self.num_replicas
            yield index
        self.epoch += 1
        self.position = 0

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning."""
        self.epoch = epoch
        self.position = 0

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "size": self.size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("size", self.size) != self.size:
            raise ValueError(f"the saved sampler covered {state['size']} samples, this dataset has {self.size}")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
