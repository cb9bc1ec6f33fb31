"""The image tower: open_clip's vision encoder of any open_clip architecture.

open_clip builds the whole CLIP model (it owns configs, pretrained tags, weight conversion and
preprocessing settings); we keep its ``visual`` module as the image tower and hand the rest to
the text-tower builder, which keeps or drops it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.model import _build_vision_tower
from safetensors import SafetensorError, safe_open
from torch import nn

from mgll.models.authors import (
    AUTHORS_ARCH,
    IMAGENET_MEAN,
    IMAGENET_STD,
    AuthorsCheckpoint,
    AuthorsCheckpointError,
    is_torch_pickle,
    preprocess_cfg,
    read_authors_checkpoint,
)
from mgll.models.config import ImageConfig
from mgll.models.weights import PretrainedWeightsError, download_failure, resolve_image_weights
from mgll.process import quiet_random_init
from mgll.schema import ConfigError

logger = logging.getLogger(__name__)


class ImageTower(nn.Module):
    """open_clip's vision encoder plus what is needed to rebuild and preprocess for it."""

    def __init__(
        self, visual: nn.Module, arch: str, open_clip_cfg: dict, preprocess_cfg: dict
    ) -> None:
        super().__init__()
        self.visual = visual
        self.arch = arch
        # The effective open_clip model config (overrides applied): enough to rebuild the tower.
        self.open_clip_cfg = copy.deepcopy(open_clip_cfg)
        self.preprocess_cfg = dict(preprocess_cfg)
        # What pretrained weights were loaded ({"source", "file", "sha256"}), when known.
        self.weights_source: dict[str, str] | None = None

    @property
    def embed_dim(self) -> int:
        """Size D of the embeddings the tower outputs."""
        return int(self.open_clip_cfg["embed_dim"])

    @property
    def image_size(self) -> int | tuple[int, int]:
        """Input side length in pixels (a (height, width) pair for non-square towers)."""
        size = self.preprocess_cfg["size"]
        if isinstance(size, int):
            return size
        height, width = size
        return int(height) if height == width else (int(height), int(width))

    @property
    def image_mean(self) -> tuple[float, ...]:
        """Per-channel mean the image transforms must normalise with."""
        return tuple(float(v) for v in self.preprocess_cfg["mean"])

    @property
    def image_std(self) -> tuple[float, ...]:
        """Per-channel standard deviation the image transforms must normalise with."""
        return tuple(float(v) for v in self.preprocess_cfg["std"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised images -> (N, D) unnormalised embeddings."""
        return self.visual(images)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the vision transformer's activations in backward (open_clip's switch)."""
        self.visual.set_grad_checkpointing(enable)


@dataclass
class OpenCLIPBuild:
    """A freshly built open_clip model and the config it was built from."""

    clip: nn.Module
    open_clip_cfg: dict
    preprocess_cfg: dict


def build_open_clip(
    image_cfg: ImageConfig, embed_dim: int | None, load_text_weights: bool
) -> OpenCLIPBuild:
    """Build the open_clip model named by ``model.image`` and load its weights.

    ``embed_dim`` (``model.embed_dim``) overrides the architecture's projection size; this is
    only possible without pretrained weights, whose projection has a fixed size.
    """
    arch, base_cfg = _architecture(image_cfg)
    source = image_cfg.pretrained
    tag, checkpoint = (None, None)
    if source:
        tag, checkpoint = resolve_image_weights(arch, str(source), "model.image.pretrained")
    authors = _read_authors(checkpoint) if checkpoint is not None else None
    quick_gelu = _quick_gelu(image_cfg, arch, base_cfg, tag, authors)

    overrides: dict[str, Any] = {}
    if embed_dim is not None and int(embed_dim) != int(base_cfg["embed_dim"]):
        if source or arch.startswith("hf-hub:"):
            raise ConfigError(
                f"model.embed_dim: {embed_dim} differs from the {base_cfg['embed_dim']} of "
                f"{arch!r}, whose pretrained projection cannot change size; set model.embed_dim "
                f"to {base_cfg['embed_dim']} or null"
            )
        overrides["embed_dim"] = int(embed_dim)

    normalisation = {}
    for key in ("mean", "std"):
        value = getattr(image_cfg, key)
        if value is None and authors is not None:  # their pretraining used ImageNet's
            value = IMAGENET_MEAN if key == "mean" else IMAGENET_STD
        if value is not None:
            normalisation[key] = tuple(float(v) for v in value)

    try:
        # Without a tag the random init is wanted (or a checkpoint file fills it in next).
        with quiet_random_init() if not tag else contextlib.nullcontext():
            clip = open_clip.create_model(
                arch,
                pretrained=tag,
                force_quick_gelu=quick_gelu,
                force_preprocess_cfg=normalisation or None,
                force_image_size=image_cfg.image_size,
                pretrained_text=load_text_weights,
                **overrides,
            )
    except RuntimeError as error:
        if tag:
            raise download_failure(arch, tag, "model.image.pretrained", error) from error
        raise
    if authors is not None:
        _load_authors_checkpoint(clip, authors, arch, load_text_weights)
    elif checkpoint is not None:
        _load_checkpoint_file(clip, checkpoint, load_text_weights)

    open_clip_cfg = copy.deepcopy(base_cfg)
    open_clip_cfg.update(overrides)
    open_clip_cfg["quick_gelu"] = quick_gelu
    preprocess_cfg = dict(open_clip.get_model_preprocess_cfg(clip))
    return OpenCLIPBuild(clip=clip, open_clip_cfg=open_clip_cfg, preprocess_cfg=preprocess_cfg)


def _architecture(image_cfg: ImageConfig) -> tuple[str, dict[str, Any]]:
    """``model.image.arch`` and its open_clip config (an error naming the key if unknown)."""
    if not image_cfg.arch:
        raise ConfigError(
            "model.image.arch: missing; give an open_clip architecture name (e.g. ViT-B-16, "
            "RN50), a shipped config (mgll-vit-tiny-64, mgll-vit-small-128) or 'hf-hub:org/repo'"
        )
    arch = str(image_cfg.arch)
    try:
        base_cfg = open_clip.get_model_config(arch)
    except Exception as error:
        raise PretrainedWeightsError(
            f"model.image.arch: could not read the open_clip config of {arch!r} ({error})"
        ) from error
    if base_cfg is None:
        raise ConfigError(
            f"model.image.arch: {arch!r} is not an open_clip architecture. Known names: "
            "open_clip.list_models() (includes the shipped mgll-vit-* configs), or use "
            "'hf-hub:org/repo' for an open_clip model on the Hugging Face Hub"
        )
    return arch, base_cfg


def _quick_gelu(
    image_cfg: ImageConfig,
    arch: str,
    base_cfg: dict[str, Any],
    tag: str | None,
    authors: AuthorsCheckpoint | None,
) -> bool:
    """``model.image.quick_gelu``, or when null what the weights were trained with."""
    quick_gelu = image_cfg.quick_gelu
    if quick_gelu is None:
        # Follow the weights: OpenAI's CLIP weights were trained with QuickGELU.
        tag_cfg = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
        quick_gelu = bool(tag_cfg.get("quick_gelu", base_cfg.get("quick_gelu", False)))
    if authors is not None and quick_gelu:
        raise PretrainedWeightsError(
            f"model.image.pretrained: {authors.path} holds the authors' {AUTHORS_ARCH} image "
            "tower, trained with GELU, not QuickGELU; set model.image.quick_gelu to null or "
            f"false and model.image.arch to {AUTHORS_ARCH}"
        )
    return bool(quick_gelu)


def _read_authors(checkpoint: Path) -> AuthorsCheckpoint | None:
    """The authors' checkpoint in a PyTorch file (None for other files; refusals raise)."""
    if not is_torch_pickle(checkpoint):
        return None
    try:
        return read_authors_checkpoint(checkpoint)
    except AuthorsCheckpointError as error:
        raise PretrainedWeightsError(f"model.image.pretrained: {error}") from error


def _load_authors_checkpoint(
    clip: nn.Module, authors: AuthorsCheckpoint, arch: str, load_text_weights: bool
) -> None:
    """Load the authors' ``clip.*`` weights: the image tower whole, their open_clip text tower
    when the model uses one and the checkpoint has it."""
    state = authors.clip_state(clip)
    if not load_text_weights:
        state = {k: v for k, v in state.items() if k.startswith("visual.")}
    try:
        result = clip.load_state_dict(state, strict=False)
    except RuntimeError as error:
        raise PretrainedWeightsError(
            f"model.image.pretrained: {authors.path} holds the authors' {AUTHORS_ARCH} image "
            f"tower, which does not fit model.image.arch {arch!r}; set model.image.arch: "
            f"{AUTHORS_ARCH}"
        ) from error
    missing_visual = [k for k in result.missing_keys if k.startswith("visual.")]
    if missing_visual:
        raise PretrainedWeightsError(
            f"model.image.pretrained: {authors.path} lacks {len(missing_visual)} image-tower "
            f"weights of {arch!r} (e.g. {missing_visual[0]!r}); set model.image.arch: "
            f"{AUTHORS_ARCH}"
        )
    if load_text_weights and any(not k.startswith("visual.") for k in result.missing_keys):
        logger.warning(
            "%s holds no open_clip text tower (its parts: %s): the text tower stays as built",
            authors.path,
            ", ".join(authors.parts),
        )


def _load_checkpoint_file(clip: nn.Module, checkpoint: Path, load_text_weights: bool) -> None:
    """Load a full or image-only open_clip checkpoint; the image tower must be complete."""
    if _is_mgll_run_checkpoint(checkpoint):
        raise PretrainedWeightsError(
            f"model.image.pretrained: {checkpoint} is an mgll pretraining checkpoint (keys "
            "image_tower.*), not an open_clip one: run `mgll export` on it and use the export"
        )
    try:
        result = open_clip.load_checkpoint(clip, str(checkpoint), strict=False)
    except Exception as error:
        raise PretrainedWeightsError(
            f"model.image.pretrained: could not load {checkpoint} into the model ({error}); is it "
            "a checkpoint of the same architecture as model.image.arch?"
        ) from error
    missing_visual = [k for k in result.missing_keys if k.startswith("visual.")]
    if missing_visual:
        raise PretrainedWeightsError(
            f"model.image.pretrained: {checkpoint} lacks {len(missing_visual)} image-tower "
            f"weights (e.g. {missing_visual[0]!r}); it is not a checkpoint of model.image.arch"
        )
    missing_text = [k for k in result.missing_keys if not k.startswith("visual.")]
    if missing_text and load_text_weights:
        logger.warning(
            "%s holds image-tower weights only: the open_clip text tower stays randomly "
            "initialised (%d tensors missing)",
            checkpoint,
            len(missing_text),
        )


def _is_mgll_run_checkpoint(checkpoint: Path) -> bool:
    """Whether a safetensors file holds an MGLLModel state dict (read from its header only)."""
    if checkpoint.suffix != ".safetensors":
        return False
    try:
        with safe_open(str(checkpoint), framework="pt") as handle:
            keys = list(handle.keys())  # a safetensors handle is not iterable
    except SafetensorError as error:
        raise PretrainedWeightsError(
            f"model.image.pretrained: {checkpoint} is not a readable safetensors file ({error})"
        ) from error
    return any(key.startswith("image_tower.") for key in keys)


def authors_image_tower(checkpoint: AuthorsCheckpoint) -> ImageTower:
    """The authors' ``ViT-L-14`` (GELU) image tower with ``checkpoint``'s weights, ImageNet
    mean/std at 224."""
    open_clip_cfg = copy.deepcopy(open_clip.get_model_config(AUTHORS_ARCH))
    open_clip_cfg["quick_gelu"] = False
    # Built without memory and given the file's (memory-mapped) tensors: a random init of
    # 300 M parameters would take seconds only to be overwritten.
    with torch.device("meta"):
        visual = _build_vision_tower(
            open_clip_cfg["embed_dim"], open_clip_cfg["vision_cfg"], quick_gelu=False
        )
    state = {k: v.float() for k, v in checkpoint.visual_state().items()}
    try:
        visual.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        reason = " ".join(str(error).split())[:300]
        raise AuthorsCheckpointError(
            f"{checkpoint.path}: its clip.visual.* tensors are not those of open_clip's "
            f"{AUTHORS_ARCH} image tower ({reason})"
        ) from error
    return ImageTower(visual.eval(), AUTHORS_ARCH, open_clip_cfg, preprocess_cfg())
