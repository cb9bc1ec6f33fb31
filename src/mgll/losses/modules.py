"""The two losses as ``nn.Module``: ``MGLLLoss`` (METHOD.md section 3) and the ``CLIPLoss``
baseline; each builds the plan of its logit matrices and hands it to the kernel."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mgll.losses.batch import (
    INIT_LOGIT_BIAS,
    INIT_LOGIT_SCALE,
    Batch,
    as_scalar,
    check_chunk_size,
    exp_scale,
    index_of,
    pick,
    prepare,
)
from mgll.losses.kernel import tiled_terms
from mgll.losses.labels import label_presence
from mgll.losses.plan import Inputs, Pair, Plan, augment, distinct_columns

MGLL_TERMS = ("sclip", "pointwise", "skl")
"""The terms of :class:`MGLLLoss`: soft CLIP, point-wise BCE, smooth KL."""

DEFAULT_WEIGHTS: Mapping[str, float] = {"sclip": 0.5, "pointwise": 1.0, "skl": 1.0}
"""The paper's term weights (METHOD.md section 3)."""


class MGLLLoss(nn.Module):
    """Multi-granular language learning loss (soft CLIP + point-wise BCE + smooth KL).

    Args:
        weights: weight of each term by name (``sclip``, ``pointwise``, ``skl``); names left
            out keep :data:`DEFAULT_WEIGHTS`. A zero weight skips that term (for ablations):
            it is neither computed nor in the output.
        gather: under ``torch.distributed`` with world size > 1, gather embeddings (with
            gradient) and labels from all ranks so the loss is the global-batch loss.
        local_loss: memory-saving variant for distributed runs (as open_clip's ``local_loss``):
            each rank scores only its own images/texts against the global batch, so the logit
            matrices are (N_local, N_global) instead of (N_global, N_global). The mean of the
            ranks' losses (what DDP optimises) equals the global loss when every rank holds the
            same number of labelled samples per level; otherwise it weights ranks equally rather
            than samples. The gradient is that of this rank-mean.
        chunk_size: compute the loss and its gradient in tiles of this many image rows,
            recomputing each tile's logits in backward: memory grows as ``chunk_size x N``
            instead of ``G x N^2``, for a second matmul per tile. ``None``: one tile, logits
            kept for backward (fastest while they fit). Values and gradients are the same.
        compile: run the kernel's element-wise passes (log-sum-exps, softplus, sigmoid, the
            smooth KL) through ``torch.compile``, fused into a few loops: the same values to
            float rounding, faster once compiled, but the first call compiles (tens of
            seconds on 2 CPU cores; docs/loss.md has the measurements).

    ``forward`` returns a dict: ``loss`` (weighted total, differentiable) and the unweighted
    terms of non-zero weight (:attr:`terms`): ``sclip``, ``pointwise`` (each summed over
    levels) and ``skl``.
    """

    def __init__(
        self,
        weights: Mapping[str, float] | None = None,
        gather: bool = True,
        local_loss: bool = False,
        chunk_size: int | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        unknown = sorted(set(weights or {}) - set(MGLL_TERMS))
        if unknown:
            raise ValueError(f"unknown loss weight(s) {unknown}; the terms are {MGLL_TERMS}")
        weights = {**DEFAULT_WEIGHTS, **(weights or {})}
        if any(w < 0 for w in weights.values()):
            raise ValueError(f"loss weights must be >= 0, got {weights}")
        self.weights = {name: float(weights[name]) for name in MGLL_TERMS}
        self.gather = gather
        self.local_loss = local_loss
        self.chunk_size = check_chunk_size(chunk_size)
        self.compile = compile

    @property
    def terms(self) -> tuple[str, ...]:
        """Names of the terms this loss computes and reports (those of non-zero weight)."""
        return tuple(name for name in MGLL_TERMS if self.weights[name] > 0)

    def forward(
        self,
        image_emb: torch.Tensor,
        text_embs: Sequence[torch.Tensor],
        labels: Sequence[torch.Tensor],
        logit_scale: torch.Tensor | float = INIT_LOGIT_SCALE,
        logit_bias: torch.Tensor | float | None = INIT_LOGIT_BIAS,
    ) -> dict[str, torch.Tensor]:
        if len(text_embs) == 0:
            raise ValueError("MGLLLoss needs at least one granularity level of text embeddings")
        b = prepare(image_emb, text_embs, labels, self.gather, self.local_loss)
        scale = exp_scale(logit_scale, b.image_rows)
        bias = as_scalar(logit_bias, b.image_rows)
        # Augmented vectors [s*v, b] . [t, 1] put the bias into the one matmul: the point-wise
        # term needs S + b, and softmaxes are unchanged by a constant shift.
        inputs = Inputs()
        images = inputs.add(augment(b.image_rows, scale, bias))
        # local loss: the global images, against each level's local texts
        global_images = images if b.square else inputs.add(augment(b.image_cols, 1.0, 1.0))
        present_rows = [label_presence(lab) for lab in b.labels_rows]
        present_cols = (
            present_rows
            if b.labels_cols is b.labels_rows
            else [label_presence(lab) for lab in b.labels_cols]
        )
        pairs: list[Pair] = []
        for g in range(len(text_embs)):
            level = _Level.of(b, g, present_rows, present_cols)
            pairs.append(self._image_text_pair(b, g, level, inputs, images))
            if self.weights["sclip"] > 0 and not b.square:
                pairs.append(_text_image_pair(b, g, level, inputs, global_images, scale, bias))
        plan = Plan(pairs, self.chunk_size, b.image_rows.shape[0], compiled=self.compile)
        if self.weights["skl"] > 0 and len(text_embs) > 1:
            plan.common_rows, plan.common_cols = _smooth_kl_samples(present_rows, present_cols)
        values = dict(zip(MGLL_TERMS, tiled_terms(plan, inputs), strict=True))
        parts = [_weighted(self.weights[name], values[name]) for name in self.terms]
        loss = functools.reduce(torch.add, parts) if parts else 0
        return {"loss": loss, **{name: values[name] for name in self.terms}}

    def _image_text_pair(
        self, b: Batch, g: int, level: _Level, inputs: Inputs, images: int
    ) -> Pair:
        """Level g's image rows against its texts: the row soft CE, the column soft CE (when
        the rows are the columns), the point-wise term and the level's smooth-KL part."""
        sclip = self.weights["sclip"] > 0
        if level.row_index is not None:  # this level's image rows, as a kernel input of their own
            images = inputs.add(inputs[images].index_select(0, level.row_index))
        texts = augment(pick(b.texts_cols[g], level.col_index), 1.0, 1.0)
        return Pair(
            images,
            inputs.add(texts),
            level.labels_rows,
            level.labels_cols,
            row_ce=0.5 if sclip else 0.0,
            col_ce=0.5 if sclip and b.square else 0.0,
            pointwise=self.weights["pointwise"] > 0,
            smooth_kl=self.weights["skl"] > 0 and len(b.texts_rows) > 1,
            distinct=distinct_columns(texts, level.labels_cols),
            row_index=level.row_index,
            col_index=level.col_index,
        )


class _Level(NamedTuple):
    """Which samples take part at one level: those carrying its label (a missing one leaves
    its rows and columns before the matmul, an O(N D) selection where masking the N x N
    logits would cost several passes over them). ``*_index``: None when all do."""

    row_index: torch.Tensor | None
    col_index: torch.Tensor | None
    labels_rows: torch.Tensor
    labels_cols: torch.Tensor

    @classmethod
    def of(
        cls,
        b: Batch,
        g: int,
        present_rows: Sequence[torch.Tensor],
        present_cols: Sequence[torch.Tensor],
    ) -> _Level:
        row_index = index_of(present_rows[g])
        if present_cols is present_rows:  # square: the columns are the rows
            labels = pick(b.labels_rows[g], row_index)
            return cls(row_index, row_index, labels, labels)
        col_index = index_of(present_cols[g])
        labels_rows = pick(b.labels_rows[g], row_index)
        return cls(row_index, col_index, labels_rows, pick(b.labels_cols[g], col_index))


def _text_image_pair(
    b: Batch,
    g: int,
    level: _Level,
    inputs: Inputs,
    global_images: int,
    scale: torch.Tensor,
    bias: torch.Tensor,
) -> Pair:
    """Local loss: level g's local texts against the global images, the text-to-image row
    soft CE that a square pair reads off its columns."""
    texts = inputs.add(augment(pick(b.texts_rows[g], level.row_index), scale, bias))
    images = global_images
    if level.col_index is not None:  # the global images present at this level
        images = inputs.add(inputs[global_images].index_select(0, level.col_index))
    return Pair(
        texts,
        images,
        level.labels_rows,
        level.labels_cols,
        row_ce=0.5,
        col_ce=0.0,
        pointwise=False,
        smooth_kl=False,
        row_index=level.row_index,
        col_index=level.col_index,
    )


def _weighted(weight: float, value: torch.Tensor) -> torch.Tensor:
    """``weight * value``, without the multiplication (exact either way) when the weight is 1."""
    return value if weight == 1.0 else weight * value


def _smooth_kl_samples(
    present_rows: Sequence[torch.Tensor], present_cols: Sequence[torch.Tensor]
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The rows and columns present at every level (only they take part in the smooth KL),
    or None twice when no row is."""
    common_rows = torch.stack(list(present_rows)).all(dim=0)
    if not bool(common_rows.any()):
        return None, None
    if present_cols is present_rows:
        return common_rows, common_rows
    return common_rows, torch.stack(list(present_cols)).all(dim=0)


class CLIPLoss(nn.Module):
    """The CLIP baseline: symmetric InfoNCE with identity targets on one granularity level.

    Same calling style as :class:`MGLLLoss`; ``labels`` and ``logit_bias`` are accepted and
    ignored. ``text_embs`` is the caption level's (N, D) embeddings (or a list holding only
    them): which level is the caption is the caller's choice (``loss.clip_level``).
    ``chunk_size``: as :class:`MGLLLoss`'s (the InfoNCE is the soft CE with identity targets).
    """

    terms = ("clip",)

    def __init__(
        self, gather: bool = True, local_loss: bool = False, chunk_size: int | None = None
    ) -> None:
        super().__init__()
        self.gather = gather
        self.local_loss = local_loss
        self.chunk_size = check_chunk_size(chunk_size)

    def forward(
        self,
        image_emb: torch.Tensor,
        text_embs: Sequence[torch.Tensor] | torch.Tensor,
        labels: Sequence[torch.Tensor] | None = None,
        logit_scale: torch.Tensor | float = INIT_LOGIT_SCALE,
        logit_bias: torch.Tensor | float | None = None,
    ) -> dict[str, torch.Tensor]:
        if isinstance(text_embs, torch.Tensor):
            text_embs = [text_embs]
        if len(text_embs) != 1:
            raise ValueError(
                f"CLIPLoss takes the text embeddings of one level (the captions), got "
                f"{len(text_embs)} levels"
            )
        b = prepare(image_emb, list(text_embs), None, self.gather, self.local_loss)
        scale = exp_scale(logit_scale, b.image_rows)
        n, m = b.image_rows.shape[0], b.image_cols.shape[0]
        if self.chunk_size is None or self.chunk_size >= n:
            logits = scale * b.image_rows @ b.texts_cols[0].T
            targets = torch.arange(n, device=logits.device) + b.offset
            t2i = logits.T if b.square else scale * b.texts_rows[0] @ b.image_cols.T
            clip = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(t2i, targets))
            return {"loss": clip, "clip": clip}
        # Tiled: the soft cross-entropy of TiledLoss with each sample its own class.
        ids_rows = torch.arange(n, device=b.image_rows.device) + b.offset
        ids_cols = torch.arange(m, device=b.image_rows.device)
        inputs = Inputs()
        ids = (ids_rows, ids_cols)
        images, texts = inputs.add(scale * b.image_rows), inputs.add(b.texts_cols[0])
        pairs = [Pair(images, texts, *ids, 0.5, 0.5 if b.square else 0.0, False, False)]
        if not b.square:  # local texts against the global images
            texts, images = inputs.add(scale * b.texts_rows[0]), inputs.add(b.image_cols)
            pairs.append(Pair(texts, images, *ids, 0.5, 0.0, False, False))
        clip = tiled_terms(Plan(pairs, self.chunk_size, n), inputs)[0]
        return {"loss": clip, "clip": clip}
