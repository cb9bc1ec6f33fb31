"""``ModelConfig``: the ``model:`` section of a run config, owned by ``mgll.models``."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mgll.losses import INIT_LOGIT_BIAS, INIT_LOGIT_SCALE
from mgll.models.token_cache import DEFAULT_SIZE as TOKEN_CACHE_SIZE
from mgll.schema import ConfigError, from_mapping, resolve_package_paths, to_dict

# The kinds of text tower and hf poolings a config may name; ``models/text_towers.py`` holds a
# builder (``TEXT_TOWER_BUILDERS``) and a pooling function (``POOLINGS``) for each (tested).
TEXT_TOWER_TYPES = ("open_clip", "hf")
POOLING_NAMES = ("mean", "cls")


@dataclass(frozen=True)
class ImageConfig:
    """``model.image``: an open_clip or timm architecture and where its weights come from."""

    arch: str | None = None  # open_clip name, shipped JSON config, hf-hub:org/repo, timm:NAME
    pretrained: str | None = None  # open_clip tag, hf-hub id, imagenet (timm:), or a local file
    quick_gelu: bool | None = None  # null: follow the weights (OpenAI's use QuickGELU)
    # Input normalisation; null: the weights' own (ImageNet for the authors' MGLL checkpoints,
    # the architecture's open_clip setting otherwise).
    mean: list[float] | None = None
    std: list[float] | None = None
    image_size: int | None = None  # input side in pixels; null: the architecture's own
    # Train only the last N layer groups of the image tower (open_clip's lock; 0: none);
    # null: the whole tower trains. Cheaper steps for a pretrained tower on a CPU.
    unlocked_groups: int | None = None

    def __post_init__(self) -> None:
        if self.unlocked_groups is not None and (
            isinstance(self.unlocked_groups, bool)
            or not isinstance(self.unlocked_groups, int)
            or self.unlocked_groups < 0
        ):
            raise ConfigError(
                f"model.image.unlocked_groups: {self.unlocked_groups!r} must be a whole number "
                ">= 0 (the last layer groups that train), or null to train the whole tower"
            )
        if self.image_size is not None and (
            isinstance(self.image_size, bool)
            or not isinstance(self.image_size, int)
            or not 16 <= self.image_size <= 4096
        ):
            raise ConfigError(
                f"model.image.image_size: {self.image_size!r} must be a whole number of pixels "
                "from 16 to 4096, or null for the architecture's own"
            )
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and (len(value) != 3 or (name == "std" and min(value) <= 0)):
                raise ConfigError(
                    f"model.image.{name}: {value!r} must be three per-channel numbers (RGB)"
                    + (", all > 0" if name == "std" else "")
                    + ", or null for the weights' own"
                )


@dataclass(frozen=True)
class TextConfig:
    """``model.text``: ``{type: open_clip}`` (the arch's own tower) or ``{type: hf, name, ...}``."""

    type: str = "open_clip"
    name: str | None = None  # hf: model id or local folder
    pooling: str = "mean"  # hf: mean | cls
    max_length: int = 128  # hf: tokens per text
    freeze: bool = False  # hf: keep the encoder's weights, train only the projection
    token_cache: int = TOKEN_CACHE_SIZE  # strings whose token ids are kept (0: none)

    def __post_init__(self) -> None:
        if self.type not in TEXT_TOWER_TYPES:
            raise ConfigError(
                f"model.text.type: {self.type!r} is not a text tower type; use one of "
                f"{sorted(TEXT_TOWER_TYPES)}"
            )
        if self.type == "hf" and not self.name:
            raise ConfigError(
                "model.text.name: missing; give a Hugging Face model id (e.g. "
                "emilyalsentzer/Bio_ClinicalBERT) or the path of a local model folder"
            )
        if self.type == "open_clip" and self.name:
            raise ConfigError(
                f"model.text.name: {self.name!r} is for type hf; the open_clip text tower is "
                "the architecture's own (drop name, or set model.text.type=hf)"
            )
        if self.type == "open_clip" and self.freeze:
            raise ConfigError(
                "model.text.freeze: only a Hugging Face text tower (type hf) can be frozen"
            )
        if isinstance(self.token_cache, bool) or not isinstance(self.token_cache, int):
            raise ConfigError(
                f"model.text.token_cache: {self.token_cache!r} is not a whole number; give how "
                "many strings' token ids to keep (0 keeps none)"
            )
        if self.token_cache < 0:
            raise ConfigError(
                f"model.text.token_cache: {self.token_cache} is negative; give how many "
                "strings' token ids to keep (0 keeps none)"
            )
        if self.pooling not in POOLING_NAMES:
            raise ConfigError(
                f"model.text.pooling: {self.pooling!r} is not supported; use one of "
                f"{sorted(POOLING_NAMES)}"
            )


@dataclass(frozen=True)
class ModelConfig:
    """The dual encoder: image tower, text tower(s), embedding size, logit scale and bias."""

    image: ImageConfig
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int | None = None  # null: the image architecture's
    text_per_level: bool = False  # one text tower per granularity level
    # G for per-level towers. The trainer takes G from the data; set it only to build a
    # per-level model without data (a value that disagrees with the data is an error).
    num_levels: int | None = None
    init_logit_scale: float = INIT_LOGIT_SCALE
    init_logit_bias: float = INIT_LOGIT_BIAS
    dedup_texts: bool = True  # encode each distinct string of a batch once

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | ModelConfig) -> ModelConfig:
        """The typed section from the plain ``model:`` mapping of a config file."""
        return from_mapping(cls, data, "model")

    def resolved(self) -> ModelConfig:
        """This config with ``package:MODULE/path`` strings made paths inside installed
        packages (what builds the model; the saved config keeps the portable form)."""
        return ModelConfig.from_dict(resolve_package_paths(to_dict(self), "model"))

    def for_rebuild(self, facts: Mapping[str, Any]) -> ModelConfig:
        """This config for rebuilding a trained model from its checkpoint.

        The checkpoint holds every weight, so nothing pretrained is fetched; ``facts`` (from
        :meth:`MGLLModel.build_facts`) pin what the pretrained weights had implied, such as
        the QuickGELU activation of OpenAI's weights, the input mean/std of the authors'
        checkpoints, and the number of text towers.
        """
        quick_gelu = self.image.quick_gelu
        if quick_gelu is None:
            quick_gelu = facts.get("image.quick_gelu")
        mean = self.image.mean if self.image.mean is not None else facts.get("image.mean")
        std = self.image.std if self.image.std is not None else facts.get("image.std")
        image = dataclasses.replace(
            self.image, pretrained=None, quick_gelu=quick_gelu, mean=mean, std=std
        )
        towers = facts.get("text.towers")
        levels = int(towers) if self.text_per_level and towers else self.num_levels
        return dataclasses.replace(self, image=image, num_levels=levels)
