"""The training objective of a run: which loss, which levels it reads, which terms it reports.

Built once from the ``loss:`` section and the number of levels G of the data, and used the same
way by the training step and by validation: :meth:`Objective.pick` selects the levels the loss
reads from anything indexed by level (texts, labels, text embeddings), and calling the objective
gives the loss terms of a model output on those levels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from mgll.losses import CLIPLoss, MGLLLoss
from mgll.schema import ConfigError
from mgll.training.config import LossConfig
from mgll.training.step import compute_loss

T = TypeVar("T")


def _loss(cfg: LossConfig, gather: bool) -> nn.Module:
    if cfg.name == "clip":
        return CLIPLoss(gather=gather, local_loss=cfg.local_loss, chunk_size=cfg.chunk_size)
    return MGLLLoss(
        dataclasses.asdict(cfg.weights),
        gather=gather,
        local_loss=cfg.local_loss,
        chunk_size=cfg.chunk_size,
        compile=cfg.compile,
    )


@dataclass(frozen=True)
class Objective:
    """MGLL on every level, or CLIP on the caption level ``loss.clip_level``.

    CLIP with ``clip_level: joined`` reads one caption per image made of all of its level
    texts (what an open_clip user would train on); its labels are the finest level's, which
    CLIP's identity targets never read.
    """

    config: LossConfig
    levels: tuple[int, ...]  # the levels (of G) the loss reads, coarse to fine
    loss: nn.Module  # gathers across processes (training)
    local: nn.Module  # the same loss without gathering (rank-0 validation)

    @classmethod
    def from_config(cls, cfg: LossConfig, num_levels: int) -> Objective:
        """The objective of ``cfg`` for data with ``num_levels`` granularity levels."""
        if cfg.name == "clip" and cfg.clip_level == "joined":
            levels = tuple(range(num_levels))
        elif cfg.name == "clip":
            level = cfg.clip_level
            if not -num_levels <= level < num_levels:
                raise ConfigError(
                    f"loss.clip_level={level} but the data has {num_levels} granularity levels; "
                    f"use 0..{num_levels - 1} or -1 (the finest)"
                )
            levels = (level % num_levels,)
        else:
            levels = tuple(range(num_levels))
        return cls(cfg, levels, _loss(cfg, gather=True), _loss(cfg, gather=False))

    @property
    def terms(self) -> tuple[str, ...]:
        """Names of the reported terms (MGLL's of non-zero weight, or ``clip``)."""
        return tuple(self.loss.terms)

    @property
    def uses_logit_bias(self) -> bool:
        """Whether the loss reads the logit bias (only MGLL's point-wise term does)."""
        return "pointwise" in self.terms

    @property
    def reads_all_levels(self) -> bool:
        """MGLL reads every level; CLIP one."""
        return self.config.name == "mgll"

    @property
    def joins_levels(self) -> bool:
        """CLIP on one caption joined from every level's text (``clip_level: joined``)."""
        return self.config.name == "clip" and self.config.clip_level == "joined"

    def pick(self, per_level: Sequence[T]) -> list[T]:
        """The entries of the levels the loss reads, from a sequence indexed by level."""
        return [per_level[g] for g in self.levels]

    def inputs(
        self, texts: Sequence[Sequence[str]], labels: Sequence[torch.Tensor]
    ) -> tuple[list[list[str]], list[torch.Tensor]]:
        """The texts the model embeds for the loss and the labels the loss reads, from a
        batch's G levels of texts and labels (training and validation alike)."""
        if self.joins_levels:
            captions = [" ".join(parts) for parts in zip(*texts, strict=True)]
            return [captions], [labels[-1]]
        return [list(level) for level in self.pick(texts)], self.pick(labels)

    def __call__(
        self, out: dict[str, Any], labels: Sequence[torch.Tensor], gather: bool = True
    ) -> dict[str, torch.Tensor]:
        """Loss terms of a model output whose ``text_embs`` and ``labels`` are the picked
        levels (``gather=False``: this process's batch only, as validation runs)."""
        return compute_loss(self.loss if gather else self.local, out, labels)
