"""``data.source: shards`` as the trainer's data source: the manifest's levels and splits as
:class:`ShardSplit` datasets, local shards checked to exist before a run starts."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mgll.data.config import DataConfig
from mgll.data.records import LevelInfo
from mgll.data.shards.manifest import (
    SPLIT_FILE,
    ShardError,
    ShardFile,
    ShardLocation,
    locate_shards,
    open_url,
    read_manifest,
)
from mgll.data.shards.stream import ShardSplit
from mgll.data.splits import SPLIT_NAMES
from mgll.data.transforms import augmentation_options, build_transform
from mgll.io import atomic_write


@dataclass
class ShardData:
    """``data.source: shards`` as the trainer's data source (``PreparedData``'s face)."""

    config: DataConfig
    location: ShardLocation
    manifest: dict[str, Any]
    seed: int

    @property
    def levels(self) -> list[LevelInfo]:
        """The granularity levels the shards were written with, coarse to fine."""
        return [
            LevelInfo(lv["name"], list(lv["vocabulary"]), bool(lv["multi_label"]))
            for lv in self.manifest["levels"]
        ]

    def source_counts(self) -> dict[str, dict[str, int]]:
        """Samples per source and split, as the shards hold them (the run summary's)."""
        return {name: dict(c) for name, c in self.manifest.get("sources", {}).items()}

    def write_split(self, path: str | Path) -> None:
        """Copy the shards' ``split.csv`` (written by ``mgll data shard``) to ``path``."""
        source = self.location.shard(SPLIT_FILE)
        with open_url(source, self.location.local) as handle:
            data = handle.read()
        atomic_write(Path(path), lambda tmp: tmp.write_bytes(data))

    def shards(self, split: str) -> list[ShardFile]:
        """The shards of ``split`` (those a brace pattern selected, if one did)."""
        entries = self.manifest["shards"]
        names = [n for n in self.manifest["splits"][split]["shards"]]
        if self.location.selected is not None:
            names = [n for n in names if n in self.location.selected]
        return [
            ShardFile(n, self.location.shard(n), int(entries[n]["samples"]), self.location.local)
            for n in names
        ]

    def datasets(
        self, *, image_size: int, mean: Sequence[float], std: Sequence[float]
    ) -> dict[str, ShardSplit]:
        """Train/val/test :class:`ShardSplit`: the train split augments, val/test do not."""
        stored = self.manifest["preprocessing"]
        if int(stored["image_size"]) != int(image_size):
            raise ShardError(
                f"data.path: the shards at {self.location.manifest} hold {stored['image_size']} "
                f"px images but the model takes {image_size} px; write shards with "
                f"`mgll data shard --image-size {image_size}`"
            )
        augmentation = augmentation_options(self.config.augmentation)
        return {
            split: ShardSplit(
                self.shards(split),
                self.levels,
                image_size=image_size,
                transform=build_transform(
                    train=split == "train", mean=mean, std=std, augmentation=augmentation
                ),
                seed=self.seed,
                shuffle_buffer=self.config.shuffle_buffer,
            )
            for split in SPLIT_NAMES
        }


def prepare_shards(cfg: DataConfig, data_root: str | Path | None, seed: int) -> ShardData:
    """Open ``data.path``'s shards: read the manifest, check local shards exist (a missing one
    is an error now, not mid-epoch) and that a brace pattern names shards it lists."""
    if cfg.path is None:
        raise ShardError("data.path: give the folder (or manifest, or shard pattern) of the shards")
    if cfg.levels is not None:
        raise ShardError(
            "data.levels: shards keep the levels they were written with; write shards from a "
            "spec or pool holding only the levels you want, and set data.levels to null"
        )
    location = locate_shards(cfg.path, data_root)
    manifest = read_manifest(location)
    listed = manifest["shards"]
    if location.selected is not None:
        unknown = [n for n in location.selected if n not in listed]
        if unknown:
            raise ShardError(
                f"data.path: {unknown[0]} is not listed in {location.manifest} "
                f"({len(unknown)} such shard(s))"
            )
    data = ShardData(cfg, location, manifest, seed)
    if location.local:
        for split in SPLIT_NAMES:
            for shard in data.shards(split):
                path = Path(shard.url)
                if not path.is_file():
                    raise ShardError(
                        f"data.path: shard {path} (listed in {location.manifest}) does not "
                        "exist; copy it back or write the shards again with `mgll data shard`"
                    )
                if path.stat().st_size != listed[shard.name]["bytes"]:
                    warnings.warn(
                        f"shard {path} has {path.stat().st_size} bytes, the manifest says "
                        f"{listed[shard.name]['bytes']}: its damaged members will be skipped; "
                        "`mgll data shard` run again rewrites it",
                        stacklevel=2,
                    )
    return data
