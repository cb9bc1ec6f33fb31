"""From the ``data:`` section of a run config to train/val/test datasets (the trainer's entry).

See docs/architecture.md for the contract and docs/data.md for every key.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mgll.data.adapters import detect_adapter, get_adapter
from mgll.data.cache import PreprocessCache, check_resize_mode, default_cache_dir
from mgll.data.dataset import MultiGranularDataset
from mgll.data.records import RecordSet
from mgll.data.spec import find_spec, is_spec_path, records_from_spec, resolve_path
from mgll.data.splits import SPLIT_NAMES, check_disjoint_patients, patient_split, read_split_file
from mgll.data.transforms import augmentation_options, build_transform

DATA_KEYS = {
    "source",
    "path",
    "levels",
    "split",
    "cache_dir",
    "num_workers",
    "augmentation",
    "resize",
    "options",
    "drop_missing",
}


def load_records(
    source: str | Path | None,
    path: str | Path | None = None,
    *,
    data_root: str | Path | None = None,
    options: Mapping[str, Any] | None = None,
) -> tuple[RecordSet, Path]:
    """Records of a dataset and its folder.

    ``source`` is a format name, the path of a spec file, or None to detect the format of the
    folder ``path``. Relative paths are looked up under ``data_root`` first, then as given. A
    spec's own paths are relative to the spec file (``path`` is not used with a spec).
    """
    options = dict(options or {})
    folder = resolve_path(path, data_root) if path is not None else None
    if source is not None and is_spec_path(source):
        spec_path = find_spec(source, data_root)
        if options:
            raise ValueError(
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
        raise ValueError("data.path: is required with a format name (the dataset folder)")
    if source is None:
        adapter = detect_adapter(folder)
    else:
        adapter = get_adapter(str(source))
        if not folder.exists():
            raise ValueError(f"data.path: dataset folder {folder} does not exist")
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
    split_cfg: Mapping[str, Any] | None,
    seed: int,
    data_root: str | Path | None = None,
    folder: Path | None = None,
) -> dict[str, list[int]]:
    """Record indices per split from the ``data.split`` section (fractions, file or source).

    A split file's relative image paths are relative to the dataset ``folder``.
    """
    cfg = dict(split_cfg or {})
    if "file" in cfg:
        return read_split_file(resolve_path(cfg["file"], data_root), records.records, root=folder)
    mode = cfg.get("mode", "patient")
    if mode not in ("patient", "source"):
        raise ValueError(
            f"data.split.mode: {mode!r} is not 'patient' (fractions) or 'source' (the split the "
            "source ships)"
        )
    if mode == "source":
        result: dict[str, list[int]] = {name: [] for name in SPLIT_NAMES}
        for i, r in enumerate(records.records):
            name = r.metadata.get("split")
            if name not in result:
                raise ValueError(
                    f"data.split.mode: 'source' needs every record to carry a split; "
                    f"{r.image} has {name!r} (use fractions instead)"
                )
            result[name].append(i)
        check_disjoint_patients(records.records, result, source="source split")
        return result
    unknown = set(cfg) - {*SPLIT_NAMES, "seed", "mode", "link_identical"}
    if unknown:
        raise ValueError(
            f"data.split: unknown key(s) {sorted(unknown)}; "
            "use train/val/test/seed/link_identical, file, or mode"
        )
    fractions = {k: cfg[k] for k in SPLIT_NAMES if k in cfg}
    return patient_split(
        records.records,
        fractions or None,
        seed=int(cfg.get("seed", seed)),
        link_identical=bool(cfg.get("link_identical", False)),
    )


def build_datasets(
    data_cfg: Mapping[str, Any],
    data_root: str | Path | None,
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    seed: int,
) -> dict[str, MultiGranularDataset]:
    """Train/val/test :class:`MultiGranularDataset` from the ``data:`` config section.

    The train split gets the augmenting transform, val/test the deterministic one. Records whose
    image file does not exist are dropped with one warning (naming the first few); images that
    exist but cannot be decoded are replaced at load time (``skipped``).
    """
    cfg = dict(data_cfg)
    unknown = set(cfg) - DATA_KEYS
    if unknown:
        warnings.warn(
            f"data: ignoring unknown key(s) {sorted(unknown)}; known: {sorted(DATA_KEYS)}",
            stacklevel=2,
        )
    records, folder = load_records(
        cfg.get("source"), cfg.get("path"), data_root=data_root, options=cfg.get("options")
    )
    records = records.select_levels(cfg.get("levels"))
    if records.excluded:
        summary = "; ".join(f"{reason}: {n}" for reason, n in records.excluded.most_common())
        warnings.warn(
            f"{records.source}: left out {sum(records.excluded.values())} row(s) ({summary})",
            stacklevel=2,
        )
    if cfg.get("drop_missing", True):
        records, missing = drop_missing_images(records)
        if missing:
            warnings.warn(
                f"{records.source}: {len(missing)} image file(s) do not exist and were left out "
                f"(first: {missing[:5]}); `mgll data check` lists them all",
                stacklevel=2,
            )
    if not records.records:
        raise ValueError(f"{records.source}: no usable samples; run `mgll data check` on it")

    resize = check_resize_mode(str(cfg.get("resize", "crop")))
    cache_cfg = cfg.get("cache_dir")
    if cache_cfg is False:
        cache_dir = None
    elif cache_cfg is None:
        cache_dir = default_cache_dir(folder)
    else:  # a cache root chosen in the config (the dataset folder only when it says so)
        cache_dir = default_cache_dir(folder, resolve_path(cache_cfg, data_root))
    augmentation = augmentation_options(cfg.get("augmentation"))

    indices = split_records(records, cfg.get("split"), seed, data_root, folder)
    datasets = {}
    for name in SPLIT_NAMES:
        cache = PreprocessCache(cache_dir, image_size, resize) if cache_dir is not None else None
        datasets[name] = MultiGranularDataset(
            records.subset(indices[name]),
            image_size=image_size,
            transform=build_transform(
                train=name == "train", mean=mean, std=std, augmentation=augmentation
            ),
            cache=cache,
            resize_mode=resize,
            seed=seed,
        )
    return datasets
