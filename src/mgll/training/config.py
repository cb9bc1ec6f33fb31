"""Run configs: shipped recipes or YAML files, over the defaults, overridden by ``key=value``.

A run config is a :class:`RunConfig`: one typed section per owner, each a frozen dataclass that
holds its keys and their defaults in one place:

- ``model``: :class:`mgll.models.ModelConfig`, ``data``: :class:`mgll.data.DataConfig`;
- ``loss``: :class:`LossConfig`, ``train``: :class:`TrainConfig`, ``eval``, ``log`` and
  ``checkpoint`` (this module).

:func:`load_config` reads YAML, applies overrides and builds the sections through
:func:`mgll.schema.from_mapping`, so an unknown key anywhere is the same error naming it and
its closest known key. :func:`save_config` writes the resolved config, which loads back.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from mgll.data.config import DataConfig
from mgll.io import atomic_write
from mgll.losses import DEFAULT_WEIGHTS
from mgll.models.config import ModelConfig
from mgll.schema import (
    MOVED_KEYS,
    PACKAGE_PREFIX,
    SHIPPED_CONFIG_PACKAGE,
    ConfigError,
    PrecisionName,
    build_section,
    from_mapping,
    parse_overrides,
    parse_value,
    read_config_file,
    read_yaml,
    resolve_package_paths,
    shipped_config_names,
    to_dict,
)

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "EvalConfig",
    "LogConfig",
    "LossConfig",
    "LossWeights",
    "PrecisionName",
    "RunConfig",
    "TrainConfig",
    "build_section",
    "load_config",
    "parse_overrides",
    "parse_value",
    "read_config_file",
    "read_yaml",
    "resolve_package_paths",
    "save_config",
]


@dataclass(frozen=True)
class LossWeights:
    """``loss.weights``: weight of each MGLL term (0 switches a term off and out of the log)."""

    sclip: float = DEFAULT_WEIGHTS["sclip"]
    pointwise: float = DEFAULT_WEIGHTS["pointwise"]
    skl: float = DEFAULT_WEIGHTS["skl"]

    def __post_init__(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            if value < 0:
                raise ConfigError(f"loss.weights.{name} must be >= 0, got {value}")


@dataclass(frozen=True)
class LossConfig:
    """``loss``: the objective (see :class:`mgll.training.objective.Objective`)."""

    name: Literal["mgll", "clip"] = "mgll"
    weights: LossWeights = field(default_factory=LossWeights)
    # CLIP's caption (loss.name: clip): a level's texts (index; -1 = the finest), or
    # "joined": every level's text of the sample joined into one caption, coarse to fine
    clip_level: int | Literal["joined"] = -1
    local_loss: bool = False  # distributed: local rows against the global batch
    # rows per tile of the loss (logits recomputed in backward: memory chunk_size x N instead
    # of G N^2, the same values and gradients); null = untiled
    chunk_size: int | None = None
    # MGLL only: the loss kernel's element-wise passes through torch.compile (docs/loss.md;
    # the first step compiles for tens of seconds, then each step is faster)
    compile: bool = False

    def __post_init__(self) -> None:
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ConfigError(
                f"loss.chunk_size must be a positive number of rows or null, got {self.chunk_size}"
            )
        if self.compile and self.name == "clip":
            raise ConfigError(
                "loss.compile applies to the MGLL loss only (CLIP's loss is one matmul and two "
                "cross-entropies); drop loss.compile or use loss.name: mgll"
            )


@dataclass(frozen=True)
class TrainConfig:
    """``train``: optimisation, precision, device and reproducibility."""

    epochs: int = 20
    batch_size: int = 32  # global contrastive batch per optimizer step (all ranks, all micro)
    accum_steps: int = 1  # micro-batches per optimizer step, features cached across them
    lr: float = 1.0e-4
    min_lr: float = 0.0
    warmup_epochs: float = 1.0
    weight_decay: float = 1.0e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1.0e-8
    grad_clip: float | None = 10.0  # max global grad norm; null = off
    precision: PrecisionName = "fp32"
    grad_checkpointing: bool = False  # recompute tower activations in backward
    compile: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    deterministic: bool = False
    max_steps: int | None = None  # total optimizer steps, also when resuming; null = all epochs

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "accum_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps must be >= 1 or null, got {self.max_steps}")
        if len(self.betas) != 2:
            raise ConfigError(f"train.betas must be two numbers, got {self.betas!r}")
        self.per_process_batch(1)

    def per_process_batch(self, world_size: int) -> int:
        """Samples each process encodes per micro-batch; the global batch must divide evenly."""
        parts = world_size * self.accum_steps
        if self.batch_size % parts:
            raise ConfigError(
                f"train.batch_size ({self.batch_size}) must be divisible by processes x "
                f"train.accum_steps ({world_size} x {self.accum_steps})"
            )
        return self.batch_size // parts


@dataclass(frozen=True)
class EvalConfig:
    """``eval``: validation at epoch ends."""

    every_epochs: int = 1  # 0 = never
    batch_size: int = 64
    recall_at: list[int] = field(default_factory=lambda: [1, 5])
    precision_at: list[int] = field(default_factory=lambda: [1, 5])


@dataclass(frozen=True)
class LogConfig:
    """``log``: metrics.jsonl, progress bar, TensorBoard."""

    every_steps: int = 10
    progress_bar: bool = True
    tensorboard: bool = False

    def __post_init__(self) -> None:
        if self.every_steps < 1:
            raise ConfigError(f"log.every_steps must be >= 1, got {self.every_steps}")


@dataclass(frozen=True)
class CheckpointConfig:
    """``checkpoint``: how often and how many."""

    every_steps: int = 1000
    every_minutes: float | None = 30.0  # also after this much time; null = off
    keep_last: int = 3
    on_sigusr1: bool = False  # SIGUSR1 stops with a checkpoint, like SIGINT/SIGTERM (SLURM)

    def __post_init__(self) -> None:
        if self.every_minutes is not None and self.every_minutes <= 0:
            raise ConfigError(
                f"checkpoint.every_minutes must be > 0 or null, got {self.every_minutes}"
            )
        if self.every_steps < 1:
            raise ConfigError(f"checkpoint.every_steps must be >= 1, got {self.every_steps}")
        if self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last must be >= 1, got {self.keep_last}")


@dataclass(frozen=True)
class RunConfig:
    """A resolved run config: what ``mgll pretrain`` trains and saves as ``config.yaml``."""

    model: ModelConfig
    data: DataConfig
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | RunConfig) -> RunConfig:
        """The typed config of a plain nested mapping (a YAML file, a checkpoint's config)."""
        if isinstance(data, RunConfig):
            return data
        return from_mapping(cls, migrate(data))

    def to_dict(self) -> dict[str, Any]:
        """The plain nested dict (what config.yaml and checkpoints hold)."""
        return to_dict(self)


def migrate(data: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a raw run config with moved keys at their new place (with a warning).

    ``model.grad_checkpointing`` (before the switch had one owner) becomes
    ``train.grad_checkpointing``: true if either was true.
    """
    raw = copy.deepcopy(dict(data))
    for old, new in MOVED_KEYS.items():
        (old_section, old_key), (new_section, new_key) = old.split("."), new.split(".")
        section = raw.get(old_section)
        if not isinstance(section, dict) or old_key not in section:
            continue
        value = section.pop(old_key)
        target = raw.setdefault(new_section, {})
        if value and isinstance(target, dict):
            target[new_key] = True
            warnings.warn(
                f"config key '{old_section}.{old_key}' is now '{new_section}.{new_key}'; "
                "read it as that",
                stacklevel=3,
            )
    return raw


def _source_text(name_or_path: str) -> tuple[dict[str, Any], str]:
    if name_or_path.startswith(PACKAGE_PREFIX):  # package:mgll/configs/cpu-demo.yaml
        name_or_path = resolve_package_paths(name_or_path, "config")
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return read_yaml(path), str(path)
    names = shipped_config_names()
    if name_or_path not in names:
        raise ConfigError(
            f"unknown config {name_or_path!r}: give a YAML file path or one of the shipped "
            f"configs: {', '.join(names)}"
        )
    shipped = resources.files(SHIPPED_CONFIG_PACKAGE) / f"{name_or_path}.yaml"
    data = parse_value(shipped.read_text(encoding="utf-8")) or {}
    return data, f"shipped config {name_or_path!r}"


def load_config(
    name_or_path: str, overrides: Sequence[str] | Sequence[tuple[str, Any]] = ()
) -> RunConfig:
    """Resolve a run config: the shipped recipe or YAML file over the defaults, then overrides.

    ``overrides`` are ``"train.lr=3e-4"`` strings or ``(key, value)`` pairs; an override
    replaces the value at its key (a mapping value replaces the whole sub-section).
    """
    data, origin = _source_text(name_or_path)
    return build_section(RunConfig, migrate(data), origin, overrides)


def save_config(cfg: RunConfig, path: Path) -> None:
    """Write the resolved config as YAML (readable by :func:`load_config`)."""
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
