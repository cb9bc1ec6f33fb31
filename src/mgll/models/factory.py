"""The one factory: a ``model:`` config section in, an :class:`MGLLModel` out.

Architectures are data: image towers are open_clip configs (built-in or shipped in
``mgll/model_configs``), text towers are picked by ``model.text.type`` from
:data:`~mgll.models.text_towers.TEXT_TOWER_BUILDERS`.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import open_clip
from torch import nn

from mgll.models.image_tower import ImageTower, build_open_clip
from mgll.models.model import MGLLModel
from mgll.models.text_towers import TEXT_TOWER_BUILDERS, TowerContext

MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"

MODEL_KEYS = {
    "image",
    "text",
    "embed_dim",
    "text_per_level",
    "num_levels",
    "init_logit_scale",
    "init_logit_bias",
    "dedup_texts",
    "grad_checkpointing",
}


def register_model_configs(folder: Path = MODEL_CONFIG_DIR) -> None:
    """Make the shipped JSON configs known to open_clip (``open_clip.create_model(name)``)."""
    known = set(open_clip.list_models())
    if any(path.stem not in known for path in folder.glob("*.json")):
        open_clip.add_model_config(folder)


def shipped_architectures() -> list[str]:
    """Names of the open_clip configs shipped with mgll (the files in ``mgll/model_configs``)."""
    return sorted(path.stem for path in MODEL_CONFIG_DIR.glob("*.json"))


def create_model(model_cfg: dict[str, Any], num_levels: int | None = None) -> MGLLModel:
    """Build the model described by the ``model:`` section of a run config.

    Keys: ``image`` ({arch, pretrained, quick_gelu}), ``text`` ({type: open_clip} or
    {type: hf, name, pooling, max_length}), ``embed_dim`` (null = the image arch's),
    ``text_per_level`` with ``num_levels`` (or the ``num_levels`` argument),
    ``init_logit_scale``, ``init_logit_bias``, ``dedup_texts``, ``grad_checkpointing``.
    """
    unknown = set(model_cfg) - MODEL_KEYS
    if unknown:
        raise ValueError(
            f"model: unknown key(s) {sorted(unknown)}; known keys: {sorted(MODEL_KEYS)}"
        )
    for key in ("image", "text"):
        if not isinstance(model_cfg.get(key), dict):
            raise ValueError(f"model.{key}: missing or not a mapping")
    text_cfg = dict(model_cfg["text"])
    text_type = text_cfg.get("type", "open_clip")
    text_cfg["type"] = text_type
    if text_type not in TEXT_TOWER_BUILDERS:
        raise ValueError(
            f"model.text.type: {text_type!r} is not a text tower type; use one of "
            f"{sorted(TEXT_TOWER_BUILDERS)}"
        )

    per_level = bool(model_cfg.get("text_per_level", False))
    levels = num_levels if num_levels is not None else model_cfg.get("num_levels")
    if per_level and not levels:
        raise ValueError(
            "model.num_levels: required when model.text_per_level is true (the number of "
            "granularity levels G, one text tower each)"
        )
    tower_count = int(levels) if per_level else 1

    register_model_configs()
    build = build_open_clip(
        dict(model_cfg["image"]),
        model_cfg.get("embed_dim"),
        load_text_weights=text_type == "open_clip",
    )
    image_tower = ImageTower(
        build.clip.visual,
        str(model_cfg["image"]["arch"]),
        build.open_clip_cfg,
        build.preprocess_cfg,
    )
    # What is left of the open_clip model is its text tower; logit params live on MGLLModel.
    clip_text = build.clip
    del clip_text.visual
    del clip_text.logit_scale
    if isinstance(getattr(clip_text, "logit_bias", None), nn.Parameter):
        del clip_text.logit_bias

    context = TowerContext(
        arch=image_tower.arch, embed_dim=image_tower.embed_dim, open_clip_text=clip_text
    )
    # The builder may take ownership of context.open_clip_text (the open_clip tower does).
    first = TEXT_TOWER_BUILDERS[text_type](text_cfg, context)
    # Per-level towers start from the same (pretrained) weights and then train apart.
    text_towers = [first] + [copy.deepcopy(first) for _ in range(tower_count - 1)]

    model = MGLLModel(
        image_tower,
        text_towers,
        init_logit_scale=_value(model_cfg, "init_logit_scale", math.log(1 / 0.07)),
        init_logit_bias=_value(model_cfg, "init_logit_bias", -10.0),
        dedup_texts=_value(model_cfg, "dedup_texts", True),
    )
    if model_cfg.get("grad_checkpointing", False):
        model.set_grad_checkpointing(True)
    return model


def _value(model_cfg: dict[str, Any], key: str, default: Any) -> Any:
    """``model_cfg[key]`` converted to the default's type, with YAML ``null`` = the default."""
    value = model_cfg.get(key)
    return default if value is None else type(default)(value)
