"""``DataConfig``: the ``data:`` section of a run config, owned by ``mgll.data``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from mgll.data.cache import check_resize_mode
from mgll.data.splits import SPLIT_NAMES
from mgll.data.transforms import augmentation_options
from mgll.schema import ConfigError, from_mapping


@dataclass(frozen=True)
class SplitConfig:
    """``data.split``: patient-level fractions, a split file, or the source's own split."""

    train: float | None = None  # fractions; all null = the default 0.8/0.1/0.1
    val: float | None = None
    test: float | None = None
    seed: int | None = None  # null: train.seed
    link_identical: bool = False  # byte-identical images keep their patients together
    file: str | None = None  # a split file (mgll data split --output), replaces fractions
    mode: Literal["patient", "source"] = "patient"  # source: the split the records carry

    def fractions(self) -> dict[str, float] | None:
        """The fractions given, by split name (None when none is given)."""
        given = {name: getattr(self, name) for name in SPLIT_NAMES}
        return {k: v for k, v in given.items() if v is not None} or None


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, which levels, how it is split, cached, augmented and loaded."""

    source: str | None = None  # format name, spec file or shards; null = detect from path
    path: str | None = None  # dataset folder, relative to --data-root or absolute
    levels: list[int] | None = None  # granularity levels to keep (indices); null = all
    split: SplitConfig = field(default_factory=SplitConfig)
    cache_dir: str | bool | None = None  # null: the user cache; false: no cache
    num_workers: int = 0  # data-loader processes
    augmentation: dict[str, Any] | bool | None = None  # see mgll.data.transforms
    resize: str = "crop"  # crop | pad | stretch
    options: dict[str, Any] = field(default_factory=dict)  # the adapter's keyword options
    drop_missing: bool = True  # leave out records whose image file does not exist
    shuffle_buffer: int = 1000  # source: shards; samples each loader worker holds to shuffle

    def __post_init__(self) -> None:
        if self.cache_dir is True:
            raise ConfigError("data.cache_dir: give a folder, null (the user cache) or false")
        if self.shuffle_buffer < 0:
            raise ConfigError(f"data.shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        try:
            check_resize_mode(self.resize)
            augmentation_options(self.augmentation)
        except ValueError as err:
            raise ConfigError(str(err)) from err

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | DataConfig) -> DataConfig:
        """The typed section from the plain ``data:`` mapping of a config file."""
        return from_mapping(cls, data, "data")
