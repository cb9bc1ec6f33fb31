"""The pretraining loaders: global batches of indexable datasets (:class:`GlobalBatchSampler`)
or a streaming dataset's own batch plan (``data.source: shards``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from mgll.distributed import DistributedInfo
from mgll.schema import ConfigError
from mgll.training.config import RunConfig
from mgll.training.sampling import GlobalBatchSampler, SeededSamples, sample_seed


def map_loaders(
    cfg: RunConfig,
    info: DistributedInfo,
    device: torch.device,
    train_set: Dataset,
    val_set: Dataset | None,
    collate_fn: Callable,
    weights: Sequence[float] | None = None,
) -> tuple[GlobalBatchSampler, DataLoader, DataLoader | None]:
    """Loaders of indexable datasets: global batches by :class:`GlobalBatchSampler` (drawn
    in proportion to ``weights`` when a pool gives them)."""
    seed, tcfg = cfg.train.seed, cfg.train
    try:
        sampler = GlobalBatchSampler(
            len(train_set),  # type: ignore[arg-type]
            tcfg.batch_size,
            info.rank,
            info.world_size,
            seed=seed,
            weights=weights,
        )
    except ValueError as err:
        raise ConfigError(str(err)) from err
    workers = cfg.data.num_workers
    loader_kwargs: dict[str, Any] = {
        "num_workers": workers,
        "collate_fn": collate_fn,
        "pin_memory": device.type == "cuda",
        "persistent_workers": workers > 0,
        # A private generator: creating an iterator must not draw from the global RNG.
        "generator": torch.Generator().manual_seed(seed),
    }
    train_loader = DataLoader(SeededSamples(train_set), batch_sampler=sampler, **loader_kwargs)
    val_loader = None
    if val_set is not None and len(val_set) > 0 and info.is_main:  # type: ignore[arg-type]
        # Validation draws the same texts and seeds every epoch: epochs stay comparable.
        val_keys = [(i, 0, sample_seed(seed, 0, i)) for i in range(len(val_set))]  # type: ignore[arg-type]
        val_loader = DataLoader(
            SeededSamples(val_set),
            sampler=val_keys,
            batch_size=cfg.eval.batch_size,
            **loader_kwargs,
        )
    return sampler, train_loader, val_loader


def stream_loaders(
    cfg: RunConfig,
    info: DistributedInfo,
    device: torch.device,
    train_set: Any,
    val_set: Any,
) -> tuple[Any, DataLoader, DataLoader | None]:
    """Loaders of streaming datasets (``data.source: shards``): the stream's own batch plan
    (``ShardSplit.batches``) is the sampler; workers are started each epoch with its plan."""
    workers = cfg.data.num_workers
    loader_kwargs: dict[str, Any] = {
        "batch_size": None,  # the streams collate their batches
        "num_workers": workers,
        "pin_memory": device.type == "cuda",
        "generator": torch.Generator().manual_seed(cfg.train.seed),
    }
    try:
        sampler = train_set.batches(
            cfg.train.batch_size // info.world_size, info.rank, info.world_size, workers=workers
        )
        val_loader = None
        if val_set is not None and len(val_set) > 0 and info.is_main:
            # Validation reads every sample once, in epoch 0's draws, every epoch.
            val_batches = val_set.batches(
                cfg.eval.batch_size, workers=workers, shuffle=False, drop_last=False
            )
            val_loader = DataLoader(val_batches, **loader_kwargs)
    except ValueError as err:  # the stream names the shards and the setting at fault
        raise ConfigError(str(err)) from err
    return sampler, DataLoader(sampler, **loader_kwargs), val_loader
