"""From the ``data:`` section of a run config to train/val/test datasets (the trainer's entry).

:func:`prepare_data` reads and splits the records (so the levels are known before the model is
built); :meth:`PreparedData.datasets` adds images and transforms; :func:`build_datasets` does
both.

See docs/architecture.md for the contract and docs/data.md for every key.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mgll.data.adapters import detect_adapter, get_adapter
from mgll.data.cache import PreprocessCache, SourceCaches, default_cache_dir
from mgll.data.config import DataConfig, SplitConfig
from mgll.data.dataset import MultiGranularDataset
from mgll.data.pool import is_pool_file, read_pool, sampling_weights
from mgll.data.records import LevelInfo, RecordSet
from mgll.data.shards import prepare_shards
from mgll.data.spec import find_spec, is_spec_path, records_from_spec, resolve_path
from mgll.data.splits import (
    SPLIT_NAMES,
    check_disjoint_patients,
    patient_split,
    read_split_file,
    write_split_file,
)
from mgll.data.transforms import augmentation_options, build_transform
from mgll.errors import DataError
from mgll.schema import PACKAGE_PREFIX, resolve_package_paths


def load_pool(path: str | Path, data_root: str | Path | None = None) -> RecordSet:
    """The records of the pool file ``path``, each source read by :func:`load_records`
    (see :mod:`mgll.data.pool`)."""
    return read_pool(path, data_root, load_records)


def load_records(
    source: str | Path | None,
    path: str | Path | None = None,
    *,
    data_root: str | Path | None = None,
    options: Mapping[str, Any] | None = None,
) -> tuple[RecordSet, Path]:
    """Records of a dataset and its folder.

    ``source`` is a format name, the path of a spec or pool file (``package:`` paths allowed),
    or None to detect the format of the folder ``path``. Relative paths are looked up under
    ``data_root`` first, then as given. A spec's own paths are relative to the spec file
    (``path`` is not used with a spec); a pool's are relative to it, then to ``data_root``.
    """
    options = dict(options or {})
    folder = resolve_path(path, data_root) if path is not None else None
    if isinstance(source, str) and source.startswith(PACKAGE_PREFIX):
        source = resolve_package_paths(source, "data.source")  # a pool or spec shipped by a package
    if source is not None and is_spec_path(source):
        spec_path = find_spec(source, data_root)
        if is_pool_file(spec_path):
            if options:
                raise DataError(
                    f"data.options: a pool ({spec_path}) takes no adapter options; give them "
                    "per source (sources[i].options)"
                )
            if folder is not None:
                warnings.warn(
                    f"data.path ({folder}) is not used with a pool: the paths in {spec_path} are "
                    "relative to it, then to the data root; set data.path to null",
                    stacklevel=2,
                )
            return load_pool(spec_path, data_root), spec_path.parent
        if options:
            raise DataError(
                f"data.options: a spec file ({spec_path}) takes no adapter options; "
                "put them in the spec"
            )
        if folder is not None and folder.resolve() != spec_path.parent.resolve():
            warnings.warn(
                f"data.path ({folder}) is not used with a spec: the paths in {spec_path} are "
                "relative to its folder; set data.path to null",
                stacklevel=2,
            )
        return records_from_spec(spec_path), spec_path.parent
    if folder is None:
        raise DataError("data.path: is required with a format name (the dataset folder)")
    if source is None:
        adapter = detect_adapter(folder)
    else:
        adapter = get_adapter(str(source))
        if not folder.exists():
            raise DataError(f"data.path: dataset folder {folder} does not exist")
    return adapter.load(folder, **options), folder if folder.is_dir() else folder.parent


def drop_missing_images(records: RecordSet) -> tuple[RecordSet, list[str]]:
    """The records whose image file exists, and the paths of those that do not."""
    keep, missing = [], []
    for i, r in enumerate(records.records):
        if os.path.exists(r.image):
            keep.append(i)
        else:
            missing.append(str(r.image))
    return (records.subset(keep) if missing else records), missing


def split_records(
    records: RecordSet,
    split: SplitConfig,
    seed: int,
    data_root: str | Path | None = None,
    folder: Path | None = None,
) -> dict[str, list[int]]:
    """Record indices per split from the ``data.split`` section (fractions, file or source).

    A split file's relative image paths are relative to the dataset ``folder``. A pool's own
    split (its file's ``split``) is used unless the section gives fractions or a file.
    """
    if records.pool is not None and split.file is None and split.fractions() is None:
        split = SplitConfig(mode="source")
    if split.file is not None:
        return read_split_file(resolve_path(split.file, data_root), records.records, root=folder)
    if split.mode == "source":
        result: dict[str, list[int]] = {name: [] for name in SPLIT_NAMES}
        for i, r in enumerate(records.records):
            name = r.metadata.get("split")
            if name not in result:
                raise DataError(
                    f"data.split.mode: 'source' needs every record to carry a split; "
                    f"{r.image} has {name!r} (use fractions instead)"
                )
            result[name].append(i)
        check_disjoint_patients(records.records, result, source="source split")
        return result
    return patient_split(
        records.records,
        split.fractions(),
        seed=seed if split.seed is None else split.seed,
        link_identical=split.link_identical,
    )


@dataclass
class PreparedData:
    """The records of a ``data:`` section, split, before any image is read.

    The trainer builds this first: the levels (G) size the model, whose image size and
    normalisation then shape the :meth:`datasets`.
    """

    config: DataConfig
    records: RecordSet
    folder: Path
    indices: dict[str, list[int]]  # record indices per split
    seed: int
    data_root: str | Path | None = None

    @property
    def levels(self) -> list[LevelInfo]:
        """The granularity levels, coarse to fine."""
        return list(self.records.levels)

    def datasets(
        self, *, image_size: int, mean: Sequence[float], std: Sequence[float]
    ) -> dict[str, MultiGranularDataset]:
        """Train/val/test datasets: the train split augments, val/test do not."""
        cfg = self.config
        augmentation = augmentation_options(cfg.augmentation)
        datasets = {}
        for name in SPLIT_NAMES:
            datasets[name] = MultiGranularDataset(
                self.records.subset(self.indices[name]),
                image_size=image_size,
                transform=build_transform(
                    train=name == "train", mean=mean, std=std, augmentation=augmentation
                ),
                cache=self.cache(image_size),
                resize_mode=cfg.resize,
                seed=self.seed,
            )
        return datasets

    def cache(self, image_size: int) -> PreprocessCache | SourceCaches | None:
        """The preprocessing cache of ``data.cache_dir``; a pool reads each source through the
        cache of its own folder (shared with single-source runs of that dataset)."""
        cfg = self.config
        if cfg.cache_dir is False:
            return None
        root = None if cfg.cache_dir is None else resolve_path(cfg.cache_dir, self.data_root)
        pool = self.records.pool
        if pool is None:
            # a cache root chosen in the config (the dataset folder only when it says so)
            folder = default_cache_dir(self.folder, root)
            return PreprocessCache(folder, image_size, cfg.resize) if folder else None
        caches = {}
        for source in pool.sources:
            folder = default_cache_dir(source.folder, root)
            if folder is None:
                return None  # the user cache cannot be written: no source is cached
            caches[source.name] = PreprocessCache(folder, image_size, cfg.resize)
        source_of = {str(r.image): r.metadata["source"] for r in self.records.records}
        return SourceCaches(caches, source_of)

    def sampling_weights(self, split: str = "train") -> list[float] | None:
        """Per sample of ``split``, its draw probability (a pool's source weights and sampling
        temperature), or None for uniform draws."""
        return sampling_weights(self.records.subset(self.indices[split]))

    def source_counts(self) -> dict[str, dict[str, int]]:
        """Images per source and split (a single dataset is one source, named by its format
        or folder)."""
        counts: dict[str, dict[str, int]] = {}
        for name in SPLIT_NAMES:
            for i in self.indices[name]:
                source = self.source_name(i)
                counts.setdefault(source, dict.fromkeys(SPLIT_NAMES, 0))[name] += 1
        return counts

    def source_name(self, index: int) -> str:
        """The source of record ``index``: its pool source, else the dataset's format name
        (or its folder name when the format was detected or a spec describes it)."""
        record = self.records.records[index]
        if "source" in record.metadata:
            return str(record.metadata["source"])
        given = self.config.source
        return given if given and not is_spec_path(given) else self.folder.name

    def write_split(self, path: str | Path) -> None:
        """Write the split file of this data (image, source, patient_id, split): what a run
        trained, validated and tested on; ``data.split.file`` reads it back. A pool's images
        are named by absolute path, so evaluating one of its sources can read it too."""
        write_split_file(
            path,
            self.records.records,
            self.indices,
            root=self.folder if self.records.pool is None else None,
            sources=[self.source_name(i) for i in range(len(self.records.records))],
        )


def prepare_data(
    data_cfg: DataConfig | Mapping[str, Any], data_root: str | Path | None, seed: int
) -> PreparedData:
    """Load, filter and split the records of the ``data:`` section (no image is read).

    With ``data.source: shards`` the result is a :class:`mgll.data.shards.ShardData` (levels
    and streaming datasets, the same face).

    Records whose image file does not exist are dropped with one warning (naming the first
    few); images that exist but cannot be decoded are replaced at load time (``skipped``).
    """
    cfg = DataConfig.from_dict(data_cfg)
    if cfg.source == "shards":  # written by `mgll data shard`: records and split are inside
        return prepare_shards(cfg, data_root, seed)  # type: ignore[return-value]
    records, folder = load_records(cfg.source, cfg.path, data_root=data_root, options=cfg.options)
    records = records.select_levels(cfg.levels)
    if records.excluded:
        summary = "; ".join(f"{reason}: {n}" for reason, n in records.excluded.most_common())
        warnings.warn(
            f"{records.source}: left out {sum(records.excluded.values())} row(s) ({summary})",
            stacklevel=2,
        )
    if cfg.drop_missing:
        records, missing = drop_missing_images(records)
        if missing:
            warnings.warn(
                f"{records.source}: {len(missing)} image file(s) do not exist and were left out "
                f"(first: {missing[:5]}); `mgll data check` lists them all",
                stacklevel=2,
            )
    if not records.records:
        raise DataError(f"{records.source}: no usable samples; run `mgll data check` on it")
    indices = split_records(records, cfg.split, seed, data_root, folder)
    return PreparedData(cfg, records, folder, indices, seed, data_root)


def build_datasets(
    data_cfg: DataConfig | Mapping[str, Any],
    data_root: str | Path | None,
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    seed: int,
) -> dict[str, MultiGranularDataset]:
    """Train/val/test :class:`MultiGranularDataset` from the ``data:`` config section
    (a :class:`DataConfig` or its plain mapping): :func:`prepare_data`, then its datasets."""
    prepared = prepare_data(data_cfg, data_root, seed)
    return prepared.datasets(image_size=image_size, mean=mean, std=std)
