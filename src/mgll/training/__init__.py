"""Pretraining: the training loop, checkpoints and resume, ``mgll pretrain`` and ``mgll export``.

``train(load_config("cpu-demo"), data_root, output_dir)`` is what ``mgll pretrain`` runs.

The names below are loaded when first asked for (``from mgll.training import train`` loads the
trainer), so ``from mgll.training.X import Y`` loads ``X`` and what it imports, not the trainer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mgll.lazy import lazy_names

if TYPE_CHECKING:
    from mgll.schema import ConfigError
    from mgll.training.config import RunConfig, load_config
    from mgll.training.objective import Objective
    from mgll.training.step import NonFiniteLossError
    from mgll.training.trainer import train

__all__ = ["ConfigError", "NonFiniteLossError", "Objective", "RunConfig", "load_config", "train"]

_HOMES = {
    "ConfigError": "mgll.schema",
    "NonFiniteLossError": "mgll.training.step",
    "Objective": "mgll.training.objective",
    "RunConfig": "mgll.training.config",
    "load_config": "mgll.training.config",
    "train": "mgll.training.trainer",
}


__getattr__ = lazy_names(__name__, _HOMES)
