"""Models: :class:`MGLLModel` and the factory that builds its towers from a config.

``create_model(cfg["model"])`` is the entry point; ``export_image_encoder`` /
``load_image_encoder`` move a trained image tower to downstream code and to plain open_clip.
"""

from mgll.models.export import ImageEncoder, export_image_encoder, load_image_encoder
from mgll.models.factory import create_model, register_model_configs, shipped_architectures
from mgll.models.image_tower import ImageTower
from mgll.models.model import MGLLModel
from mgll.models.text_towers import TEXT_TOWER_BUILDERS, HFTextTower, OpenCLIPTextTower
from mgll.models.weights import PretrainedWeightsError

__all__ = [
    "TEXT_TOWER_BUILDERS",
    "HFTextTower",
    "ImageEncoder",
    "ImageTower",
    "MGLLModel",
    "OpenCLIPTextTower",
    "PretrainedWeightsError",
    "create_model",
    "export_image_encoder",
    "load_image_encoder",
    "register_model_configs",
    "shipped_architectures",
]
