"""The one autograd function that computes both losses, whole or in row tiles, with the gradient
of every logit written out by hand (docs/loss.md, "How it is computed")."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from mgll.losses.batch import index_of
from mgll.losses.plan import Inputs, Pair, Plan, Positives, level_logits, pair_columns, tiles


@functools.cache
def compiled(fn: Callable) -> Callable:
    """``torch.compile`` of one of the kernel's element-wise functions (dynamic shapes: the
    present rows change every batch): a process cache, each compiled once per process."""
    return torch.compile(fn, dynamic=True)


def _passes(fn: Callable, plan: Plan) -> Callable:
    """``fn``, or with ``plan.compiled`` its :func:`compiled` form: fused loops read each
    logit once where eager torch reads it once per op."""
    return compiled(fn) if plan.compiled else fn


def tiled_terms(plan: Plan, inputs: Inputs) -> torch.Tensor:
    """The (3,) terms (sclip, pointwise, skl) of ``plan`` over ``inputs``, differentiable with
    respect to every input matrix (through :class:`TiledLoss`)."""
    return TiledLoss.apply(plan, *inputs.tensors)


def _smooth_kl_term(
    log_probs: list[torch.Tensor],
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Per level, on the rows and columns present at every level, from the row log-softmaxes
    log P^g: P^g, a^g = log P^g - log(G M) and kl^g = <P^g, a^g> per row.

    sum_g KL(P^g_i || M_i) = sum_g kl^g_i + G log G, M_i the mean of the P^g_i. log(G M) is
    the log of the sum of the P^g (one log, where a ``logaddexp`` chain costs G - 1 passes of
    exp and log1p); where every level's probability underflowed it is clamped at the smallest
    normal float, which keeps a^g finite and leaves P^g a^g at 0, as it is.
    """
    probs = [lp.exp() for lp in log_probs]
    total = probs[0].clone()
    for p in probs[1:]:
        total += p
    log_sum = total.clamp_min_(torch.finfo(total.dtype).tiny).log_()
    adv = [lp - log_sum for lp in log_probs]
    kls = [(p * a).sum(dim=1) for p, a in zip(probs, adv, strict=True)]
    return probs, adv, kls


def _kl_grad(p: torch.Tensor, a: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
    """The smooth KL's dZ^g per unit of its weight, P^g (a^g - kl^g) (the terms from
    differentiating M cancel), written over ``a``."""
    return a.sub_(kl[:, None]).mul_(p)


def _kl_units(
    plan: Plan, probs: list[torch.Tensor], adv: list[torch.Tensor], kls: list[torch.Tensor]
) -> list[torch.Tensor]:
    grad = _passes(_kl_grad, plan)
    return [grad(p, a, kl) for p, a, kl in zip(probs, adv, kls, strict=True)]


def _kl_index(
    plan: Plan, k: int, span: tuple[int, int], r0: int, r1: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Which of pair k's tile rows and of its columns are samples present at every level (the
    smooth KL's), in the same order at every level; None where all of them are. Found once
    per tile (forward and backward ask alike); one host read where the rows are the columns
    (a square pair's one tile)."""
    if (k, r0) in plan.kl_index:
        return plan.kl_index[(k, r0)]
    pair, (p0, p1) = plan.pairs[k], span
    common_rows, common_cols = plan.common_rows, plan.common_cols
    rows = common_rows[r0:r1] if pair.row_index is None else common_rows[pair.row_index[p0:p1]]
    rows_index = index_of(rows)
    square = common_cols is common_rows and pair.col_index is pair.row_index
    if square and r0 == 0 and r1 >= plan.n_rows:
        cols_index = rows_index
    else:
        cols = common_cols if pair.col_index is None else common_cols[pair.col_index]
        cols_index = index_of(cols)
    plan.kl_index[(k, r0)] = (rows_index, cols_index)
    return rows_index, cols_index


def _kl_log_probs(
    plan: Plan,
    logits: list[torch.Tensor],
    lse: list[torch.Tensor],
    spans: Sequence[tuple[int, int]],
    r0: int,
    r1: int,
) -> list[torch.Tensor]:
    """The smooth-KL levels' row log-softmaxes over the rows and columns present at every
    level (from the rows' log-sum-exps when the level has no other)."""
    out = []
    for k, (pair, z, lse_rows, span) in enumerate(zip(plan.pairs, logits, lse, spans, strict=True)):
        if not pair.smooth_kl:
            continue
        rows, cols = _kl_index(plan, k, span, r0, r1)
        if rows is None and cols is None:
            out.append(z - lse_rows[:, None])
            continue
        z = z if rows is None else z.index_select(0, rows)
        out.append(F.log_softmax(z if cols is None else z.index_select(1, cols), dim=1))
    return out


class TiledLoss(torch.autograd.Function):
    """The terms (sclip, pointwise, skl) of a plan, computed in row tiles.

    Forward keeps per row and per column only log-sum-exps and positive counts; backward
    writes the gradient of each logit matrix tile by tile from them,

    - soft CE over rows: (softmax_row(Z) - Y / |Y_i|) / n (and the same over columns);
    - point-wise: (sigmoid(Z) - Y) / n;
    - smooth KL: P^g (a^g - kl^g) / n_common (the terms from differentiating M cancel),

    and passes it through the tile's matmul; a class-id pair's ``-Y`` part goes straight to
    the input gradients through per-class sums (:func:`_class_backward`). Untiled, the logits,
    multi-hot masks and each smooth-KL level's gradient are kept from forward; tiled, they are
    recomputed, so memory grows as (rows per tile) x N instead of G N^2.
    """

    @staticmethod
    def forward(ctx, plan: Plan, *tensors: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        like = tensors[0]
        pairs = plan.pairs
        positives = [Positives.of(p, like.dtype) for p in pairs]
        col_sums = _column_class_sums(pairs, positives, tensors)
        stats = [_ColumnStats() for _ in pairs]
        row_tiles = tiles(plan.n_rows, plan.chunk_size)
        whole = len(row_tiles) == 1  # one tile: each pair's row statistics are the tile's
        lse_rows = [] if whole else [like.new_zeros(p.labels_rows.shape[0]) for p in pairs]
        n_pos_rows = [] if whole else [like.new_ones(p.labels_rows.shape[0]) for p in pairs]
        terms = _Terms()
        smooth_kl = plan.common_rows is not None
        kept: list[torch.Tensor] = []  # untiled: each pair's logits, then its mask Y
        kept_kl: list[torch.Tensor] = []
        for r0, r1 in row_tiles:
            spans = plan.spans(r0, r1)
            logits = level_logits(plan, tensors, spans)
            for k, (pair, z, pos) in enumerate(zip(pairs, logits, positives, strict=True)):
                p0, p1 = spans[k]
                rows = tensors[pair.rows][p0:p1]
                y = None if pos.by_class else pos.tile(p0, p1)
                t = _passes(_logit_stats, plan)(z, y, bool(pair.col_ce), pair.pointwise)
                if y is None:
                    keys = pos.keys_rows[p0:p1]
                    pos_sum = (rows * col_sums[k].index_select(0, keys)).sum(dim=1)
                    n_pos = pos.n_rows[p0:p1]
                else:
                    pos_sum, n_pos = t.pos_rows, t.n_rows
                lse = t.lse_rows
                if whole:
                    lse_rows.append(lse)
                    n_pos_rows.append(n_pos)
                else:
                    lse_rows[k][p0:p1], n_pos_rows[k][p0:p1] = lse, n_pos
                if pair.row_ce:
                    row = lse - pos_sum / n_pos
                    terms.add(0, pair.row_ce * row.sum() / pair.row_count)
                if pair.col_ce and y is None:
                    sums = pos.class_sums(rows, keys).index_select(0, pos.keys_cols)
                    stats[k].add(t.lse_cols, (tensors[pair.cols] * sums).sum(dim=1), None)
                    stats[k].n_pos = pos.n_cols
                elif pair.col_ce:
                    stats[k].add(t.lse_cols, t.pos_cols, t.n_cols)
                if pair.pointwise:
                    terms.add(1, (t.softplus - pos_sum.sum()) / pair.row_count)
                if plan.chunk_size is None:  # the mask kept as booleans: a quarter the bytes
                    kept += [z] if y is None else [z, y.bool()]
            if smooth_kl:
                lse = [s[p0:p1] for s, (p0, p1) in zip(lse_rows, spans, strict=True)]
                log_probs = _kl_log_probs(plan, logits, lse, spans, r0, r1)
                probs, adv, kls = _passes(_smooth_kl_term, plan)(log_probs)
                terms.add(2, functools.reduce(torch.add, kls).sum())
                if plan.chunk_size is None:  # one tile: backward reads dZ^g, not recomputes
                    kept_kl = _kl_units(plan, probs, adv, kls)
        for pair, st in zip(pairs, stats, strict=True):
            if pair.col_ce:
                terms.add(0, pair.col_ce * st.finish() / pair.col_count)
        if smooth_kl:
            levels = sum(p.smooth_kl for p in pairs)
            kl = terms.values[2]
            terms.values[2] = kl / plan.n_common_rows + levels * math.log(levels)
        ctx.plan, ctx.stats, ctx.positives = plan, stats, positives
        ctx.n_inputs = len(tensors)
        ctx.n_kept = len(kept)
        ctx.save_for_backward(*tensors, *lse_rows, *n_pos_rows, *kept, *kept_kl)
        return terms.stacked(like)

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
        g_sclip, g_pointwise, g_kl = grad.unbind()
        coefs = [_coefficients(pair, g_sclip, g_pointwise) for pair in pairs]
        for r0, r1 in tiles(plan.n_rows, plan.chunk_size):
            spans = plan.spans(r0, r1)
            logits = [] if kept else level_logits(plan, tensors, spans)
            from_forward = iter(kept)
            lse = [s[p0:p1] for s, (p0, p1) in zip(lse_rows, spans, strict=True)]
            d_logits = []
            for k, (pair, pos, lse_k, n_pos, st, (c_row, c_col, c_pw)) in enumerate(
                zip(pairs, positives, lse, n_pos_rows, stats, coefs, strict=True)
            ):
                p0, p1 = spans[k]
                if kept:  # the logits, then the mask Y of a multi-hot pair
                    z = next(from_forward)
                    y = None if pos.by_class else next(from_forward)
                else:
                    z = logits[k]
                    y = None if pos.by_class else pos.tile(p0, p1).bool()
                dz, row_coef, col_coef = _passes(_logit_grad, plan)(
                    z, y, lse_k, st.lse, n_pos[p0:p1], st.n_pos, c_row, c_col, c_pw
                )
                if y is None and (pair.row_ce or pair.col_ce or pair.pointwise):
                    _class_backward(pos, tensors, grads, col_sums[k], row_coef, col_coef, p0, p1)
                d_logits.append(dz)
            if plan.common_rows is not None:
                units = kept_kl
                if not units:
                    probs, adv, kls = _passes(_smooth_kl_term, plan)(
                        _kl_log_probs(plan, logits, lse, spans, r0, r1)
                    )
                    units = _kl_units(plan, probs, adv, kls)
                c = g_kl / plan.n_common_rows
                levels = [k for k, p in enumerate(pairs) if p.smooth_kl]
                for k, unit in zip(levels, units, strict=True):
                    d = unit * c
                    rows, cols = _kl_index(plan, k, spans[k], r0, r1)
                    if cols is not None:
                        d = d.new_zeros(d.shape[0], d_logits[k].shape[1]).index_add_(1, cols, d)
                    if rows is None:
                        d_logits[k].add_(d)
                    else:
                        d_logits[k].index_add_(0, rows, d)
            _matmul_backward(plan, tensors, d_logits, grads, spans)
        return (None, *grads)


class _Terms:
    """The three terms (sclip, pointwise, skl) summed up from 0-dim parts in the order added:
    ``0 + a + b`` without the ``0 +`` and without indexing into a (3,) tensor per part."""

    def __init__(self) -> None:
        self.values: list[torch.Tensor | None] = [None, None, None]

    def add(self, i: int, value: torch.Tensor) -> None:
        current = self.values[i]
        self.values[i] = value if current is None else current + value

    def stacked(self, like: torch.Tensor) -> torch.Tensor:
        """The (3,) tensor of the terms; 0 for a term nothing was added to."""
        zero = like.new_zeros(())
        return torch.stack([zero if v is None else v for v in self.values])


def _coefficients(
    pair: Pair, g_sclip: torch.Tensor, g_pointwise: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """A pair's weights of the row soft CE, column soft CE and point-wise term in backward
    (the output gradients over the counts they were averaged over; None: not computed)."""
    n = pair.row_count
    c_row = g_sclip * pair.row_ce / n if pair.row_ce else None
    c_col = g_sclip * pair.col_ce / pair.col_count if pair.col_ce else None
    c_pw = g_pointwise / n if pair.pointwise else None
    return c_row, c_col, c_pw


class _TileStats(NamedTuple):
    """What forward reads off a pair's tile of logits (None: not asked for)."""

    lse_rows: torch.Tensor
    lse_cols: torch.Tensor | None
    softplus: torch.Tensor | None  # sum of softplus(Z) over the tile
    pos_rows: torch.Tensor | None  # multi-hot: sum of the positive logits per row
    pos_cols: torch.Tensor | None
    n_rows: torch.Tensor | None  # multi-hot: positives per row
    n_cols: torch.Tensor | None


def _logit_stats(
    z: torch.Tensor, y: torch.Tensor | None, cols: bool, pointwise: bool
) -> _TileStats:
    """The passes forward makes over a pair's tile of logits ``z`` (``y``: the 0/1 multi-hot
    mask or None for class ids), through one scratch buffer."""
    scratch = torch.empty_like(z)
    pos_rows = pos_cols = None
    if y is not None:
        pos_z = torch.mul(z, y, out=scratch)
        pos_rows, pos_cols = pos_z.sum(dim=1), pos_z.sum(dim=0) if cols else None
    return _TileStats(
        _logsumexp(z, 1, scratch),
        _logsumexp(z, 0, scratch) if cols else None,
        F.softplus(z).sum() if pointwise else None,
        pos_rows,
        pos_cols,
        None if y is None else y.sum(dim=1),
        None if y is None or not cols else y.sum(dim=0),
    )


def _logsumexp(z: torch.Tensor, dim: int, scratch: torch.Tensor) -> torch.Tensor:
    """``torch.logsumexp(z, dim)`` (a row or column of -inf gives -inf), its exponentials
    written into ``scratch`` instead of a fresh N x N tensor."""
    if z.numel() == 0:
        return torch.logsumexp(z, dim=dim)
    top = z.amax(dim=dim, keepdim=True)
    top = top.nan_to_num(0.0, 0.0, 0.0)  # where(isfinite, top, 0) in one op
    total = torch.sub(z, top, out=scratch).exp_().sum(dim=dim)
    return total.log_().add_(top.squeeze(dim))


def _logit_grad(
    z: torch.Tensor,
    y: torch.Tensor | None,
    lse_rows: torch.Tensor,
    lse_cols: torch.Tensor,
    n_rows: torch.Tensor,
    n_cols: torch.Tensor,
    c_row: torch.Tensor | None,
    c_col: torch.Tensor | None,
    c_pw: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A pair tile's dZ = (each term's softmax/sigmoid part) - Y (row_coef_i + col_coef_j),
    ``c_*`` each term's weight (None: not computed). With a mask ``y`` (multi-hot) the Y part
    is subtracted here; without (class ids) it is left out and the coefficients returned for
    :func:`_class_backward`."""
    row_coef = z.new_zeros(z.shape[0])
    col_coef = None
    if c_row is None and c_col is None and c_pw is None:
        return torch.zeros_like(z), row_coef, col_coef
    # two N x N buffers, every pass in place: a fresh N x N tensor per op costs page faults
    dz, part = None, None
    if c_row is not None:
        dz = torch.sub(z, lse_rows[:, None]).exp_().mul_(c_row)
        row_coef += c_row / n_rows
    if c_col is not None:
        part = torch.sub(z, lse_cols[None, :]).exp_().mul_(c_col)
        dz = part if dz is None else dz.add_(part)
        col_coef = c_col / n_cols
    if c_pw is not None:
        part = z.sigmoid() if part is None or part is dz else torch.sigmoid(z, out=part)
        part.mul_(c_pw)
        dz = part if dz is None else dz.add_(part)
        row_coef += c_pw
    if y is not None:
        coef = row_coef[:, None] if col_coef is None else row_coef[:, None] + col_coef
        zero = coef.new_zeros(())
        out = None if part is dz else part
        dz.sub_(torch.where(y, coef, zero, out=out))
    return dz, row_coef, col_coef


def _column_class_sums(
    pairs: Sequence[Pair], positives: Sequence[Positives], tensors: Sequence[torch.Tensor]
) -> list[torch.Tensor | None]:
    """Per class-id pair, its columns' vectors summed per class (shared by every row tile)."""
    return [
        pos.class_sums(tensors[pair.cols], pos.keys_cols) if pos.by_class else None
        for pair, pos in zip(pairs, positives, strict=True)
    ]


def _class_backward(
    pos: Positives,
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

    lse: torch.Tensor | None = None  # None: no tile added yet (or no column soft CE)
    pos_sum: torch.Tensor | None = None
    n_pos: torch.Tensor | None = None

    def add(self, lse: torch.Tensor, pos_sum: torch.Tensor, n_pos: torch.Tensor | None) -> None:
        """One row tile: its columns' log-sum-exps, and per column the sum of its positive
        logits and their count (None: counted from class ids once, not per tile). The first
        tile's are taken as they are (what adding them to -inf, 0 and 0 gives)."""
        if self.lse is None:
            self.lse, self.pos_sum = lse, pos_sum
            if n_pos is not None:
                self.n_pos = n_pos
            return
        self.lse = torch.logaddexp(self.lse, lse)
        self.pos_sum += pos_sum
        if n_pos is not None:
            self.n_pos += n_pos

    def finish(self) -> torch.Tensor:
        """Sum over the columns of the column soft CE."""
        return (self.lse - self.pos_sum / self.n_pos).sum()


def _matmul_backward(
    plan: Plan,
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
        grads[pair.rows][r0:r1].addmm_(dz, pair_columns(pair, tensors))
        if d is None:
            grads[pair.cols].addmm_(dz.T, rows)
        else:
            dc = (dz.T @ rows).div_(d.counts[:, None].to(dz.dtype))
            grads[pair.cols] += dc.index_select(0, d.inverse)
