"""Token ids of strings tokenised before, so that a step tokenises only the strings that are new.

A text tower tokenises inside the training step, in the training process: every caption of every
batch, every epoch. Captions repeat: the coarse levels' prompts in nearly every batch, each note
once per epoch. On a GPU the tokenizer is then a large part of the step (measured on an H200,
ViT-B/16 at batch 128: open_clip's tokenizer took 39 ms of a 136 ms step; see
docs/models.md#token-cache), while open_clip's own trainer tokenises in its loader workers.
The cache keeps the ids of the most recently used strings (least recently used out first), as
int32 arrays, so each costs about its length in 4-byte ints plus ~100 bytes, and the string
itself where nothing else holds it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

DEFAULT_SIZE = 100_000
"""Strings kept by default: the notes of a 100k-image corpus, about 40-60 MB of ids (77-128
tokens each)."""


class TokenCache:
    """``cache(strings, tokenize)`` -> one int32 id array per string, calling
    ``tokenize(list_of_strings)`` (ids per string: lists, arrays or a tensor's rows) only on the
    strings it has not kept. ``size`` strings at most are kept; ``size=0`` keeps none."""

    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        if size < 0:
            raise ValueError(f"token cache size must be >= 0, got {size}")
        self.size = int(size)
        self._ids: OrderedDict[str, np.ndarray] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._ids)

    def __call__(
        self, strings: Sequence[str], tokenize: Callable[[list[str]], Any]
    ) -> list[np.ndarray]:
        found: dict[str, np.ndarray] = {}
        for s in strings:
            ids = self._ids.get(s)
            if ids is not None:
                self._ids.move_to_end(s)
                found[s] = ids
        self.hits += sum(1 for s in strings if s in found)
        missing = [s for s in dict.fromkeys(strings) if s not in found]
        self.misses += len(missing)
        if missing:
            for s, row in zip(missing, tokenize(missing), strict=True):
                found[s] = np.asarray(row, dtype=np.int32)
            if self.size:
                for s in missing[-self.size :]:
                    self._ids[s] = found[s]
                while len(self._ids) > self.size:
                    self._ids.popitem(last=False)
        return [found[s] for s in strings]
