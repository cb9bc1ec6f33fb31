"""The MGLL objective and the CLIP baseline (METHOD.md section 3).

``MGLLLoss`` replaces CLIP's identity targets with label co-occurrence targets, per granularity
level, and adds a point-wise sigmoid term and a smooth-KL agreement term across levels. Both
losses own their distributed behaviour: under ``torch.distributed`` they gather embeddings
(with gradient) and labels from every rank, so the value equals the single-process loss on the
global batch and the training loop never special-cases it.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mgll.distributed import gather_no_grad, gather_sizes, gather_with_grad, is_distributed

MAX_LOGIT_SCALE = 100.0
"""Cap on ``s = exp(logit_scale)``, as in CLIP."""

INIT_LOGIT_SCALE = math.log(1 / 0.07)
"""CLIP's initial ``logit_scale`` (temperature 0.07), the default when none is passed."""

LabelKey = Hashable | Iterable[Hashable] | None


# --------------------------------------------------------------------------------------------
# Labels and positive masks
# --------------------------------------------------------------------------------------------


def label_presence(labels: torch.Tensor) -> torch.Tensor:
    """Boolean (N,) mask of samples that carry a label.

    Class ids: ``-1`` (any negative id) is missing. Multi-hot (N, C): an all-zero row is missing.
    """
    if labels.dim() == 1:
        return labels >= 0
    if labels.dim() == 2:
        return (labels != 0).any(dim=1)
    raise ValueError(
        f"labels must be a (N,) tensor of class ids or a (N, C) multi-hot tensor, "
        f"got shape {tuple(labels.shape)}"
    )


def positive_mask(row_labels: torch.Tensor, col_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean (N, M) mask: ``[i, j]`` is True when the label sets of i and j overlap.

    Built on the labels' device without any (N, M, C) intermediate: equality of class ids, or a
    non-zero dot product of multi-hot rows. Missing samples are positive of nothing.
    """
    col_labels = row_labels if col_labels is None else col_labels
    if row_labels.dim() != col_labels.dim():
        raise ValueError("row and column labels must both be class ids or both be multi-hot")
    if row_labels.dim() == 1:
        mask = row_labels[:, None] == col_labels[None, :]
        return mask & (row_labels >= 0)[:, None] & (col_labels >= 0)[None, :]
    if row_labels.shape[1] != col_labels.shape[1]:
        raise ValueError(
            f"multi-hot labels disagree on the number of classes: "
            f"{row_labels.shape[1]} vs {col_labels.shape[1]}"
        )
    a = (row_labels != 0).to(torch.float32)
    b = (col_labels != 0).to(torch.float32)
    return (a @ b.T) > 0


def encode_labels(
    keys: Sequence[LabelKey], vocabulary: Sequence[Hashable] | None = None
) -> tuple[torch.Tensor, list[Hashable]]:
    """Map string (or any hashable) label keys to the tensors the loss takes.

    ``keys[i]`` is one key, a collection of keys (multi-label), or ``None`` (missing). Single keys
    give a LongTensor of ids (-1 = missing); if any sample has a collection, the result is a
    (N, C) multi-hot tensor (all-zero row = missing). Pass the same ``vocabulary`` on every rank
    and every step so that ids mean the same thing everywhere; without one it is built in order
    of first appearance. Returns the tensor and the vocabulary used.
    """
    vocab: list[Hashable] = list(vocabulary) if vocabulary is not None else []
    index = {k: i for i, k in enumerate(vocab)}
    if len(index) != len(vocab):
        raise ValueError("the label vocabulary has duplicate entries")

    def _id(key: Hashable, row: int) -> int:
        if key not in index:
            if vocabulary is not None:
                raise KeyError(f"label {key!r} of sample {row} is not in the label vocabulary")
            index[key] = len(vocab)
            vocab.append(key)
        return index[key]

    def _is_collection(k: object) -> bool:
        return isinstance(k, (list, tuple, set, frozenset))

    if any(_is_collection(k) for k in keys):
        rows = [
            [] if k is None else [_id(x, i) for x in (k if _is_collection(k) else [k])]
            for i, k in enumerate(keys)
        ]
        multi_hot = torch.zeros(len(keys), len(vocab), dtype=torch.float32)
        for i, ids in enumerate(rows):
            multi_hot[i, ids] = 1.0
        return multi_hot, vocab
    ids = [-1 if k is None else _id(k, i) for i, k in enumerate(keys)]
    return torch.tensor(ids, dtype=torch.long), vocab


# --------------------------------------------------------------------------------------------
# Loss pieces
# --------------------------------------------------------------------------------------------


def _select(t: torch.Tensor, keep: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Rows (or columns) where ``keep`` is True; index_select's backward is a cheap index_add."""
    return t.index_select(dim, keep.nonzero().squeeze(1))


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b) over all entries, as one dot product (no temporary of their size)."""
    return torch.dot(a.reshape(-1), b.reshape(-1))


def _smooth_kl(log_probs: Sequence[torch.Tensor]) -> torch.Tensor:
    """mean_i sum_g KL(P^g_i || M_i) with M_i the mean of the G distributions, from log-probs.

    With L = logsumexp_g(log P^g) (so log M = L - log G) and rows of P summing to 1:
    sum_g KL(P^g || M) = sum_g <P^g, log P^g> - <sum_g P^g, L> + G log G per row.
    """
    levels, n = len(log_probs), log_probs[0].shape[0]
    log_sum = log_probs[0]
    for lp in log_probs[1:]:
        log_sum = torch.logaddexp(log_sum, lp)  # fused, stable: never log of a probability
    probs = [lp.exp() for lp in log_probs]
    prob_sum = probs[0]
    for p in probs[1:]:
        prob_sum = prob_sum + p
    total = sum(_dot(p, lp) for p, lp in zip(probs, log_probs, strict=True))
    return (total - _dot(prob_sum, log_sum)) / n + levels * math.log(levels)


def _as_scalar(value: torch.Tensor | float | None, like: torch.Tensor) -> torch.Tensor:
    if value is None:
        return like.new_zeros(())
    if isinstance(value, torch.Tensor):
        return value.to(device=like.device, dtype=like.dtype).reshape(())
    return like.new_tensor(float(value))


def _scale(logit_scale: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    return _as_scalar(logit_scale, like).clamp(max=math.log(MAX_LOGIT_SCALE)).exp()


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # Half-precision embeddings are lifted to fp32; float64 stays float64 (gradcheck).
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@dataclass
class _Batch:
    """Normalised embeddings and labels, local (rows) and global (columns)."""

    image_rows: torch.Tensor
    texts_rows: list[torch.Tensor]
    labels_rows: list[torch.Tensor]
    image_cols: torch.Tensor
    texts_cols: list[torch.Tensor]
    labels_cols: list[torch.Tensor]
    offset: int  # index of the first local row among the columns
    square: bool  # rows and columns are the same samples (global loss)


def _prepare(
    image_emb: torch.Tensor,
    text_embs: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor] | None,
    gather: bool,
    local_loss: bool,
) -> _Batch:
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
        return _Batch(image, texts, labs, image, texts, labs, 0, True)
    sizes = gather_sizes(n, image.device)
    rank = torch.distributed.get_rank()
    image_all = gather_with_grad(image, sizes)
    texts_all = [gather_with_grad(t, sizes) for t in texts]
    labs_all = [gather_no_grad(lab, sizes) for lab in labs]
    if local_loss:
        return _Batch(image, texts, labs, image_all, texts_all, labs_all, sum(sizes[:rank]), False)
    return _Batch(image_all, texts_all, labs_all, image_all, texts_all, labs_all, 0, True)


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


class MGLLLoss(nn.Module):
    """Multi-granular language learning loss (soft CLIP + point-wise BCE + smooth KL).

    Args:
        weights: ``(a1, a2, a3)`` for soft CLIP, point-wise and smooth KL. A zero weight skips
            that term's computation (for ablations); its entry in the output is then 0.
        gather: under ``torch.distributed`` with world size > 1, gather embeddings (with
            gradient) and labels from all ranks so the loss is the global-batch loss.
        local_loss: memory-saving variant for distributed runs (as open_clip's ``local_loss``):
            each rank scores only its own images/texts against the global batch, so the logit
            matrices are (N_local, N_global) instead of (N_global, N_global). The mean of the
            ranks' losses (what DDP optimises) equals the global loss when every rank holds the
            same number of labelled samples per level; otherwise it weights ranks equally rather
            than samples. The gradient is that of this rank-mean.

    ``forward`` returns a dict: ``loss`` (weighted total, differentiable) and the unweighted
    ``sclip``, ``pointwise`` (each summed over levels) and ``skl``.
    """

    def __init__(
        self,
        weights: tuple[float, float, float] = (0.5, 1.0, 1.0),
        gather: bool = True,
        local_loss: bool = False,
    ) -> None:
        super().__init__()
        if len(weights) != 3:
            raise ValueError("weights must be (soft_clip, pointwise, smooth_kl)")
        if any(w < 0 for w in weights):
            raise ValueError(f"loss weights must be >= 0, got {weights}")
        self.weights = tuple(float(w) for w in weights)
        self.gather = gather
        self.local_loss = local_loss

    def forward(
        self,
        image_emb: torch.Tensor,
        text_embs: Sequence[torch.Tensor],
        labels: Sequence[torch.Tensor],
        logit_scale: torch.Tensor | float = INIT_LOGIT_SCALE,
        logit_bias: torch.Tensor | float | None = -10.0,
    ) -> dict[str, torch.Tensor]:
        if len(text_embs) == 0:
            raise ValueError("MGLLLoss needs at least one granularity level of text embeddings")
        b = _prepare(image_emb, text_embs, labels, self.gather, self.local_loss)
        scale = _scale(logit_scale, b.image_rows)
        bias = _as_scalar(logit_bias, b.image_rows)
        w_sclip, w_pw, w_skl = self.weights
        # A zero tied to every input keeps the graph (and DDP's gradient buckets) complete when
        # a term is switched off or a level has no labelled sample.
        zero = (b.image_rows.sum() + sum(t.sum() for t in b.texts_rows) + scale + bias) * 0.0
        sclip, pointwise, skl = zero, zero, zero

        levels = len(text_embs)
        present_rows, present_cols, kept = [], [], []  # kept: row log-softmax per level
        for g in range(levels):
            p_rows, p_cols = label_presence(b.labels_rows[g]), label_presence(b.labels_cols[g])
            present_rows.append(p_rows)
            present_cols.append(p_cols)
            all_present = bool(p_rows.all()) and bool(p_cols.all())
            # A missing sample leaves this level's rows and columns: select before the matmul.
            image = b.image_rows if all_present else _select(b.image_rows, p_rows)
            text = b.texts_cols[g] if all_present else _select(b.texts_cols[g], p_cols)
            if image.shape[0] == 0:
                kept.append(None)
                continue
            logits = scale * image @ text.T  # (rows, cols): image -> text
            pos = positive_mask(b.labels_rows[g][p_rows], b.labels_cols[g][p_cols])
            pos = pos.to(logits.dtype)
            n_pos = pos.sum(dim=1)  # >= 1: a present sample is its own positive
            # Fused log-softmax kernels and flat dot products keep this at a few passes over
            # the (n, m) matrix, with no (n, m) temporary per term.
            log_probs = F.log_softmax(logits, dim=1)
            if w_sclip > 0:
                row_targets = pos / n_pos[:, None]
                row_term = -_dot(row_targets, log_probs) / logits.shape[0]
                if b.square:  # text -> image logits are the transpose; the mask is symmetric
                    col_log_probs = F.log_softmax(logits, dim=0)
                    col_term = -_dot(pos / n_pos[None, :], col_log_probs) / logits.shape[1]
                else:  # local texts against the global images
                    t2i = scale * _select(b.texts_rows[g], p_rows) @ _select(b.image_cols, p_cols).T
                    col_term = -_dot(row_targets, F.log_softmax(t2i, dim=1)) / logits.shape[0]
                sclip = sclip + 0.5 * (row_term + col_term)
            if w_pw > 0:
                # sum BCE(x + b, y) = sum softplus(x + b) - <y, x> - b * sum y
                bce = F.softplus(logits + bias).sum() - _dot(pos, logits) - bias * n_pos.sum()
                pointwise = pointwise + bce / logits.shape[0]
            kept.append(log_probs)

        if w_skl > 0 and levels > 1:
            common_rows = torch.stack(present_rows).all(dim=0)
            common_cols = torch.stack(present_cols).all(dim=0)
            if bool(common_rows.any()):
                log_probs = []
                for g, lp in enumerate(kept):  # every level has samples here
                    rows_g, cols_g = common_rows[present_rows[g]], common_cols[present_cols[g]]
                    if not (bool(rows_g.all()) and bool(cols_g.all())):
                        # restrict to the samples present at every level and renormalise
                        sub = _select(_select(lp, rows_g), cols_g, dim=1)
                        lp = F.log_softmax(sub, dim=1)
                    log_probs.append(lp)
                skl = _smooth_kl(log_probs)

        loss = w_sclip * sclip + w_pw * pointwise + w_skl * skl
        return {"loss": loss, "sclip": sclip, "pointwise": pointwise, "skl": skl}


class CLIPLoss(nn.Module):
    """The CLIP baseline: symmetric InfoNCE with identity targets on one granularity level.

    Same calling style as :class:`MGLLLoss`; ``labels`` and ``logit_bias`` are accepted and
    ignored, and ``level`` picks which of the given text levels is the caption.
    """

    def __init__(self, level: int = 0, gather: bool = True, local_loss: bool = False) -> None:
        super().__init__()
        self.level = level
        self.gather = gather
        self.local_loss = local_loss

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
        if not -len(text_embs) <= self.level < len(text_embs):
            raise ValueError(
                f"CLIPLoss(level={self.level}) but only {len(text_embs)} text levels were given"
            )
        b = _prepare(image_emb, [text_embs[self.level]], None, self.gather, self.local_loss)
        scale = _scale(logit_scale, b.image_rows)
        logits = scale * b.image_rows @ b.texts_cols[0].T
        targets = torch.arange(logits.shape[0], device=logits.device) + b.offset
        t2i = logits.T if b.square else scale * b.texts_rows[0] @ b.image_cols.T
        clip = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(t2i, targets))
        return {"loss": clip, "clip": clip}
