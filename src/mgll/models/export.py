"""Image-encoder export: a safetensors file in open_clip's key layout plus a JSON sidecar.

Two layouts, chosen by the path given:

- ``encoder.safetensors``: weights there, sidecar ``encoder.json`` beside it;
- a folder: ``open_clip_model.safetensors`` + ``open_clip_config.json`` inside, which is
  exactly what ``open_clip.create_model("local-dir:<folder>")`` reads.

Tensors are keyed as open_clip's CLIP state dict (``visual.*``). When the model's text tower is
the architecture's own open_clip tower (one tower, not one per level), the open_clip text
weights and ``logit_scale`` are written too, so the file is a complete open_clip checkpoint.
The sidecar is open_clip's ``open_clip_config.json`` format ({"model_cfg", "preprocess_cfg"})
plus an ``mgll`` section (architecture, image size, mean/std, embed dim, contents).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from open_clip.model import _build_vision_tower
from safetensors.torch import load_file, save_file
from torch import nn

from mgll.errors import ModelFileError
from mgll.io import atomic_write
from mgll.models.image_tower import ImageTower
from mgll.models.model import MGLLModel
from mgll.models.text_towers import OpenCLIPTextTower

FORMAT_NAME = "mgll-image-encoder"
FORMAT_VERSION = 1
FOLDER_WEIGHTS = "open_clip_model.safetensors"
FOLDER_SIDECAR = "open_clip_config.json"


def _layout(path: Path) -> tuple[Path, Path]:
    """(weights file, sidecar file) for an export path."""
    if path.suffix == ".safetensors":
        return path, path.with_suffix(".json")
    if path.suffix == ".json":
        raise ModelFileError(
            f"{path}: give the .safetensors file or the export folder, not the JSON sidecar"
        )
    return path / FOLDER_WEIGHTS, path / FOLDER_SIDECAR


def export_image_encoder(model: MGLLModel, path: str | os.PathLike) -> Path:
    """Write the image tower of ``model`` for downstream use and plain open_clip.

    ``path`` ending in ``.safetensors`` writes that file and a ``.json`` sidecar beside it;
    any other path is a folder receiving ``open_clip_model.safetensors`` and
    ``open_clip_config.json``. Returns the weights file.
    """
    text_state: dict[str, torch.Tensor] = {}
    text_towers = list(model.text_towers)
    if len(text_towers) == 1 and isinstance(text_towers[0], OpenCLIPTextTower):
        text_state.update(text_towers[0].clip.state_dict())
        text_state["logit_scale"] = model.logit_scale
    return export_image_tower(model.image_tower, path, text_state)


def export_image_tower(
    tower: ImageTower,
    path: str | os.PathLike,
    text_state: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write an :class:`ImageTower` as :func:`export_image_encoder` does (same layouts).

    ``text_state``: open_clip text-tower tensors and ``logit_scale`` written beside the image
    tower, making the file a complete open_clip checkpoint (none: an image-only export).
    """
    path = Path(path)
    weights_file, sidecar_file = _layout(path)
    weights_file.parent.mkdir(parents=True, exist_ok=True)

    state = {f"visual.{k}": v for k, v in tower.visual.state_dict().items()}
    state.update(text_state or {})
    contents = "image+open_clip_text" if text_state else "image"
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}

    preprocess = {
        k: list(v) if isinstance(v, tuple) else v for k, v in tower.preprocess_cfg.items()
    }
    sidecar = {
        "model_cfg": tower.open_clip_cfg,
        "preprocess_cfg": preprocess,
        "mgll": {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "arch": tower.arch,
            "embed_dim": tower.embed_dim,
            "image_size": tower.image_size,
            "image_mean": list(tower.image_mean),
            "image_std": list(tower.image_std),
            "contents": contents,
            "weights": weights_file.name,
        },
    }
    atomic_write(weights_file, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    atomic_write(sidecar_file, lambda p: p.write_text(json.dumps(sidecar, indent=2) + "\n"))
    return weights_file


class ImageEncoder(nn.Module):
    """An exported image tower: (N, 3, H, W) normalised images -> (N, embed_dim) embeddings."""

    def __init__(self, visual: nn.Module, sidecar: dict[str, Any]) -> None:
        super().__init__()
        self.visual = visual
        info = sidecar["mgll"]
        self.arch: str = info["arch"]
        self.embed_dim: int = int(info["embed_dim"])
        size = info["image_size"]
        self.image_size: int | tuple[int, int] = size if isinstance(size, int) else tuple(size)
        self.image_mean: tuple[float, ...] = tuple(info["image_mean"])
        self.image_std: tuple[float, ...] = tuple(info["image_std"])
        self.open_clip_cfg: dict[str, Any] = sidecar["model_cfg"]
        self.preprocess_cfg: dict[str, Any] = sidecar["preprocess_cfg"]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised images -> (N, embed_dim) unnormalised embeddings."""
        return self.visual(images)


def load_image_encoder(path: str | os.PathLike, device: str | torch.device = "cpu") -> ImageEncoder:
    """Load what :func:`export_image_encoder` wrote (its ``.safetensors`` file or its folder)."""
    weights_file, sidecar_file = _layout(Path(path))
    for needed in (weights_file, sidecar_file):
        if not needed.is_file():
            raise FileNotFoundError(
                f"{needed}: missing; load_image_encoder needs the .safetensors file and its "
                "sidecar written by export_image_encoder (or `mgll export`)"
            )
    sidecar = json.loads(sidecar_file.read_text())
    if sidecar.get("mgll", {}).get("format") != FORMAT_NAME:
        raise ModelFileError(
            f"{sidecar_file}: not an mgll image-encoder sidecar (no mgll.format == "
            f"{FORMAT_NAME!r}); export the model with export_image_encoder"
        )
    model_cfg = sidecar["model_cfg"]
    # open_clip's own vision-tower builder, so the exported config rebuilds the same module
    # without instantiating (and discarding) a text tower.
    # The exported tensors are the weights: never let a timm backbone fetch its own.
    vision_cfg = {**model_cfg["vision_cfg"], "timm_model_pretrained": False}
    visual = _build_vision_tower(
        model_cfg["embed_dim"], vision_cfg, model_cfg.get("quick_gelu", False)
    )
    tensors = load_file(str(weights_file), device=str(device))
    visual_state = {k[len("visual.") :]: v for k, v in tensors.items() if k.startswith("visual.")}
    try:
        visual.load_state_dict(visual_state, strict=True)
    except RuntimeError as error:
        raise ModelFileError(
            f"{weights_file}: its visual.* tensors do not match the architecture in "
            f"{sidecar_file} ({error})"
        ) from error
    encoder = ImageEncoder(visual, sidecar).to(device)
    return encoder.eval()
