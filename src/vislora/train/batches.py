"""Which images each process trains on, in which order: a function of (seed, epoch) only, so resume is exact."""

from __future__ import annotations

from collections.abc import Iterator

import torch


class EpochBatches(torch.utils.data.Sampler):
    """This process's micro-batches of one epoch: a (seed, epoch)-seeded permutation, from batch `start`.

    Global batch b covers permutation[b*B*W:(b+1)*B*W]; process r takes its r-th slice of B indices.
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, start: int, rank: int, world: int) -> None:
        self.n, self.batch_size, self.seed, self.epoch, self.start = n, batch_size, seed, epoch, start
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return max(0, self.n // (self.batch_size * self.world) - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        step = self.batch_size * self.world
        for b in range(self.start, self.n // step):
            first = b * step + self.rank * self.batch_size
            yield order[first:first + self.batch_size].tolist()
