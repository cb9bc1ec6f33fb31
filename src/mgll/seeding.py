"""Per-sample random seeds: a sample's augmentation and text draw depend on (run seed, epoch,
sample index) only, never on which process, worker or stream position loads it.

A leaf (numpy and torch only): the map-style loader (``mgll.training.sampling``) and the shard
stream (``mgll.data.shards``) seed each sample the same way, so one sample drawn in one epoch
looks the same from either.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

_MASK63 = (1 << 63) - 1
_MASK64 = (1 << 64) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed from (run seed, epoch, sample index) by splitmix-style mixing."""
    z = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (
        _MASK64
    )
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & _MASK63


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed Python, NumPy and torch (CPU) with ``seed`` for the block, then give the caller's
    generators back (CUDA streams stay untouched)."""
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])
