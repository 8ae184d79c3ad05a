"""Training batches whose randomness is drawn in the main process, whatever the DataLoader's workers.

A worker process draws from its own generator, which the DataLoader seeds per worker: with
augmentation drawn inside `__getitem__`, which worker loads a sample decides how it is augmented,
so another `--workers` (or a run resumed with one) trains on other augmentations.
`SeededBatchSampler` draws each sample's seed, and for multi-scale training each batch's side, from
torch's generator in the main process (which the engine checkpoints), and hands them to the dataset
with the index: `DetectionTrainDataset[(index, seed, side)]`. The draws come in the order a
single-process loader made them before this sampler existed (each sample's seed as it is fetched,
then the batch's side), so the results of such runs are unchanged.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler

SEED_LIMIT = 2**31 - 1


def draw_seed() -> int:
    """One sample's seed from torch's generator."""
    return int(torch.randint(0, SEED_LIMIT, ()))


class SeededBatchSampler(Sampler[list[tuple[int, int, int | None]]]):
    """Batches of (index, seed, side) from `sampler`'s indices.

    Args:
        sampler: the index order (a RandomSampler, a DistributedSampler; its `set_epoch` is passed on).
        batch_size: samples per batch; the last batch may be shorter unless `drop_last`.
        sides: multi-scale training: each batch's side is drawn from these (None: the dataset's own size).
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, drop_last: bool = False,
                 sides: Sequence[int] | None = None):
        if batch_size < 1:
            raise ValueError(f"SeededBatchSampler: batch_size must be >= 1, found {batch_size}")
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last
        self.sides = None if sides is None else [int(side) for side in sides]

    def __iter__(self) -> Iterator[list[tuple[int, int, int | None]]]:
        batch: list[tuple[int, int]] = []
        for index in self.sampler:
            batch.append((int(index), draw_seed()))
            if len(batch) == self.batch_size:
                yield self._with_side(batch)
                batch = []
        if batch and not self.drop_last:
            yield self._with_side(batch)

    def _with_side(self, batch: list[tuple[int, int]]) -> list[tuple[int, int, int | None]]:
        side = None if self.sides is None else self.sides[int(torch.randint(len(self.sides), ()))]
        return [(index, seed, side) for index, seed in batch]

    def __len__(self) -> int:
        full, rest = divmod(len(self.sampler), self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def set_epoch(self, epoch: int) -> None:
        """Passed on to the index sampler (a DistributedSampler's permutation of this epoch)."""
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
