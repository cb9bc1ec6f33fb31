"""``SegmentationConfig``: how ``mgll segment`` trains and scores a decoder, as one frozen object.

Read like pretraining's sections: :func:`mgll.schema.from_mapping` checks every key against the
field's type (an unknown key is the schema's one-line error naming its closest match), the
defaults live here only, and :func:`load_segmentation_config` layers a YAML file, ``key=value``
overrides and the command-line flags over them. ``results.json`` records it as ``config``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mgll.metrics import DEFAULT_RESAMPLES
from mgll.schema import (
    ConfigError,
    PrecisionName,
    build_section,
    from_mapping,
    read_config_file,
    to_dict,
)

ResizeMode = Literal["pad", "crop", "stretch"]


@dataclass(frozen=True)
class SegSplitConfig:
    """``split``: patient-level fractions of the images, and the seed drawing the patients."""

    train: float = 0.6
    val: float = 0.1
    test: float = 0.3
    seed: int | None = None  # null: the config's seed

    def __post_init__(self) -> None:
        values = (self.train, self.val, self.test)
        if min(values) < 0 or abs(sum(values) - 1.0) > 1e-6:
            # checked here, before an encoder is loaded, as the split itself would refuse it
            raise ConfigError(
                f"split: train/val/test fractions must be >= 0 and sum to 1, got {values}"
            )

    def fractions(self) -> dict[str, float]:
        """The fractions by split name (what :func:`mgll.data.splits.patient_split` takes)."""
        return {"train": self.train, "val": self.val, "test": self.test}


@dataclass(frozen=True)
class SegmentationConfig:
    """Decoder, optimisation, split, scoring and run settings of a segmentation run."""

    epochs: int = 30
    batch_size: int = 8
    lr: float = 1e-3  # decoder peak lr (AdamW; per step: linear warm-up, then half cosine to 0)
    encoder_lr: float = 1e-4  # the tower's peak lr, unless frozen (its lr_scale: encoder_lr / lr)
    warmup_epochs: float = 1.0  # the linear warm-up of the lr
    weight_decay: float = 1e-4
    freeze_encoder: bool = False  # train the decoder only
    feature_size: int = 16  # decoder channels at full resolution
    resize: ResizeMode = "pad"  # images and masks onto the tower's square input
    split: SegSplitConfig = field(default_factory=SegSplitConfig)
    seed: int = 0  # decoder init, batch order, bootstrap (and the split unless split.seed)
    precision: PrecisionName = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 with loss scaling)
    bootstrap: int = DEFAULT_RESAMPLES  # patient-bootstrap resamples of each 95% CI
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_workers: int = 0  # data-loader processes
    cache_dir: str | None = None  # preprocessing cache; null: the user cache

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "feature_size", "bootstrap"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.lr <= 0 or self.encoder_lr < 0 or self.warmup_epochs < 0:
            raise ConfigError(
                f"lr must be > 0, encoder_lr and warmup_epochs >= 0, got lr={self.lr}, "
                f"encoder_lr={self.encoder_lr}, warmup_epochs={self.warmup_epochs}"
            )
        if self.num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {self.num_workers}")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ConfigError(f"device: {self.device!r} is not auto, cpu, mps, cuda or cuda:N")

    @property
    def split_seed(self) -> int:
        """The seed of the patient split (``split.seed``, else ``seed``)."""
        return self.seed if self.split.seed is None else self.split.seed

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | SegmentationConfig) -> SegmentationConfig:
        """The typed config of a plain mapping (a YAML file, results.json's ``config``)."""
        return from_mapping(cls, data)

    def to_dict(self) -> dict[str, Any]:
        """The plain nested dict (what results.json records)."""
        return to_dict(self)


def load_segmentation_config(
    path: str | Path | None = None, overrides: Sequence[str] | Sequence[tuple[str, Any]] = ()
) -> SegmentationConfig:
    """The config of a YAML file (None: the defaults) with ``overrides`` applied in order.

    ``overrides`` are ``"split.seed=3"`` strings or ``(key, value)`` pairs. Errors in the
    file name it; errors in an override name the key.
    """
    raw, origin = read_config_file(path)
    return build_section(SegmentationConfig, raw, origin, overrides)
