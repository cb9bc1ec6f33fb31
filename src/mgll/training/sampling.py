"""Which samples each rank reads at each step, and per-sample random seeds.

Two properties make runs reproducible across resumption and across rank counts:

- :class:`GlobalBatchSampler` shuffles the dataset once per epoch from ``(seed, epoch)`` and
  cuts the permutation into global batches; rank ``r`` of ``W`` reads the ``r``-th slice of
  each global batch. So the set of samples in step ``k`` is the same for any ``W`` (the
  contrastive loss sees the same batch), and a resumed run can start mid-epoch by skipping
  the steps already taken (``set_epoch(epoch, start_step)``).
- :class:`SeededSamples` seeds Python, NumPy and torch from ``(seed, epoch, index)`` before
  each ``dataset[index]`` and restores the caller's generators afterwards, so random
  augmentation of a sample does not depend on which worker or rank loads it, nor on where a
  run was resumed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from mgll.seeding import sample_seed, seeded

__all__ = ["GlobalBatchSampler", "SeededSamples", "sample_seed"]


class GlobalBatchSampler(Sampler[list[tuple[int, int, int]]]):
    """Yields this rank's share of each global batch as ``(index, epoch, sample_seed)`` keys.

    Incomplete last global batches are dropped, so every step has the full contrastive batch
    and every rank the same number of steps; with ``drop_last=False`` (supervised training of
    small sets) the last one is kept, padded from the epoch's start to a multiple of the
    ranks, as ``DistributedSampler`` pads. With ``weights`` (one per sample) an epoch is
    ``num_samples`` draws with replacement in those proportions, from the same (seed, epoch)
    generator, so weighted runs resume and scale across ranks alike.
    """

    def __init__(
        self,
        num_samples: int,
        global_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        weights: Sequence[float] | None = None,
        drop_last: bool = True,
    ) -> None:
        if weights is not None and len(weights) != num_samples:
            raise ValueError(f"{len(weights)} sampling weights for {num_samples} samples")
        if global_batch % world_size:
            raise ValueError(
                f"train.batch_size ({global_batch}) must be divisible by the number of "
                f"processes ({world_size})"
            )
        if drop_last and num_samples < global_batch:
            raise ValueError(
                f"the training set has {num_samples} samples, fewer than one batch "
                f"(train.batch_size={global_batch}); lower train.batch_size"
            )
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.seed = seed
        self.shuffle = shuffle
        self.weights = torch.tensor(weights, dtype=torch.float64) if weights is not None else None
        self.epoch = 0
        self.start_step = 0

    @property
    def steps_per_epoch(self) -> int:
        """Global batches per epoch (the incomplete last one counts unless dropped)."""
        if self.drop_last:
            return self.num_samples // self.global_batch
        return -(-self.num_samples // self.global_batch)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch's permutation and the first step to yield (for resuming)."""
        self.epoch = epoch
        self.start_step = start_step

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is not None:
            # Weighted epochs (a pool's source weights): num_samples draws with replacement.
            order = torch.multinomial(
                self.weights, self.num_samples, replacement=True, generator=gen
            ).tolist()
        elif self.shuffle:
            order = torch.randperm(self.num_samples, generator=gen).tolist()
        else:
            order = list(range(self.num_samples))
        for step in range(self.start_step, self.steps_per_epoch):
            batch = order[step * self.global_batch : (step + 1) * self.global_batch]
            if len(batch) % self.world_size:  # the kept incomplete last batch
                batch += order[: self.world_size - len(batch) % self.world_size]
            local = len(batch) // self.world_size
            yield [
                (i, self.epoch, sample_seed(self.seed, self.epoch, i))
                for i in batch[self.rank * local : (self.rank + 1) * local]
            ]


class SeededSamples(Dataset):
    """Wraps a dataset so that ``self[(index, epoch, seed)]`` is ``dataset[index]`` drawn under
    ``seed`` in ``epoch``.

    The epoch travels with each key rather than through ``dataset.set_epoch`` in the main
    process, because worker processes hold their own copy of the dataset.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int, int]) -> dict:
        index, epoch, seed = key
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)  # e.g. which of several texts a level draws
        with seeded(seed):
            return self.dataset[index]
