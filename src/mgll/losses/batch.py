"""The loss's inputs made ready: validated, normalised, lifted to fp32 and (under
``torch.distributed``) gathered from every rank; the logit scale and bias as tensors."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mgll.distributed import gather_no_grad, gather_sizes, gather_with_grad, is_distributed

MAX_LOGIT_SCALE = 100.0
"""Cap on ``s = exp(logit_scale)``, as in CLIP."""

INIT_LOGIT_SCALE = math.log(1 / 0.07)
"""CLIP's initial ``logit_scale`` (temperature 0.07), the default when none is passed."""

INIT_LOGIT_BIAS = -10.0
"""Initial point-wise ``logit_bias`` (as SigLIP), the default when none is passed."""


def as_scalar(value: torch.Tensor | float | None, like: torch.Tensor) -> torch.Tensor:
    if value is None:
        return like.new_zeros(())
    if isinstance(value, torch.Tensor):
        return value.to(device=like.device, dtype=like.dtype).reshape(())
    return like.new_full((), float(value))  # filled on the device: no host-to-device copy


def exp_scale(logit_scale: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    return as_scalar(logit_scale, like).clamp(max=math.log(MAX_LOGIT_SCALE)).exp()


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # Half-precision embeddings are lifted to fp32; float64 stays float64 (gradcheck).
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@dataclass
class Batch:
    """Normalised embeddings and labels, local (rows) and global (columns)."""

    image_rows: torch.Tensor
    texts_rows: list[torch.Tensor]
    labels_rows: list[torch.Tensor]
    image_cols: torch.Tensor
    texts_cols: list[torch.Tensor]
    labels_cols: list[torch.Tensor]
    offset: int  # index of the first local row among the columns
    square: bool  # rows and columns are the same samples (global loss)


def prepare(
    image_emb: torch.Tensor,
    text_embs: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor] | None,
    gather: bool,
    local_loss: bool,
) -> Batch:
    n = image_emb.shape[0]
    if image_emb.dim() != 2:
        raise ValueError(f"image_emb must be (N, D), got shape {tuple(image_emb.shape)}")
    for g, t in enumerate(text_embs):
        if t.shape != image_emb.shape:
            raise ValueError(
                f"text embeddings of level {g} have shape {tuple(t.shape)}, "
                f"expected {tuple(image_emb.shape)} like the image embeddings"
            )
    if labels is not None:
        if len(labels) != len(text_embs):
            raise ValueError(
                f"got {len(text_embs)} text levels but {len(labels)} label tensors; "
                "pass one label tensor per granularity level"
            )
        for g, lab in enumerate(labels):
            if lab.shape[0] != n:
                raise ValueError(f"labels of level {g} have {lab.shape[0]} rows, expected {n}")
    dtype = _compute_dtype(image_emb)
    image = F.normalize(image_emb.to(dtype), dim=-1)
    texts = [F.normalize(t.to(dtype), dim=-1) for t in text_embs]
    labs = [] if labels is None else [lab.to(image.device) for lab in labels]
    if not (gather and is_distributed()):
        return Batch(image, texts, labs, image, texts, labs, 0, True)
    sizes = gather_sizes(n, image.device)
    rank = torch.distributed.get_rank()
    image_all = gather_with_grad(image, sizes)
    texts_all = [gather_with_grad(t, sizes) for t in texts]
    labs_all = [gather_no_grad(lab, sizes) for lab in labs]
    if local_loss:
        return Batch(image, texts, labs, image_all, texts_all, labs_all, sum(sizes[:rank]), False)
    return Batch(image_all, texts_all, labs_all, image_all, texts_all, labs_all, 0, True)


def index_of(present: torch.Tensor) -> torch.Tensor | None:
    """Positions of the present samples, or None when every sample is present (one host read:
    the number of positions)."""
    index = present.nonzero().squeeze(1)
    return None if index.shape[0] == present.shape[0] else index


def pick(t: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    return t if index is None else t.index_select(0, index)


def check_chunk_size(chunk_size: int | None) -> int | None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or int(chunk_size) < 1):
        raise ValueError(
            f"chunk_size must be a positive number of rows or None, got {chunk_size!r}"
        )
    return None if chunk_size is None else int(chunk_size)
