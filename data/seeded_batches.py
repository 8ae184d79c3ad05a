"""Training batches whose randomness is drawn in the main process, whatever the DataLoader's workers.

A worker process draws from its own generator, which the DataLoader seeds per worker: with
augmentation drawn inside `__getitem__`, which worker loads a sample decides how it is augmented,
so another `--workers` (or a run resumed with one) trains on other augmentations.
`SeededBatchSampler` draws each sample's seed, and for multi-scale training each batch's side, from
torch's generator in the main process (which the engine checkpoints), and hands them to the dataset
with the index: `DetectionTrainDataset[(index, seed, side)]`.

It draws the whole epoch's seeds and sides when the epoch's first batch is asked for: a DataLoader
with workers asks for several batches ahead, so drawing batch by batch would interleave these draws
with the training steps' own (dropout on the CPU) differently for each number of workers. The
values are those a single-process loader drew before this sampler existed, one per sample and then
one side per batch, wherever the training step draws nothing from torch's CPU generator (no
`[dropout]`, or a GPU). Under DDP, `stream` (the rank) shifts the seeds, so that the ranks, whose
generators are seeded alike, do not augment their k-th samples alike.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler

SEED_LIMIT = 2**31 - 1
STREAM_STEP = 0x9E3779B1          # a large odd step: the ranks' seeds differ


def draw_seed() -> int:
    """One sample's seed from torch's generator."""
    return int(torch.randint(0, SEED_LIMIT, ()))


def seeded_item(item: int | tuple[int, int, None]) -> tuple[int, torch.Generator | None]:
    """A classifier dataset's item as (index, generator): for `(index, seed, None)` a CPU generator
    seeded with `seed`; for a plain index, None (torch's global generator).

    Raises:
        ValueError: a side is given (the classifier datasets have one image size).
    """
    if not isinstance(item, tuple):
        return int(item), None
    index, seed, side = item
    if side is not None:
        raise ValueError(f"this dataset has one image size; multi-scale batches (side {side}) are not supported")
    return int(index), torch.Generator().manual_seed(int(seed))


class SeededBatchSampler(Sampler[list[tuple[int, int, int | None]]]):
    """Batches of (index, seed, side) from `sampler`'s indices.

    Args:
        sampler: the index order (a RandomSampler, a DistributedSampler; its `set_epoch` is passed on).
        batch_size: samples per batch; the last batch may be shorter unless `drop_last`.
        sides: multi-scale training: each batch's side is drawn from these (None: the dataset's own size).
        stream: shifts every seed (use the DDP rank; 0 leaves them as drawn).
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, drop_last: bool = False,
                 sides: Sequence[int] | None = None, stream: int = 0):
        if batch_size < 1:
            raise ValueError(f"SeededBatchSampler: batch_size must be >= 1, found {batch_size}")
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last
        self.sides = None if sides is None else [int(side) for side in sides]
        self.stream = stream

    def __iter__(self) -> Iterator[list[tuple[int, int, int | None]]]:
        yield from self._epoch()

    def _epoch(self) -> list[list[tuple[int, int, int | None]]]:
        """Every batch of the epoch, drawn at once (see the module docstring)."""
        indices = [int(index) for index in self.sampler]     # the sampler's own draw comes first, as before
        batches = []
        for start in range(0, len(indices), self.batch_size):
            chunk = indices[start:start + self.batch_size]
            if len(chunk) < self.batch_size and self.drop_last:
                break
            seeds = [(draw_seed() + STREAM_STEP * self.stream) % SEED_LIMIT for _ in chunk]
            side = None if self.sides is None else self.sides[int(torch.randint(len(self.sides), ()))]
            batches.append([(index, seed, side) for index, seed in zip(chunk, seeds)])
        return batches

    def __len__(self) -> int:
        full, rest = divmod(len(self.sampler), self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def set_epoch(self, epoch: int) -> None:
        """Passed on to the index sampler (a DistributedSampler's permutation of this epoch)."""
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
