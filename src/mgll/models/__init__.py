"""Models: :class:`MGLLModel` and the factory that builds its towers from a config.

``create_model(model_cfg)`` (a :class:`ModelConfig` or its plain mapping) is the entry point;
``export_image_encoder`` / ``load_image_encoder`` move a trained image tower to downstream code
and to plain open_clip.
"""

from mgll.models.config import ImageConfig, ModelConfig, TextConfig
from mgll.models.export import ImageEncoder, export_image_encoder, load_image_encoder
from mgll.models.factory import (
    create_model,
    from_pretrained,
    register_model_configs,
    shipped_architectures,
)
from mgll.models.image_tower import ImageTower
from mgll.models.model import ContrastiveModel, MGLLModel
from mgll.models.text_towers import TEXT_TOWER_BUILDERS, HFTextTower, OpenCLIPTextTower
from mgll.models.weights import PretrainedWeightsError

__all__ = [
    "TEXT_TOWER_BUILDERS",
    "ContrastiveModel",
    "HFTextTower",
    "ImageConfig",
    "ImageEncoder",
    "ImageTower",
    "MGLLModel",
    "ModelConfig",
    "OpenCLIPTextTower",
    "PretrainedWeightsError",
    "TextConfig",
    "create_model",
    "export_image_encoder",
    "from_pretrained",
    "load_image_encoder",
    "register_model_configs",
    "shipped_architectures",
]
