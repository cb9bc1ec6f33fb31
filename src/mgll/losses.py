"""The MGLL objective and the CLIP baseline (METHOD.md section 3).

``MGLLLoss`` replaces CLIP's identity targets with label co-occurrence targets, per granularity
level, and adds a point-wise sigmoid term and a smooth-KL agreement term across levels. Both
losses own their distributed behaviour: under ``torch.distributed`` they gather embeddings
(with gradient) and labels from every rank, so the value equals the single-process loss on the
global batch and the training loop never special-cases it.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mgll.distributed import gather_no_grad, gather_sizes, gather_with_grad, is_distributed

MAX_LOGIT_SCALE = 100.0
"""Cap on ``s = exp(logit_scale)``, as in CLIP."""

CLASS_SUM_MIN_PAIRS = 1 << 18
"""From this many (image, text) pairs in a level, class-id positives are summed through
per-class embedding sums instead of an (N, N) mask: fewer passes over N x N memory, but a few
more small operations, which cost more than they save on small batches (N below ~512)."""

INIT_LOGIT_SCALE = math.log(1 / 0.07)
"""CLIP's initial ``logit_scale`` (temperature 0.07), the default when none is passed."""

INIT_LOGIT_BIAS = -10.0
"""Initial point-wise ``logit_bias`` (as SigLIP), the default when none is passed."""

MGLL_TERMS = ("sclip", "pointwise", "skl")
"""The terms of :class:`MGLLLoss`: soft CLIP, point-wise BCE, smooth KL."""

DEFAULT_WEIGHTS: Mapping[str, float] = {"sclip": 0.5, "pointwise": 1.0, "skl": 1.0}
"""The paper's term weights (METHOD.md section 3)."""

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


def _augment(t: torch.Tensor, scale: torch.Tensor | float, last: torch.Tensor | float):
    """``[scale * t, last]`` row-wise: one extra column so a dot product adds a constant."""
    column = torch.as_tensor(last, dtype=t.dtype, device=t.device).reshape(1, 1)
    return torch.cat([scale * t, column.expand(t.shape[0], 1)], dim=1)


@dataclass
class _PositiveSums:
    """Per image row: sum of the logits of its positive texts, and their count; same per
    text for the text -> image direction."""

    rows: torch.Tensor
    n_rows: torch.Tensor
    cols: torch.Tensor
    n_cols: torch.Tensor


def _class_sums(vectors: torch.Tensor, class_ids: torch.Tensor, k: int) -> torch.Tensor:
    """(k, D) sums of ``vectors`` grouped by class id (differentiable)."""
    return vectors.new_zeros(k, vectors.shape[1]).index_add(0, class_ids, vectors)


def _positive_sums(
    logits: torch.Tensor,
    lab_rows: torch.Tensor,
    lab_cols: torch.Tensor,
    image_aug: torch.Tensor,
    text_aug: torch.Tensor,
    t2i: torch.Tensor | None = None,
    t2i_text: torch.Tensor | None = None,
    t2i_image: torch.Tensor | None = None,
) -> _PositiveSums:
    """Sums of logits over each row's positives (both directions), without an (N, N) mask
    when possible.

    ``logits = image_aug @ text_aug.T``. In the square (global) case the text -> image logits
    are its transpose; otherwise ``t2i = t2i_text @ t2i_image.T`` (local texts, global images).
    Class ids: sum_{j: c_j = c_i} <a_i, t_j> = <a_i, sum of the texts of class c_i>, an O(N D)
    computation from per-class sums (used from ``CLASS_SUM_MIN_PAIRS`` pairs up). Multi-hot
    overlap is not linear in the label vectors, so it goes through the (rows, cols) positive
    mask, as do small batches.
    """
    if lab_rows.dim() == 1 and logits.numel() >= CLASS_SUM_MIN_PAIRS:
        classes, inverse = torch.unique(torch.cat([lab_rows, lab_cols]), return_inverse=True)
        rid, cid = inverse[: lab_rows.shape[0]], inverse[lab_rows.shape[0] :]
        k = classes.shape[0]
        count_cols = torch.bincount(cid, minlength=k).to(logits.dtype)
        rows = (image_aug * _class_sums(text_aug, cid, k).index_select(0, rid)).sum(dim=1)
        if t2i is None:  # texts (columns) against the images of their class (the rows)
            count_rows = torch.bincount(rid, minlength=k).to(logits.dtype)
            cols = (text_aug * _class_sums(image_aug, rid, k).index_select(0, cid)).sum(dim=1)
            return _PositiveSums(rows, count_cols[rid], cols, count_rows[cid])
        cols = (t2i_text * _class_sums(t2i_image, cid, k).index_select(0, rid)).sum(dim=1)
        return _PositiveSums(rows, count_cols[rid], cols, count_cols[rid])
    pos = positive_mask(lab_rows, lab_cols).to(logits.dtype)
    pos_logits = pos * logits
    n_rows = pos.sum(dim=1)
    if t2i is None:  # the mask is symmetric: column sums are the text -> image sums
        return _PositiveSums(pos_logits.sum(dim=1), n_rows, pos_logits.sum(dim=0), n_rows)
    return _PositiveSums(pos_logits.sum(dim=1), n_rows, (pos * t2i).sum(dim=1), n_rows)


def _select(t: torch.Tensor, keep: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Rows (or columns) where ``keep`` is True; index_select's backward is a cheap index_add."""
    return t.index_select(dim, keep.nonzero().squeeze(1))


class _SmoothKL(torch.autograd.Function):
    """mean_i sum_g KL(P^g_i || M_i), P^g_i = softmax(z^g_i), M_i = mean_g P^g_i, from logits.

    Autograd through log-softmax, logaddexp and exp would make about three times as many
    passes over the (n, m) matrices as needed, so the gradient is written out:
    d/dz^g = P^g * (a^g - <P^g, a^g>) / n with a^g = log P^g - log M (the terms from
    differentiating M cancel because the P^g sum to G M; a constant shift of a^g cancels too).
    """

    @staticmethod
    def forward(ctx, *logits: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        log_probs = [F.log_softmax(z, dim=1) for z in logits]
        # log_sum = log(G M) = logsumexp_g log P^g; the log G it leaves out is added to each
        # row's KL below (the rows of P sum to 1) and cancels in the gradient.
        log_sum = log_probs[0]
        for lp in log_probs[1:]:
            log_sum = torch.logaddexp(log_sum, lp)  # fused and stable: never log of a P
        probs, advantages, row_kls = [], [], []
        for lp in log_probs:
            a = lp - log_sum
            p = lp.exp()
            row_kls.append((p * a).sum(dim=1, keepdim=True))
            probs.append(p)
            advantages.append(a)
        n = logits[0].shape[0]
        ctx.save_for_backward(*probs, *advantages, *row_kls)
        ctx.levels, ctx.n = len(logits), n
        return sum(kl.sum() for kl in row_kls) / n + len(logits) * math.log(len(logits))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        saved, g = ctx.saved_tensors, ctx.levels
        probs, advantages, row_kls = saved[:g], saved[g : 2 * g], saved[2 * g :]
        scale = grad / ctx.n
        return tuple(
            (a - kl).mul_(p).mul_(scale)
            for p, a, kl in zip(probs, advantages, row_kls, strict=True)
        )


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

    ``forward`` returns a dict: ``loss`` (weighted total, differentiable) and the unweighted
    terms of non-zero weight (:attr:`terms`): ``sclip``, ``pointwise`` (each summed over
    levels) and ``skl``.
    """

    def __init__(
        self,
        weights: Mapping[str, float] | None = None,
        gather: bool = True,
        local_loss: bool = False,
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
        w_sclip, w_pw, w_skl = (self.weights[name] for name in MGLL_TERMS)
        # A zero tied to every input keeps the graph (and DDP's gradient buckets) complete when
        # a term is switched off or a level has no labelled sample.
        zero = (b.image_rows.sum() + sum(t.sum() for t in b.texts_rows) + scale + bias) * 0.0
        sclip, pointwise, skl = zero, zero, zero

        levels = len(text_embs)
        present_rows, present_cols, kept = [], [], []  # kept: each level's logits
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
            # Augmented vectors [s*v, b] . [t, 1] put the bias into the one matmul: the
            # point-wise term needs S + b, and softmaxes are unchanged by a constant shift.
            image_aug, text_aug = _augment(image, scale, bias), _augment(text, 1.0, 1.0)
            logits = image_aug @ text_aug.T  # S + b: (rows, cols), image -> text
            lab_rows, lab_cols = b.labels_rows[g][p_rows], b.labels_cols[g][p_cols]
            if b.square:
                t2i = None
                sums = _positive_sums(logits, lab_rows, lab_cols, image_aug, text_aug)
            else:  # local texts against the global images
                t2i_text = _augment(_select(b.texts_rows[g], p_rows), scale, bias)
                t2i_image = _augment(_select(b.image_cols, p_cols), 1.0, 1.0)
                t2i = t2i_text @ t2i_image.T
                sums = _positive_sums(
                    logits, lab_rows, lab_cols, image_aug, text_aug, t2i, t2i_text, t2i_image
                )
            lse_rows = torch.logsumexp(logits, dim=1)
            if w_sclip > 0:
                # CE(row, y/|y|) = lse - <y, row>/|y|; the bias cancels between the two.
                row_term = (lse_rows - sums.rows / sums.n_rows).mean()
                col_lse = torch.logsumexp(logits, dim=0) if b.square else torch.logsumexp(t2i, 1)
                col_term = (col_lse - sums.cols / sums.n_cols).mean()
                sclip = sclip + 0.5 * (row_term + col_term)
            if w_pw > 0:
                # sum_ij BCE(x_ij + b, y_ij) = sum softplus(x + b) - sum_ij y_ij (x_ij + b)
                bce = F.softplus(logits).sum() - sums.rows.sum()
                pointwise = pointwise + bce / logits.shape[0]
            kept.append(logits)

        if w_skl > 0 and levels > 1:
            common_rows = torch.stack(present_rows).all(dim=0)
            common_cols = torch.stack(present_cols).all(dim=0)
            if bool(common_rows.any()):
                level_logits = []
                for g, logits in enumerate(kept):  # every level has samples here
                    rows_g, cols_g = common_rows[present_rows[g]], common_cols[present_cols[g]]
                    if not (bool(rows_g.all()) and bool(cols_g.all())):
                        # only the samples present at every level take part
                        logits = _select(_select(logits, rows_g), cols_g, dim=1)
                    level_logits.append(logits)
                skl = _SmoothKL.apply(*level_logits)

        values = {"sclip": sclip, "pointwise": pointwise, "skl": skl}
        loss = w_sclip * sclip + w_pw * pointwise + w_skl * skl
        return {"loss": loss, **{name: values[name] for name in self.terms}}


class CLIPLoss(nn.Module):
    """The CLIP baseline: symmetric InfoNCE with identity targets on one granularity level.

    Same calling style as :class:`MGLLLoss`; ``labels`` and ``logit_bias`` are accepted and
    ignored. ``text_embs`` is the caption level's (N, D) embeddings (or a list holding only
    them): which level is the caption is the caller's choice (``loss.clip_level``).
    """

    terms = ("clip",)

    def __init__(self, gather: bool = True, local_loss: bool = False) -> None:
        super().__init__()
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
        if len(text_embs) != 1:
            raise ValueError(
                f"CLIPLoss takes the text embeddings of one level (the captions), got "
                f"{len(text_embs)} levels"
            )
        b = _prepare(image_emb, list(text_embs), None, self.gather, self.local_loss)
        scale = _scale(logit_scale, b.image_rows)
        logits = scale * b.image_rows @ b.texts_cols[0].T
        targets = torch.arange(logits.shape[0], device=logits.device) + b.offset
        t2i = logits.T if b.square else scale * b.texts_rows[0] @ b.image_cols.T
        clip = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(t2i, targets))
        return {"loss": clip, "clip": clip}
