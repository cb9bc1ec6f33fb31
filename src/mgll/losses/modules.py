"""The two losses as ``nn.Module``: ``MGLLLoss`` (METHOD.md section 3) and the ``CLIPLoss``
baseline; each builds the plan of its logit matrices and hands it to the kernel."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mgll.losses.batch import (
    INIT_LOGIT_BIAS,
    INIT_LOGIT_SCALE,
    _as_scalar,
    _Batch,
    _check_chunk_size,
    _index_of,
    _pick,
    _prepare,
    _scale,
)
from mgll.losses.kernel import _TiledLoss
from mgll.losses.labels import label_presence
from mgll.losses.plan import _augment, _distinct_columns, _Pair, _Plan

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
        self.chunk_size = _check_chunk_size(chunk_size)
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
        b = _prepare(image_emb, text_embs, labels, self.gather, self.local_loss)
        scale = _scale(logit_scale, b.image_rows)
        bias = _as_scalar(logit_bias, b.image_rows)
        # Augmented vectors [s*v, b] . [t, 1] put the bias into the one matmul: the point-wise
        # term needs S + b, and softmaxes are unchanged by a constant shift.
        tensors = [_augment(b.image_rows, scale, bias)]
        if not b.square:  # local loss: the global images, against each level's local texts
            tensors.append(_augment(b.image_cols, 1.0, 1.0))
        present_rows = [label_presence(lab) for lab in b.labels_rows]
        present_cols = (
            present_rows
            if b.labels_cols is b.labels_rows
            else [label_presence(lab) for lab in b.labels_cols]
        )
        pairs: list[_Pair] = []
        for g in range(len(text_embs)):
            pairs += self._level_pairs(b, g, scale, bias, tensors, present_rows, present_cols)
        plan = _Plan(pairs, self.chunk_size, b.image_rows.shape[0], compiled=self.compile)
        if self.weights["skl"] > 0 and len(text_embs) > 1:
            plan.common_rows, plan.common_cols = _smooth_kl_samples(present_rows, present_cols)
        values = dict(zip(MGLL_TERMS, _TiledLoss.apply(plan, *tensors), strict=True))
        parts = [_weighted(self.weights[name], values[name]) for name in self.terms]
        loss = functools.reduce(torch.add, parts) if parts else 0
        return {"loss": loss, **{name: values[name] for name in self.terms}}

    def _level_pairs(
        self,
        b: _Batch,
        g: int,
        scale: torch.Tensor,
        bias: torch.Tensor,
        tensors: list[torch.Tensor],
        present_rows: Sequence[torch.Tensor],
        present_cols: Sequence[torch.Tensor],
    ) -> list[_Pair]:
        """The logit matrices of level g: image rows against the level's texts, and (local
        loss) the level's local texts against the global images. A sample missing the level's
        label leaves its rows and columns before the matmul (an O(N D) selection, where
        masking the N x N logits would cost several passes over them)."""
        sclip = self.weights["sclip"] > 0
        row_index = _index_of(present_rows[g])
        if present_cols is present_rows:  # square: the columns are the rows
            col_index, lab_rows = row_index, _pick(b.labels_rows[g], row_index)
            lab_cols = lab_rows
        else:
            col_index = _index_of(present_cols[g])
            lab_rows = _pick(b.labels_rows[g], row_index)
            lab_cols = _pick(b.labels_cols[g], col_index)
        if row_index is None:
            image = 0
        else:  # this level's image rows, as a kernel input of their own
            tensors.append(tensors[0].index_select(0, row_index))
            image = len(tensors) - 1
        texts = _augment(_pick(b.texts_cols[g], col_index), 1.0, 1.0)
        tensors.append(texts)
        labels = (lab_rows, lab_cols)
        pairs = [
            _Pair(
                image,
                len(tensors) - 1,
                *labels,
                row_ce=0.5 if sclip else 0.0,
                col_ce=0.5 if sclip and b.square else 0.0,
                pointwise=self.weights["pointwise"] > 0,
                smooth_kl=self.weights["skl"] > 0 and len(b.texts_rows) > 1,
                distinct=_distinct_columns(texts, lab_cols),
                row_index=row_index,
                col_index=col_index,
            )
        ]
        if sclip and not b.square:  # the level's local texts against the global images
            tensors.append(_augment(_pick(b.texts_rows[g], row_index), scale, bias))
            texts_rows, images = len(tensors) - 1, 1
            if col_index is not None:  # the global images present at this level
                tensors.append(tensors[1].index_select(0, col_index))
                images = len(tensors) - 1
            pairs.append(
                _Pair(
                    texts_rows,
                    images,
                    *labels,
                    row_ce=0.5,
                    col_ce=0.0,
                    pointwise=False,
                    smooth_kl=False,
                    row_index=row_index,
                    col_index=col_index,
                )
            )
        return pairs


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
        self.chunk_size = _check_chunk_size(chunk_size)

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
        b = _prepare(image_emb, list(text_embs), None, self.gather, self.local_loss)
        scale = _scale(logit_scale, b.image_rows)
        n, m = b.image_rows.shape[0], b.image_cols.shape[0]
        if self.chunk_size is None or self.chunk_size >= n:
            logits = scale * b.image_rows @ b.texts_cols[0].T
            targets = torch.arange(n, device=logits.device) + b.offset
            t2i = logits.T if b.square else scale * b.texts_rows[0] @ b.image_cols.T
            clip = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(t2i, targets))
            return {"loss": clip, "clip": clip}
        # Tiled: the soft cross-entropy of _TiledLoss with each sample its own class.
        ids_rows = torch.arange(n, device=b.image_rows.device) + b.offset
        ids_cols = torch.arange(m, device=b.image_rows.device)
        tensors = [scale * b.image_rows, b.texts_cols[0]]
        pair = (ids_rows, ids_cols)
        pairs = [_Pair(0, 1, *pair, 0.5, 0.5 if b.square else 0.0, False, False)]
        if not b.square:  # local texts against the global images
            tensors += [scale * b.texts_rows[0], b.image_cols]
            pairs.append(_Pair(2, 3, *pair, 0.5, 0.0, False, False))
        clip = _TiledLoss.apply(_Plan(pairs, self.chunk_size, n), *tensors)[0]
        return {"loss": clip, "clip": clip}
