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
# Loss pieces: one kernel for both losses, whole or in row tiles
# --------------------------------------------------------------------------------------------


def _augment(t: torch.Tensor, scale: torch.Tensor | float, last: torch.Tensor | float):
    """``[scale * t, last]`` row-wise: one extra column so a dot product adds a constant."""
    column = torch.as_tensor(last, dtype=t.dtype, device=t.device).reshape(1, 1)
    return torch.cat([scale * t, column.expand(t.shape[0], 1)], dim=1)


@dataclass
class _Distinct:
    """Columns that repeat (same vector, same labels: a coarse level's few prompts), each
    multiplied once: ``first`` (U,) one column per group, ``inverse`` (C,) each column's group,
    ``counts`` (U,)."""

    first: torch.Tensor
    inverse: torch.Tensor
    counts: torch.Tensor


def _distinct_columns(vectors: torch.Tensor, labels: torch.Tensor) -> _Distinct | None:
    """Groups of exactly equal (vector, labels) rows, or None when too few repeat to pay.

    Rows are grouped by a random projection of both and the groups then checked for exact
    equality, so a projection collision can only turn the saving off, never merge two rows.
    Equal columns have equal logits and, their labels being equal, equal gradients: one
    product per group is exact.
    """
    if vectors.shape[0] == 0:
        return None
    g = torch.Generator().manual_seed(0)
    key = vectors.detach().double() @ torch.randn(
        vectors.shape[1], 1, generator=g, dtype=torch.float64
    ).to(vectors.device)
    lab = labels.double().reshape(labels.shape[0], -1)
    key = key + lab @ torch.randn(lab.shape[1], 1, generator=g, dtype=torch.float64).to(lab.device)
    _, inverse, counts = torch.unique(key.squeeze(1), return_inverse=True, return_counts=True)
    if counts.shape[0] > 0.75 * vectors.shape[0]:
        return None
    rows = torch.arange(inverse.shape[0], device=inverse.device)
    first = torch.full_like(counts, inverse.shape[0]).scatter_reduce(0, inverse, rows, "amin")
    same = torch.equal(vectors[first[inverse]], vectors) and torch.equal(
        labels[first[inverse]], labels
    )
    return _Distinct(first, inverse, counts) if same else None


@dataclass
class _Pair:
    """One logit matrix of the loss, ``Z = R C^T`` (scale and bias folded into R and C), and
    the terms it enters.

    ``rows``/``cols`` index the kernel's input tensors. A sample missing a label takes no part:
    :class:`MGLLLoss` selects the present rows and columns before the matmul, and
    ``row_index``/``col_index`` say which samples (of the plan's rows and columns) the pair's
    rows and columns are (None: all of them, in order). ``present_*`` masks what is left
    (-inf in every softmax).
    """

    rows: int
    cols: int
    labels_rows: torch.Tensor
    labels_cols: torch.Tensor
    present_rows: torch.Tensor  # (R,) bool
    present_cols: torch.Tensor  # (C,) bool
    row_ce: float  # weight in the sclip term of the row-wise soft cross-entropy (mean over rows)
    col_ce: float  # same for the column-wise one, read from the same matrix (square pairs)
    pointwise: bool
    smooth_kl: bool
    distinct: _Distinct | None = None
    row_index: torch.Tensor | None = None
    col_index: torch.Tensor | None = None

    @property
    def complete(self) -> bool:
        return bool(self.present_rows.all()) and bool(self.present_cols.all())

    def span(self, r0: int, r1: int) -> tuple[int, int]:
        """The pair's own rows that are the plan's rows ``r0:r1`` (a contiguous range)."""
        if self.row_index is None:
            return r0, r1
        bounds = torch.searchsorted(self.row_index, torch.tensor([r0, r1]).to(self.row_index))
        return int(bounds[0]), int(bounds[1])


@dataclass
class _Plan:
    """What :class:`_TiledLoss` computes: the pairs, the rows per tile (None: one tile) and the
    rows/columns present at every level (the smooth-KL term's samples)."""

    pairs: list[_Pair]
    chunk_size: int | None
    n_rows: int
    common_rows: torch.Tensor | None = None
    common_cols: torch.Tensor | None = None

    def spans(self, r0: int, r1: int) -> list[tuple[int, int]]:
        return [pair.span(r0, r1) for pair in self.pairs]


def _tiles(n: int, chunk_size: int | None) -> list[tuple[int, int]]:
    step = n if not chunk_size or chunk_size >= n else chunk_size
    return [(r, min(r + step, n)) for r in range(0, max(n, 1), step)]


def _row_groups(plan: _Plan) -> dict[int, list[int]]:
    """The pairs sharing each row matrix (every level's image rows): one matmul each."""
    groups: dict[int, list[int]] = {}
    for k, pair in enumerate(plan.pairs):
        groups.setdefault(pair.rows, []).append(k)
    return groups


def _level_logits(
    plan: _Plan, tensors: Sequence[torch.Tensor], spans: Sequence[tuple[int, int]]
) -> list[torch.Tensor]:
    """Every pair's (level's) logits for its rows of a tile (``spans``): one matmul per row
    matrix against the concatenated distinct columns of all the pairs that share it."""
    logits: list[torch.Tensor] = [torch.empty(0)] * len(plan.pairs)
    for rows, members in _row_groups(plan).items():
        cols = [_pair_columns(plan.pairs[k], tensors) for k in members]
        p0, p1 = spans[members[0]]
        z = tensors[rows][p0:p1] @ (cols[0] if len(cols) == 1 else torch.cat(cols)).T
        for k, piece in zip(members, z.split([c.shape[0] for c in cols], dim=1), strict=True):
            d = plan.pairs[k].distinct
            logits[k] = piece if d is None else piece.index_select(1, d.inverse)
    return logits


def _pair_columns(pair: _Pair, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    cols = tensors[pair.cols]
    return cols if pair.distinct is None else cols.index_select(0, pair.distinct.first)


def _masked(z: torch.Tensor, pair: _Pair, r0: int, r1: int) -> torch.Tensor:
    """Logits with the entries of missing rows or columns at -inf (out of every softmax)."""
    if pair.complete:
        return z
    keep = pair.present_rows[r0:r1, None] & pair.present_cols[None, :]
    return z.masked_fill(~keep, -math.inf)


@dataclass
class _Positives:
    """A pair's positives. Multi-hot: ``tile(r0, r1)`` is the (rows, cols) bool mask Y. Class
    ids (``by_class``): ``keys_*`` are compact ids, the counts per row and column come from
    counting them, and every sum over positives goes through per-class sums of vectors,
    ``sum_{j: k_j = k_i} <r_i, c_j> = <r_i, sum of the c of class k_i>``, O(N D): no N x N mask
    is ever built."""

    pair: _Pair
    keys_rows: torch.Tensor
    keys_cols: torch.Tensor
    n_rows: torch.Tensor | None  # (R,) positives of each row (1 for a missing row)
    n_cols: torch.Tensor | None  # (C,)
    n_ids: int = 0

    @classmethod
    def of(cls, pair: _Pair, dtype: torch.dtype) -> _Positives:
        rows, cols = pair.labels_rows, pair.labels_cols
        if rows.dim() == 2:
            return cls(pair, (rows != 0).to(dtype), (cols != 0).to(dtype), None, None)
        # A missing sample gets an id of its own, unlike any row's or column's: no positives.
        r, c = rows.shape[0], cols.shape[0]
        ar = torch.arange(r, device=rows.device)
        keys_rows = torch.where(rows >= 0, rows, -1 - ar)
        keys_cols = torch.where(cols >= 0, cols, -1 - r - torch.arange(c, device=cols.device))
        ids, inverse = torch.unique(torch.cat([keys_rows, keys_cols]), return_inverse=True)
        count_rows = torch.bincount(inverse[:r], minlength=ids.shape[0]).to(dtype)
        count_cols = torch.bincount(inverse[r:], minlength=ids.shape[0]).to(dtype)
        n_rows = torch.where(pair.present_rows, count_cols[inverse[:r]], 1.0)
        n_cols = torch.where(pair.present_cols, count_rows[inverse[r:]], 1.0)
        return cls(pair, inverse[:r], inverse[r:], n_rows, n_cols, ids.shape[0])

    @property
    def by_class(self) -> bool:
        return self.n_rows is not None

    def tile(self, r0: int, r1: int) -> torch.Tensor:
        if self.n_rows is None:  # multi-hot: label sets overlap
            return (self.keys_rows[r0:r1] @ self.keys_cols.T) > 0
        return self.keys_rows[r0:r1, None] == self.keys_cols[None, :]

    def class_sums(self, vectors: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """(ids, D) sums of ``vectors`` (rows or columns, with their ``keys``) per class id."""
        return vectors.new_zeros(self.n_ids, vectors.shape[1]).index_add_(0, keys, vectors)


def _smooth_kl_term(
    log_probs: list[torch.Tensor],
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Per level, on the rows and columns present at every level, from the row log-softmaxes
    log P^g: P^g, a^g = log P^g - log(G M) and kl^g = <P^g, a^g> per row.

    sum_g KL(P^g_i || M_i) = sum_g kl^g_i + G log G, M_i the mean of the P^g_i; log(G M) is a
    ``logaddexp`` of log-probabilities, never the log of a probability that underflowed.
    """
    log_sum = log_probs[0]
    for lp in log_probs[1:]:
        log_sum = torch.logaddexp(log_sum, lp)
    adv = [lp - log_sum for lp in log_probs]
    probs = [lp.exp() for lp in log_probs]
    kls = [(p * a).sum(dim=1) for p, a in zip(probs, adv, strict=True)]
    return probs, adv, kls


def _kl_index(
    plan: _Plan, pair: _Pair, span: tuple[int, int], r0: int, r1: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Which of a pair's tile rows and of its columns are samples present at every level (the
    smooth KL's), in the same order at every level; None where all of them are."""
    p0, p1 = span
    common_rows, common_cols = plan.common_rows, plan.common_cols
    rows = common_rows[r0:r1] if pair.row_index is None else common_rows[pair.row_index[p0:p1]]
    cols = common_cols if pair.col_index is None else common_cols[pair.col_index]
    return (
        None if bool(rows.all()) else rows.nonzero().squeeze(1),
        None if bool(cols.all()) else cols.nonzero().squeeze(1),
    )


def _kl_log_probs(
    plan: _Plan,
    logits: list[torch.Tensor],
    lse: list[torch.Tensor],
    spans: Sequence[tuple[int, int]],
    r0: int,
    r1: int,
) -> list[torch.Tensor]:
    """The smooth-KL levels' row log-softmaxes over the rows and columns present at every
    level (from the rows' log-sum-exps when the level has no other)."""
    out = []
    for pair, z, lse_rows, span in zip(plan.pairs, logits, lse, spans, strict=True):
        if not pair.smooth_kl:
            continue
        rows, cols = _kl_index(plan, pair, span, r0, r1)
        if rows is None and cols is None and pair.complete:
            out.append(z - lse_rows[:, None])
            continue
        z = z if rows is None else z.index_select(0, rows)
        out.append(F.log_softmax(z if cols is None else z.index_select(1, cols), dim=1))
    return out


class _TiledLoss(torch.autograd.Function):
    """The terms (sclip, pointwise, skl) of a plan, computed in row tiles.

    Forward keeps per row and per column only log-sum-exps and positive counts; backward
    writes the gradient of each logit matrix tile by tile from them,

    - soft CE over rows: (softmax_row(Z) - Y / |Y_i|) / n (and the same over columns);
    - point-wise: (sigmoid(Z) - Y) / n;
    - smooth KL: P^g (a^g - kl^g) / n_common (the terms from differentiating M cancel),

    and passes it through the tile's matmul; a class-id pair's ``-Y`` part goes straight to
    the input gradients through per-class sums (:func:`_class_backward`). Untiled, the logits,
    multi-hot masks and smooth-KL probabilities are kept from forward; tiled, they are
    recomputed, so memory grows as (rows per tile) x N instead of G N^2.
    """

    @staticmethod
    def forward(ctx, plan: _Plan, *tensors: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        like = tensors[0]
        pairs = plan.pairs
        positives = [_Positives.of(p, like.dtype) for p in pairs]
        col_sums = _column_class_sums(pairs, positives, tensors)
        stats = [_ColumnStats.empty(p, like) for p in pairs]
        lse_rows = [like.new_zeros(p.present_rows.shape[0]) for p in pairs]
        n_pos_rows = [like.new_ones(p.present_rows.shape[0]) for p in pairs]
        terms = like.new_zeros(3)
        smooth_kl = plan.common_rows is not None
        kept: list[torch.Tensor] = []  # untiled: each pair's masked logits, then its mask Y
        kept_kl: list[torch.Tensor] = []
        for r0, r1 in _tiles(plan.n_rows, plan.chunk_size):
            spans = plan.spans(r0, r1)
            logits = _level_logits(plan, tensors, spans)
            for k, (pair, z, pos) in enumerate(zip(pairs, logits, positives, strict=True)):
                p0, p1 = spans[k]
                zm = _masked(z, pair, p0, p1)
                present = pair.present_rows[p0:p1]
                rows = tensors[pair.rows][p0:p1]
                y = None
                if pos.by_class:
                    keys = pos.keys_rows[p0:p1]
                    pos_sum = (rows * col_sums[k].index_select(0, keys)).sum(dim=1)
                    n_pos = pos.n_rows[p0:p1]
                else:
                    y = pos.tile(p0, p1)
                    pos_z = torch.where(y, z, 0.0)
                    pos_sum = pos_z.sum(dim=1)
                    n_pos = torch.where(present, y.sum(dim=1).to(z.dtype), 1.0)
                lse = torch.where(present, torch.logsumexp(zm, dim=1), 0.0)
                lse_rows[k][p0:p1], n_pos_rows[k][p0:p1] = lse, n_pos
                if pair.row_ce:
                    row = torch.where(present, lse - pos_sum / n_pos, 0.0)
                    terms[0] += pair.row_ce * row.sum() / _count(pair.present_rows)
                if pair.col_ce and y is None:
                    sums = pos.class_sums(rows, keys).index_select(0, pos.keys_cols)
                    stats[k].add(zm, (tensors[pair.cols] * sums).sum(dim=1), None)
                    stats[k].n_pos = pos.n_cols
                elif pair.col_ce:
                    stats[k].add(zm, pos_z.sum(dim=0), y.sum(dim=0))
                if pair.pointwise:
                    bce = F.softplus(zm).sum() - pos_sum.sum()
                    terms[1] += bce / _count(pair.present_rows)
                if plan.chunk_size is None:
                    kept += [zm] if y is None else [zm, y]
            if smooth_kl:
                lse = [s[p0:p1] for s, (p0, p1) in zip(lse_rows, spans, strict=True)]
                log_probs = _kl_log_probs(plan, logits, lse, spans, r0, r1)
                probs, adv, kls = _smooth_kl_term(log_probs)
                terms[2] += sum(kls).sum()
                if plan.chunk_size is None:  # one tile: backward reads them, not recomputes
                    kept_kl = [*probs, *adv, *kls]
        for pair, st in zip(pairs, stats, strict=True):
            if pair.col_ce:
                terms[0] += pair.col_ce * st.finish(pair) / _count(pair.present_cols)
        if smooth_kl:
            levels = sum(p.smooth_kl for p in pairs)
            terms[2] = terms[2] / _count(plan.common_rows) + levels * math.log(levels)
        ctx.plan, ctx.stats, ctx.positives = plan, stats, positives
        ctx.n_inputs = len(tensors)
        ctx.n_kept = len(kept)
        ctx.save_for_backward(*tensors, *lse_rows, *n_pos_rows, *kept, *kept_kl)
        return terms

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        plan, stats, positives, pairs = ctx.plan, ctx.stats, ctx.positives, ctx.plan.pairs
        saved = list(ctx.saved_tensors)
        m, g = ctx.n_inputs, len(pairs)
        tensors, lse_rows, n_pos_rows = saved[:m], saved[m : m + g], saved[m + g : m + 2 * g]
        kept = saved[m + 2 * g : m + 2 * g + ctx.n_kept]
        kept_kl = saved[m + 2 * g + ctx.n_kept :]
        col_sums = _column_class_sums(pairs, positives, tensors)
        grads = [torch.zeros_like(t) for t in tensors]
        for r0, r1 in _tiles(plan.n_rows, plan.chunk_size):
            spans = plan.spans(r0, r1)
            logits = [] if kept else _level_logits(plan, tensors, spans)
            from_forward = iter(kept)
            lse = [s[p0:p1] for s, (p0, p1) in zip(lse_rows, spans, strict=True)]
            d_logits = []
            for k, (pair, pos, lse_k, n_pos, st) in enumerate(
                zip(pairs, positives, lse, n_pos_rows, stats, strict=True)
            ):
                p0, p1 = spans[k]
                if kept:  # the masked logits, then the mask Y of a multi-hot pair
                    zm = next(from_forward)
                    y = None if pos.by_class else next(from_forward)
                else:
                    zm = _masked(logits[k], pair, p0, p1)
                    y = None if pos.by_class else pos.tile(p0, p1)
                n = _count(pair.present_rows)
                # dZ = (each term's softmax/sigmoid part) - Y (row_coef_i + col_coef_j)
                row_coef = zm.new_zeros(p1 - p0)
                col_coef = None
                dz = None
                if pair.row_ce:
                    c = grad[0] * pair.row_ce / n
                    dz = torch.exp(zm - lse_k[:, None]).mul_(c)
                    row_coef += c / n_pos[p0:p1]
                if pair.col_ce:
                    c = grad[0] * pair.col_ce / _count(pair.present_cols)
                    col = torch.exp(zm - st.lse[None, :]).mul_(c)
                    dz = col if dz is None else dz.add_(col)
                    col_coef = c / st.n_pos
                if pair.pointwise:
                    c = grad[1] / n
                    pw = torch.sigmoid(zm).mul_(c)
                    dz = pw if dz is None else dz.add_(pw)
                    row_coef += c
                if dz is None:
                    dz = torch.zeros_like(zm)
                elif y is None:
                    _class_backward(pos, tensors, grads, col_sums[k], row_coef, col_coef, p0, p1)
                else:
                    coef = row_coef[:, None] if col_coef is None else row_coef[:, None] + col_coef
                    dz.sub_(torch.where(y, coef, 0.0))
                d_logits.append(dz)
            if plan.common_rows is not None:
                if kept_kl:
                    levels = len(kept_kl) // 3
                    probs, adv = kept_kl[:levels], kept_kl[levels : 2 * levels]
                    kls = kept_kl[2 * levels :]
                else:
                    probs, adv, kls = _smooth_kl_term(
                        _kl_log_probs(plan, logits, lse, spans, r0, r1)
                    )
                c = grad[2] / _count(plan.common_rows)
                levels = [k for k, p in enumerate(pairs) if p.smooth_kl]
                for k, p, a, kl in zip(levels, probs, adv, kls, strict=True):
                    d = (a - kl[:, None]).mul_(p).mul_(c)
                    rows, cols = _kl_index(plan, pairs[k], spans[k], r0, r1)
                    if cols is not None:
                        d = d.new_zeros(d.shape[0], d_logits[k].shape[1]).index_add_(1, cols, d)
                    if rows is None:
                        d_logits[k].add_(d)
                    else:
                        d_logits[k].index_add_(0, rows, d)
            _matmul_backward(plan, tensors, d_logits, grads, spans)
        return (None, *grads)


def _column_class_sums(
    pairs: Sequence[_Pair], positives: Sequence[_Positives], tensors: Sequence[torch.Tensor]
) -> list[torch.Tensor | None]:
    """Per class-id pair, its columns' vectors summed per class (shared by every row tile)."""
    return [
        pos.class_sums(tensors[pair.cols], pos.keys_cols) if pos.by_class else None
        for pair, pos in zip(pairs, positives, strict=True)
    ]


def _class_backward(
    pos: _Positives,
    tensors: Sequence[torch.Tensor],
    grads: list[torch.Tensor],
    col_sums: torch.Tensor,
    row_coef: torch.Tensor,
    col_coef: torch.Tensor | None,
    r0: int,
    r1: int,
) -> None:
    """A class-id pair's ``-Y (row_coef_i + col_coef_j)`` part of dZ, passed straight into the
    gradients of its row and column vectors through per-class sums: what subtracting it from
    dZ before the matmul would give, without the N x N mask."""
    pair = pos.pair
    rows = tensors[pair.rows][r0:r1]
    keys_rows, keys_cols = pos.keys_rows[r0:r1], pos.keys_cols
    d_rows = row_coef[:, None] * col_sums.index_select(0, keys_rows)
    d_cols = pos.class_sums(row_coef[:, None] * rows, keys_rows).index_select(0, keys_cols)
    if col_coef is not None:
        cols = tensors[pair.cols]
        d_rows += pos.class_sums(col_coef[:, None] * cols, keys_cols).index_select(0, keys_rows)
        d_cols += col_coef[:, None] * pos.class_sums(rows, keys_rows).index_select(0, keys_cols)
    grads[pair.rows][r0:r1] -= d_rows
    grads[pair.cols] -= d_cols


@dataclass
class _ColumnStats:
    """Running per-column log-sum-exp and positive sums over row tiles (square pairs)."""

    lse: torch.Tensor
    pos_sum: torch.Tensor
    n_pos: torch.Tensor

    @classmethod
    def empty(cls, pair: _Pair, like: torch.Tensor) -> _ColumnStats:
        c = pair.present_cols.shape[0] if pair.col_ce else 0
        return cls(like.new_full((c,), -math.inf), like.new_zeros(c), like.new_zeros(c))

    def add(self, zm: torch.Tensor, pos_sum: torch.Tensor, n_pos: torch.Tensor | None) -> None:
        """One row tile: its masked logits, and per column the sum of its positive logits and
        their count (None: counted from class ids once, not per tile)."""
        self.lse = torch.logaddexp(self.lse, torch.logsumexp(zm, dim=0))
        self.pos_sum += pos_sum
        if n_pos is not None:
            self.n_pos += n_pos

    def finish(self, pair: _Pair) -> torch.Tensor:
        """Sum over present columns of the column soft CE; missing columns' entries made
        harmless for backward (lse 0, one positive)."""
        cols = pair.present_cols
        self.n_pos = torch.where(cols, self.n_pos, 1.0)
        col = torch.where(cols, self.lse - self.pos_sum / self.n_pos, 0.0)
        self.lse = torch.where(cols, self.lse, 0.0)
        return col.sum()


def _matmul_backward(
    plan: _Plan,
    tensors: Sequence[torch.Tensor],
    d_logits: list[torch.Tensor],
    grads: list[torch.Tensor],
    spans: Sequence[tuple[int, int]],
) -> None:
    """Pass a tile's logit gradients through its matmuls into ``grads`` (in place); a
    repeated column's copies share their group's gradient equally (their columns of dZ are
    equal)."""
    for pair, dz, (r0, r1) in zip(plan.pairs, d_logits, spans, strict=True):
        d, rows = pair.distinct, tensors[pair.rows][r0:r1]
        if d is not None:
            dz = dz.new_zeros(dz.shape[0], d.first.shape[0]).index_add_(1, d.inverse, dz)
        grads[pair.rows][r0:r1].addmm_(dz, _pair_columns(pair, tensors))
        if d is None:
            grads[pair.cols].addmm_(dz.T, rows)
        else:
            dc = (dz.T @ rows).div_(d.counts[:, None].to(dz.dtype))
            grads[pair.cols] += dc.index_select(0, d.inverse)


def _count(mask: torch.Tensor) -> torch.Tensor:
    return mask.sum().clamp(min=1)


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
        chunk_size: compute the loss and its gradient in tiles of this many image rows,
            recomputing each tile's logits in backward: memory grows as ``chunk_size x N``
            instead of ``G x N^2``, for a second matmul per tile. ``None``: one tile, logits
            kept for backward (fastest while they fit). Values and gradients are the same.

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
        present_cols = [label_presence(lab) for lab in b.labels_cols]
        pairs: list[_Pair] = []
        for g in range(len(text_embs)):
            pairs += self._level_pairs(b, g, scale, bias, tensors, present_rows, present_cols)
        plan = _Plan(pairs, self.chunk_size, b.image_rows.shape[0])
        if self.weights["skl"] > 0 and len(text_embs) > 1:
            # only the samples present at every level take part in the smooth KL
            common_rows = torch.stack(present_rows).all(dim=0)
            if bool(common_rows.any()):
                plan.common_rows = common_rows
                plan.common_cols = torch.stack(present_cols).all(dim=0)
        values = dict(zip(MGLL_TERMS, _TiledLoss.apply(plan, *tensors), strict=True))
        loss = sum(self.weights[name] * values[name] for name in self.terms)
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
        row_index, col_index = _index_of(present_rows[g]), _index_of(present_cols[g])
        lab_rows, lab_cols = _pick(b.labels_rows[g], row_index), _pick(b.labels_cols[g], col_index)
        every_row = torch.ones(lab_rows.shape[0], dtype=torch.bool, device=lab_rows.device)
        every_col = torch.ones(lab_cols.shape[0], dtype=torch.bool, device=lab_cols.device)
        if row_index is None:
            image = 0
        else:  # this level's image rows, as a kernel input of their own
            tensors.append(tensors[0].index_select(0, row_index))
            image = len(tensors) - 1
        texts = _augment(_pick(b.texts_cols[g], col_index), 1.0, 1.0)
        tensors.append(texts)
        labels = (lab_rows, lab_cols, every_row, every_col)
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
        every_row = torch.ones(n, dtype=torch.bool, device=ids_rows.device)
        every_col = torch.ones(m, dtype=torch.bool, device=ids_rows.device)
        tensors = [scale * b.image_rows, b.texts_cols[0]]
        pair = (ids_rows, ids_cols, every_row, every_col)
        pairs = [_Pair(0, 1, *pair, 0.5, 0.5 if b.square else 0.0, False, False)]
        if not b.square:  # local texts against the global images
            tensors += [scale * b.texts_rows[0], b.image_cols]
            pairs.append(_Pair(2, 3, *pair, 0.5, 0.0, False, False))
        clip = _TiledLoss.apply(_Plan(pairs, self.chunk_size, n), *tensors)[0]
        return {"loss": clip, "clip": clip}


def _index_of(present: torch.Tensor) -> torch.Tensor | None:
    """Positions of the present samples, or None when every sample is present."""
    return None if bool(present.all()) else present.nonzero().squeeze(1)


def _pick(t: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    return t if index is None else t.index_select(0, index)


def _check_chunk_size(chunk_size: int | None) -> int | None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or int(chunk_size) < 1):
        raise ValueError(
            f"chunk_size must be a positive number of rows or None, got {chunk_size!r}"
        )
    return None if chunk_size is None else int(chunk_size)
