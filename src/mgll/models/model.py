"""MGLLModel: one image tower, one text tower (or one per granularity level), logit scale/bias."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn

from mgll.losses import INIT_LOGIT_BIAS, INIT_LOGIT_SCALE
from mgll.models.hub import save_pretrained
from mgll.models.image_tower import ImageTower
from mgll.models.packing import upload


class ContrastiveModel(Protocol):
    """What the trainer needs of a model (:class:`MGLLModel`, or a stand-in in tests).

    ``model(images, texts)`` with ``texts`` = G lists of N strings returns ``image_emb``
    (N, D), ``text_embs`` (G x (N, D)), ``logit_scale`` and ``logit_bias``.
    """

    logit_scale: nn.Parameter  # log of the contrastive scale
    logit_bias: nn.Parameter  # the point-wise term's bias

    @property
    def image_size(self) -> int | tuple[int, int]:
        """Input side length in pixels (a (height, width) pair for non-square towers)."""
        return self.image_tower.image_size

    @property
    def image_mean(self) -> tuple[float, float, float]:
        """Per-channel mean the image transforms must normalise with."""
        return self.image_tower.image_mean

    @property
    def image_std(self) -> tuple[float, float, float]:
        """Per-channel standard deviation the image transforms must normalise with."""
        return self.image_tower.image_std

    def build_facts(self) -> dict[str, Any]: ...  # see MGLLModel.build_facts
    def __call__(self, images: torch.Tensor, texts: Sequence[Sequence[str]]) -> dict: ...


class MGLLModel(nn.Module):
    """The dual encoder trained by the MGLL loss.

    ``model(images, texts)`` with ``texts`` = G lists of N strings (coarse to fine) returns
    ``{"image_emb": (N, D), "text_embs": [G x (N, D)], "logit_scale", "logit_bias"}``;
    embeddings are not normalised (the loss does that).
    """

    def __init__(
        self,
        image_tower: ImageTower,
        text_towers: Sequence[nn.Module],
        init_logit_scale: float = INIT_LOGIT_SCALE,
        init_logit_bias: float = INIT_LOGIT_BIAS,
        dedup_texts: bool = True,
    ) -> None:
        super().__init__()
        if not text_towers:
            raise ValueError("MGLLModel needs at least one text tower")
        dims = {image_tower.embed_dim, *(int(t.embed_dim) for t in text_towers)}
        if len(dims) != 1:
            raise ValueError(
                f"image and text towers disagree on the embedding size ({sorted(dims)}); "
                "they must all project to model.embed_dim"
            )
        self.image_tower = image_tower
        self.text_towers = nn.ModuleList(text_towers)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias)))
        # Coarse levels repeat a handful of strings across the batch: encode each string once.
        self.dedup_texts = dedup_texts

    @property
    def embed_dim(self) -> int:
        """Size D of the shared image/text embedding space."""
        return self.image_tower.embed_dim

    @property
    def text_per_level(self) -> bool:
        """Whether each granularity level has its own text tower."""
        return len(self.text_towers) > 1

    @property
    def image_size(self) -> int | tuple[int, int]:
        """Input side length in pixels (a (height, width) pair for non-square towers)."""
        size = self.image_tower.preprocess_cfg["size"]
        if isinstance(size, int):
            return size
        height, width = size
        return int(height) if height == width else (int(height), int(width))

    @property
    def image_mean(self) -> tuple[float, float, float]:
        """Per-channel mean the image transforms must normalise with."""
        return tuple(float(v) for v in self.image_tower.preprocess_cfg["mean"])

    @property
    def image_std(self) -> tuple[float, float, float]:
        """Per-channel standard deviation the image transforms must normalise with."""
        return tuple(float(v) for v in self.image_tower.preprocess_cfg["std"])

    def build_facts(self) -> dict[str, Any]:
        """What rebuilding this model from its config (without fetching pretrained weights)
        needs to know; stored in checkpoints and read by :meth:`ModelConfig.for_rebuild`.

        open_clip picks QuickGELU from the pretrained tag, and the input mean/std follow the
        weights, so a rebuild with ``pretrained: null`` must pin both.
        """
        facts = {
            "image.quick_gelu": self.image_tower.open_clip_cfg.get("quick_gelu"),
            "image.mean": list(self.image_mean),
            "image.std": list(self.image_std),
            "text.towers": len(self.text_towers),
        }
        weights = getattr(self.image_tower, "weights_source", None)
        if weights:  # where the image tower's pretrained weights came from (timm:NAME)
            facts["image.weights"] = dict(weights)
        return facts

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in the backward pass of every tower (less memory, more time)."""
        self.image_tower.set_grad_checkpointing(enable)
        for tower in self.text_towers:
            tower.set_grad_checkpointing(enable)

    def save_pretrained(
        self, directory: str, run_config: dict | None = None, metrics: dict | None = None
    ) -> object:
        """Write config.json, model.safetensors and a model card; ``mgll.from_pretrained``
        reads it back (see :func:`mgll.models.hub.save_pretrained`)."""
        return save_pretrained(self, directory, run_config, metrics)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images -> (N, D) unnormalised embeddings."""
        return self.image_tower(images)

    def encode_text(self, strings: Sequence[str], level: int = 0) -> torch.Tensor:
        """N strings -> (N, D) embeddings from the text tower of granularity ``level``."""
        return self._encode_levels([list(strings)], [self._tower_index(level)])[0]

    def encode_texts(self, texts: Sequence[Sequence[str]]) -> list[torch.Tensor]:
        """G lists of strings -> G embedding tensors; levels sharing a tower share one pass."""
        return self._encode_levels(
            [list(level) for level in texts], [self._tower_index(g) for g in range(len(texts))]
        )

    def forward(
        self, images: torch.Tensor, texts: Sequence[Sequence[str]]
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Embed ``images`` and the G levels of ``texts`` (the trainer contract, see class)."""
        if isinstance(texts, str) or not texts or isinstance(texts[0], str):
            raise ValueError("texts must be G lists of N strings (one list per granularity level)")
        batch = images.shape[0]
        for g, level in enumerate(texts):
            if len(level) != batch:
                raise ValueError(
                    f"texts[{g}] has {len(level)} strings for a batch of {batch} images; every "
                    "level needs one string per image"
                )
        if self.text_per_level and len(texts) != len(self.text_towers):
            raise ValueError(
                f"got {len(texts)} granularity levels but the model has one text tower per "
                f"level for {len(self.text_towers)} levels (model.num_levels)"
            )
        return {
            "image_emb": self.encode_image(images),
            "text_embs": self.encode_texts(texts),
            "logit_scale": self.logit_scale,
            "logit_bias": self.logit_bias,
        }

    def _tower_index(self, level: int) -> int:
        if not self.text_per_level:
            return 0
        if not 0 <= level < len(self.text_towers):
            raise IndexError(
                f"level {level} out of range: the model has text towers for "
                f"{len(self.text_towers)} levels"
            )
        return level

    def _encode_levels(
        self, levels: list[list[str]], tower_of_level: list[int]
    ) -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * len(levels)
        for tower_index in dict.fromkeys(tower_of_level):
            members = [g for g, t in enumerate(tower_of_level) if t == tower_index]
            strings = [s for g in members for s in levels[g]]
            tower = self.text_towers[tower_index]
            if self.dedup_texts:
                position: dict[str, int] = {}
                index = [position.setdefault(s, len(position)) for s in strings]
                unique_emb = tower(list(position))
                emb = unique_emb[upload(torch.tensor(index), unique_emb.device)]
            else:
                emb = tower(strings)
            for g, chunk in zip(members, emb.split([len(levels[g]) for g in members]), strict=True):
                out[g] = chunk
        return out
