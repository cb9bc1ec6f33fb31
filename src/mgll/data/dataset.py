"""The torch dataset of the data contract (docs/architecture.md) and its collate function."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mgll.data.cache import PreprocessCache, SourceCaches, check_resize_mode, load_resized
from mgll.data.images import ImageLoadError
from mgll.data.records import LevelInfo, Record, RecordSet
from mgll.data.transforms import build_transform


class MultiGranularDataset(Dataset):
    """Images with G granularity levels of texts and labels (coarse to fine).

    ``__getitem__`` returns ``image`` (3, H, W) float, ``texts`` (G strings), ``labels`` (G
    entries: int id, -1 = missing, or float multi-hot), ``index`` and ``skipped``. An image that
    cannot be read is replaced by the next readable sample (deterministic), its path is named in
    a warning once per process and listed in ``skipped``; then ``index`` is the replacement's.
    When a level has several candidate texts one is drawn from an RNG seeded by
    (seed, epoch, index): call :meth:`set_epoch` each epoch for fresh but reproducible draws.
    """

    def __init__(
        self,
        records: RecordSet,
        *,
        image_size: int = 224,
        transform: Callable[[np.ndarray], torch.Tensor] | None = None,
        cache: PreprocessCache | SourceCaches | None = None,
        resize_mode: str = "crop",
        seed: int = 0,
        max_replacements: int = 50,
    ) -> None:
        self.record_set = records
        self.records = records.records
        self.levels: list[LevelInfo] = list(records.levels)
        self.image_size = int(image_size)
        self.transform = transform if transform is not None else build_transform(train=False)
        self.cache = cache
        if cache is not None and cache.image_size != self.image_size:
            raise ValueError(
                f"cache image size {cache.image_size} differs from dataset image size "
                f"{image_size}; create the PreprocessCache with image_size={image_size}"
            )
        self.resize_mode = (
            cache.resize_mode if cache is not None else check_resize_mode(resize_mode)
        )
        self.seed = int(seed)
        self.epoch = 0
        self.max_replacements = int(max_replacements)
        self.skip_count = 0  # replacements made in this process (workers keep their own)
        self._bad: set[str] = set()
        self._label_ids = encode_labels(self.records, self.levels)

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose text draws (and nothing else) ``__getitem__`` reproduces."""
        self.epoch = int(epoch)

    def metadata(self, index: int) -> dict[str, Any]:
        """Per-sample metadata: image path, patient id, and what the source kept (e.g. view)."""
        r = self.records[index]
        return {"image": str(r.image), "patient_id": r.patient_id, **r.metadata}

    @property
    def patient_ids(self) -> list[str | None]:
        """Patient id of every sample, in index order."""
        return [r.patient_id for r in self.records]

    def label(self, index: int, level: int) -> int | torch.Tensor:
        """The label of sample ``index`` at ``level`` in the contract's form."""
        return label_entry(self._label_ids[level][index], self.levels[level])

    def texts(self, index: int) -> list[str]:
        """The texts of sample ``index`` for the current epoch (one drawn per level)."""
        return draw_texts(self.records[index].texts, self.seed, self.epoch, index)

    def load_image(self, path: Path) -> np.ndarray:
        """Square uint8 RGB image of ``path`` at the dataset's size (cached when a cache is set)."""
        if self.cache is not None:
            return self.cache.load(path)
        return load_resized(path, self.image_size, self.resize_mode)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.records)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} samples")
        index %= n
        skipped: list[str] = []
        for attempt in range(min(n, self.max_replacements + 1)):
            j = (index + attempt) % n
            path = self.records[j].image
            key = str(path)
            if key in self._bad:
                skipped.append(key)
                continue
            try:
                pixels = self.load_image(path)
            except ImageLoadError as exc:
                self._bad.add(key)
                skipped.append(key)
                warnings.warn(f"skipping unreadable image: {exc}", stacklevel=2)
                continue
            self.skip_count += len(skipped)
            return {
                "image": self.transform(pixels),
                "texts": self.texts(j),
                "labels": [self.label(j, g) for g in range(len(self.levels))],
                "index": j,
                "skipped": skipped,
            }
        raise RuntimeError(
            f"{len(skipped)} consecutive images from index {index} could not be read "
            f"(first: {skipped[:3]}); run `mgll data check` on the dataset to list broken files"
        )


def encode_labels(records: Sequence[Record], levels: Sequence[LevelInfo]) -> list[list[Any]]:
    """Per level, every record's class id (-1 = missing) or sorted ids (multi-label).

    Raises ValueError naming the record's image for an unknown class, or for several classes
    at a single-label level.
    """
    encoded: list[list[Any]] = []
    for g, level in enumerate(levels):
        column: list[Any] = []
        for r in records:
            names = r.labels[g]
            try:
                ids = [level.class_id(n) for n in names]
            except ValueError as exc:
                raise ValueError(f"{r.image}: {exc}") from None
            if level.multi_label:
                column.append(sorted(set(ids)))
            elif len(set(ids)) > 1:
                raise ValueError(
                    f"{r.image}: level {level.name!r} is single-label but this record has "
                    f"{names}; mark the level multi_label or give one label"
                )
            else:
                column.append(ids[0] if ids else -1)
        encoded.append(column)
    return encoded


def label_entry(value: int | Sequence[int], level: LevelInfo) -> int | torch.Tensor:
    """An encoded label (:func:`encode_labels`) in the contract's form: the int id, or the
    multi-hot float tensor (all zero = missing) of a multi-label level."""
    if not level.multi_label:
        return int(value)  # type: ignore[arg-type]
    hot = torch.zeros(len(level.vocabulary), dtype=torch.float32)
    if value:
        hot[list(value)] = 1.0  # type: ignore[arg-type]
    return hot


def draw_texts(candidates: Sequence[Sequence[str]], seed: int, epoch: int, index: int) -> list[str]:
    """One text per level: the only candidate, or one drawn from an RNG seeded by
    (seed, epoch, index), so every reader of the sample draws the same text in an epoch."""
    if all(len(c) == 1 for c in candidates):
        return [c[0] for c in candidates]
    rng = np.random.default_rng([seed, epoch, index])
    return [c[int(rng.integers(len(c)))] if len(c) > 1 else c[0] for c in candidates]


def collate_samples(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch dataset items: images (N,3,H,W), texts (G lists of N), labels (G tensors: Long (N,)
    or Float (N, C_g)), indices Long (N,), skipped (all replaced paths)."""
    if not samples:
        raise ValueError("collate_samples got an empty batch")
    for s in samples:
        if s is None:
            raise TypeError("collate_samples got None; datasets must replace unreadable samples")
    num_levels = len(samples[0]["texts"])
    labels: list[torch.Tensor] = []
    for g in range(num_levels):
        column = [s["labels"][g] for s in samples]
        if isinstance(column[0], torch.Tensor):
            labels.append(torch.stack(column).float())
        else:
            labels.append(torch.tensor(column, dtype=torch.long))
    return {
        "images": torch.stack([s["image"] for s in samples]),
        "texts": [[s["texts"][g] for s in samples] for g in range(num_levels)],
        "labels": labels,
        "indices": torch.tensor([s["index"] for s in samples], dtype=torch.long),
        "skipped": [p for s in samples for p in s["skipped"]],
    }
