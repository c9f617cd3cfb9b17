"""A resumable, rank-sharded batch order: the data position is part of every checkpoint."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class BatchOrder:
    """Shuffled epochs of fixed-size batches (``drop_last``), split across processes.

    Epoch ``e`` is the permutation drawn from a generator seeded with ``seed`` and ``e``, so batch
    ``k`` (counted from the start of training) is a function of (seed, k) alone: a run resumes
    exactly by passing ``start`` = the number of batches it has consumed (a DataLoader prefetches
    ahead, so the trainer, not the iterator, counts what was consumed). Each global batch of
    ``global_batch`` indices is cut into ``num_processes`` equal slices.
    """

    dataset_size: int
    global_batch: int
    seed: int = 0
    rank: int = 0
    num_processes: int = 1
    start: int = 0

    def __post_init__(self) -> None:
        if self.global_batch % self.num_processes:
            raise ValueError(
                f"global batch {self.global_batch} is not divisible by {self.num_processes} "
                "processes"
            )
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"dataset of {self.dataset_size} items is smaller than one batch of "
                f"{self.global_batch}"
            )

    @property
    def batches_per_epoch(self) -> int:
        return self.dataset_size // self.global_batch

    def permutation(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.dataset_size, generator=gen)

    def __iter__(self) -> Iterator[list[int]]:
        """This process's index batches from batch ``start`` on, forever."""
        local = self.global_batch // self.num_processes
        epoch, batch = divmod(self.start, self.batches_per_epoch)
        while True:
            perm = self.permutation(epoch)
            for b in range(batch, self.batches_per_epoch):
                first = b * self.global_batch + self.rank * local
                yield perm[first : first + local].tolist()
            epoch, batch = epoch + 1, 0
