"""The multi-granular dataset model: records, levels and what was left out.

A record is one image with G granularity levels (coarse to fine). At each level it has one or
more candidate texts and a label: nothing (missing), one class name, or several (multi-label).
Class names become ids through each level's fixed vocabulary, so every process agrees on them.
Adapters and dataset specs produce a :class:`RecordSet`; the torch dataset only reads it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from mgll.errors import DataError


@dataclass(frozen=True)
class LevelInfo:
    """One granularity level: its name, its class names in id order, and whether a sample may
    carry several classes at once (then labels are multi-hot vectors)."""

    name: str
    vocabulary: list[str]
    multi_label: bool = False

    def class_id(self, name: str) -> int:
        """Id of ``name`` in this level's vocabulary (ValueError naming the level if absent)."""
        try:
            return self._index[name]
        except KeyError:
            shown = self.vocabulary[:10] + (["..."] if len(self.vocabulary) > 10 else [])
            raise DataError(
                f"label {name!r} is not in the vocabulary of level {self.name!r} "
                f"({len(self.vocabulary)} classes: {shown}); add it to the vocabulary"
            ) from None

    @cached_property
    def _index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.vocabulary)}


@dataclass
class Record:
    """One image and its texts/labels at every level, plus metadata.

    ``texts[g]`` holds the candidate texts at level g (at least one; one is drawn per epoch);
    ``labels[g]`` holds the class names at level g (empty = missing at that level).
    ``patient_id`` groups records for splitting; ``metadata`` keeps e.g. view, sex, source row.
    """

    image: Path
    texts: list[list[str]]
    labels: list[list[str]]
    patient_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PoolSource:
    """One source of a pool (docs/data.md, "Pools"): its name (the namespace of its patient ids
    and the ``source`` of its records), its dataset folder (whose preprocessing cache its images
    use, as in a single-source run), its sampling weight and the pool levels it labels."""

    name: str
    folder: Path
    weight: float = 1.0
    levels: tuple[str, ...] = ()
    records: int = 0


@dataclass(frozen=True)
class PoolInfo:
    """What a pool adds to its records: the pool file, the sources in order, the sampling
    temperature, groups of byte-identical images (linked into one patient) and the images a
    link moved to a more held-out split than their source gave them."""

    file: str
    sources: tuple[PoolSource, ...]
    temperature: float = 1.0
    identical: tuple[tuple[str, ...], ...] = ()
    moved: tuple[str, ...] = ()

    def source(self, name: str) -> PoolSource:
        """The source called ``name`` (KeyError if none)."""
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(name)


@dataclass
class RecordSet:
    """Records of one dataset plus the levels they refer to and the counted exclusions.

    ``excluded`` maps a reason ("finding 'todo' (unlabelled)") to how many source rows were left
    out for it; ``excluded_examples`` keeps a few identifiers per reason so reports can name them.
    ``source`` says where the records came from (file or folder) for messages.
    ``missing_cells`` counts table cells read as missing because of how they were spelled
    (``{(column, "NaN"): n}``; see :data:`mgll.data.tables.MISSING_SPELLINGS`). ``pool`` is
    set for a pool of several sources; each record then names its source in
    ``metadata["source"]``.
    """

    levels: list[LevelInfo]
    records: list[Record]
    source: str = ""
    excluded: Counter[str] = field(default_factory=Counter)
    excluded_examples: dict[str, list[str]] = field(default_factory=dict)
    missing_cells: Counter[tuple[str, str]] = field(default_factory=Counter)
    pool: PoolInfo | None = None  # set when the records come from several sources (a pool)

    def exclude(self, reason: str, example: str) -> None:
        """Count one left-out source row under ``reason`` (keeping up to 5 examples)."""
        self.excluded[reason] += 1
        examples = self.excluded_examples.setdefault(reason, [])
        if len(examples) < 5:
            examples.append(example)

    def select_levels(self, indices: Sequence[int] | None) -> RecordSet:
        """A view keeping only the levels at ``indices`` (in that order); None keeps all."""
        if indices is None:
            return self
        indices = [int(i) for i in indices]
        for i in indices:
            if not -len(self.levels) <= i < len(self.levels):
                raise DataError(
                    f"data.levels: index {i} is out of range; {self.source} has "
                    f"{len(self.levels)} levels: {[lv.name for lv in self.levels]}"
                )
        records = [
            Record(
                image=r.image,
                texts=[r.texts[i] for i in indices],
                labels=[r.labels[i] for i in indices],
                patient_id=r.patient_id,
                metadata=r.metadata,
            )
            for r in self.records
        ]
        return RecordSet(
            levels=[self.levels[i] for i in indices],
            records=records,
            source=self.source,
            excluded=Counter(self.excluded),
            excluded_examples=dict(self.excluded_examples),
            missing_cells=Counter(self.missing_cells),
            pool=self.pool,
        )

    def subset(self, indices: Sequence[int]) -> RecordSet:
        """The same levels with only the records at ``indices``."""
        return RecordSet(
            levels=self.levels,
            records=[self.records[i] for i in indices],
            source=self.source,
            excluded=Counter(self.excluded),
            excluded_examples=dict(self.excluded_examples),
            missing_cells=Counter(self.missing_cells),
            pool=self.pool,
        )

    def label_counts(self) -> list[Counter[str]]:
        """Per level, how many records carry each class (a multi-label record counts once per
        class); the key "" counts records missing at that level."""
        counts: list[Counter[str]] = [Counter() for _ in self.levels]
        for r in self.records:
            for g, names in enumerate(r.labels):
                if names:
                    counts[g].update(set(names))
                else:
                    counts[g][""] += 1
        return counts


def vocabulary_from(
    labels: Sequence[Sequence[str]], given: Sequence[str] | None = None
) -> list[str]:
    """The vocabulary of a level: ``given`` when set (order kept), else the sorted class names
    seen, so ids do not depend on row order."""
    if given is not None:
        return [str(v) for v in given]
    seen = {name for names in labels for name in names}
    try:
        # Numeric grades sort as numbers ("2" before "10"), so ids follow severity; ties such as
        # "1" and "1.0" by their text, so the order never depends on set (hash) order.
        return sorted(seen, key=lambda name: (float(name), name))
    except ValueError:
        return sorted(seen)


def build_levels(
    names: Sequence[str],
    records: Sequence[Record],
    multi_label: Sequence[bool],
    vocabularies: Sequence[Sequence[str] | None] | None = None,
) -> list[LevelInfo]:
    """LevelInfo for each level from the records' labels (or the given vocabularies)."""
    levels = []
    for g, name in enumerate(names):
        given = vocabularies[g] if vocabularies is not None else None
        vocab = vocabulary_from([r.labels[g] for r in records], given)
        levels.append(LevelInfo(name=name, vocabulary=vocab, multi_label=bool(multi_label[g])))
    return levels
