"""What a pretraining run holds while it runs: :class:`Run` (everything ``build`` makes) and
:class:`TrainState` (where the run is)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mgll.distributed import DistributedInfo
from mgll.models.model import ContrastiveModel
from mgll.training import checkpoint as ckpt
from mgll.training.config import RunConfig
from mgll.training.objective import Objective
from mgll.training.run_control import StopRequests
from mgll.training.step import Precision


@dataclass
class TrainState:
    """Where a run is: optimizer steps taken, epoch, steps taken in that epoch."""

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0


@dataclass
class Run:
    """Everything :func:`build` makes, in one place."""

    cfg: RunConfig
    output_dir: Path
    info: DistributedInfo
    device: torch.device
    objective: Objective
    level_names: list[str]
    model: ContrastiveModel  # the plain model (checkpoints, validation)
    wrapped: nn.Module  # what the step calls: DDP and/or torch.compile around ``model``
    train_set: Dataset
    val_set: Dataset | None
    sampler: Any  # GlobalBatchSampler, or a stream's batch plan: steps_per_epoch, set_epoch
    train_loader: DataLoader
    val_loader: DataLoader | None
    optimizer: torch.optim.Optimizer
    precision: Precision
    warmup_steps: int
    total_steps: int
    max_steps: int
    skipped: set[str] = field(default_factory=set)
    sources: dict[str, dict[str, int]] = field(default_factory=dict)  # images per source, split
    write_split: Callable[[Path], None] | None = None  # writes split.csv (the data's, if known)
    stop: StopRequests | None = None  # signals asking for a clean stop
    last_checkpoint: Path | None = None  # written (or resumed from) by this run
    validated_at_end: bool = False

    @property
    def main(self) -> bool:
        """Whether this process writes files (rank 0)."""
        return self.info.is_main

    @property
    def checkpoint_dir(self) -> Path:
        """``OUT/checkpoints``."""
        return self.output_dir / ckpt.CHECKPOINT_SUBDIR
