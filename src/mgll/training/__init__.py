"""Pretraining: the training loop, checkpoints and resume, ``mgll pretrain`` and ``mgll export``.

``train(load_config("cpu-demo"), data_root, output_dir)`` is what ``mgll pretrain`` runs.
"""

from mgll.training.config import ConfigError, RunConfig, load_config
from mgll.training.objective import Objective
from mgll.training.step import NonFiniteLossError
from mgll.training.trainer import train

__all__ = ["ConfigError", "NonFiniteLossError", "Objective", "RunConfig", "load_config", "train"]
