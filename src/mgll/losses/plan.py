"""What the loss kernel computes: the logit matrices (pairs) of a batch, their row tiles, their
repeated columns and their positives."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


def augment(t: torch.Tensor, scale: torch.Tensor | float, last: torch.Tensor | float):
    """``[scale * t, last, 0...]`` row-wise: one extra column so a dot product adds a
    constant, and zero columns up to a multiple of 8 wide (BLAS runs the backward matmuls
    slower at an odd width such as 513; the zeros add exactly nothing)."""
    if isinstance(last, torch.Tensor):
        column = last.to(t.dtype).reshape(1, 1).expand(t.shape[0], 1)
    else:  # filled on the device: no host-to-device copy
        column = t.new_full((t.shape[0], 1), float(last))
    pad = t.new_zeros(t.shape[0], -(t.shape[1] + 1) % 8)
    scaled = t if isinstance(scale, float) and scale == 1.0 else scale * t
    return torch.cat([scaled, column, pad], dim=1)


@dataclass
class Distinct:
    """Columns that repeat (same vector, same labels: a coarse level's few prompts), each
    multiplied once: ``first`` (U,) one column per group, ``inverse`` (C,) each column's group,
    ``counts`` (U,)."""

    first: torch.Tensor
    inverse: torch.Tensor
    counts: torch.Tensor


def distinct_columns(vectors: torch.Tensor, labels: torch.Tensor) -> Distinct | None:
    """Groups of exactly equal (vector, labels) rows, or None when too few repeat to pay.

    Rows are grouped by a random projection of both and the groups then checked for exact
    equality, so a projection collision can only turn the saving off, never merge two rows.
    Equal columns have equal logits and, their labels being equal, equal gradients: one
    product per group is exact.
    """
    if vectors.shape[0] == 0:
        return None
    lab = labels.double().reshape(labels.shape[0], -1)
    along_vectors, along_labels = projections(vectors.shape[1], lab.shape[1], vectors.device)
    key = vectors.detach().double() @ along_vectors + lab @ along_labels
    _, inverse, counts = torch.unique(key.squeeze(1), return_inverse=True, return_counts=True)
    if counts.shape[0] > 0.75 * vectors.shape[0]:
        return None
    rows = torch.arange(inverse.shape[0], device=inverse.device)
    first = torch.full_like(counts, inverse.shape[0]).scatter_reduce(0, inverse, rows, "amin")
    same = torch.equal(vectors[first[inverse]], vectors) and torch.equal(
        labels[first[inverse]], labels
    )
    return Distinct(first, inverse, counts) if same else None


@functools.cache
def projections(dim: int, classes: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The random (dim, 1) and (classes, 1) float64 projections of :func:`distinct_columns`
    (seed 0): a process cache, drawn and moved to ``device`` once per process rather than
    every batch."""
    g = torch.Generator().manual_seed(0)
    along_vectors = torch.randn(dim, 1, generator=g, dtype=torch.float64)
    along_labels = torch.randn(classes, 1, generator=g, dtype=torch.float64)
    return along_vectors.to(device), along_labels.to(device)


class Inputs:
    """The kernel's input matrices, in the order added: a :class:`Pair` names its row and
    column matrices by the position :meth:`add` returned (they are the autograd function's
    positional inputs, which is what it computes gradients for)."""

    def __init__(self) -> None:
        self.tensors: list[torch.Tensor] = []

    def add(self, tensor: torch.Tensor) -> int:
        """Append ``tensor``; returns its position."""
        self.tensors.append(tensor)
        return len(self.tensors) - 1

    def __getitem__(self, position: int) -> torch.Tensor:
        return self.tensors[position]


@dataclass
class Pair:
    """One logit matrix of the loss, ``Z = R C^T`` (scale and bias folded into R and C), and
    the terms it enters.

    ``rows``/``cols`` are positions in the kernel's :class:`Inputs`. A sample missing a label
    takes no part: :class:`MGLLLoss` selects the present rows and columns before the matmul, and
    ``row_index``/``col_index`` say which samples (of the plan's rows and columns) the pair's
    rows and columns are (None: all of them, in order). What reaches the pair is therefore all
    present: nothing is masked inside the logits.
    """

    rows: int
    cols: int
    labels_rows: torch.Tensor
    labels_cols: torch.Tensor
    row_ce: float  # weight in the sclip term of the row-wise soft cross-entropy (mean over rows)
    col_ce: float  # same for the column-wise one, read from the same matrix (square pairs)
    pointwise: bool
    smooth_kl: bool
    distinct: Distinct | None = None
    row_index: torch.Tensor | None = None
    col_index: torch.Tensor | None = None

    @functools.cached_property
    def row_count(self) -> torch.Tensor:
        """The number of rows (at least 1, as a device tensor), what the row terms are
        averaged over."""
        return _size(self.labels_rows)

    @functools.cached_property
    def col_count(self) -> torch.Tensor:
        """The number of columns (at least 1)."""
        return _size(self.labels_cols)

    def bounds(self, plan_bounds: list[int]) -> list[int]:
        """The pair's own row positions at the plan's tile bounds (its rows of the tile
        ``plan_bounds[i]:plan_bounds[i + 1]`` are a contiguous range), one host read at most."""
        if self.row_index is None:
            return plan_bounds
        if len(plan_bounds) == 2:  # one tile: all of the pair's rows
            return [0, self.labels_rows.shape[0]]
        at = torch.searchsorted(self.row_index.cpu(), torch.tensor(plan_bounds))
        return at.tolist()


@dataclass
class Plan:
    """What :class:`TiledLoss` computes: the pairs, the rows per tile (None: one tile) and the
    rows/columns present at every level (the smooth-KL term's samples)."""

    pairs: list[Pair]
    chunk_size: int | None
    n_rows: int
    common_rows: torch.Tensor | None = None
    common_cols: torch.Tensor | None = None
    compiled: bool = False  # the element-wise passes through torch.compile
    _spans: dict[tuple[int, int], list[tuple[int, int]]] = field(default_factory=dict)
    kl_index: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor | None]] = field(
        default_factory=dict
    )  # per (pair, tile start): the smooth KL's rows and columns, found once for both passes

    @functools.cached_property
    def n_common_rows(self) -> torch.Tensor:
        """The number of rows present at every level (at least 1): the smooth KL's average."""
        assert self.common_rows is not None
        return _count(self.common_rows)

    def spans(self, r0: int, r1: int) -> list[tuple[int, int]]:
        """Each pair's own rows that are the plan's rows ``r0:r1`` (a tile), found for every
        tile at the first call: forward and backward walk the same tiles."""
        if not self._spans:
            row_tiles = tiles(self.n_rows, self.chunk_size)
            at = [pair.bounds([0, *(t1 for _, t1 in row_tiles)]) for pair in self.pairs]
            for i, tile in enumerate(row_tiles):
                self._spans[tile] = [(b[i], b[i + 1]) for b in at]
        return self._spans[(r0, r1)]


def tiles(n: int, chunk_size: int | None) -> list[tuple[int, int]]:
    """The row tiles ``(r0, r1)`` of ``n`` rows, ``chunk_size`` rows each (None: one tile)."""
    step = n if not chunk_size or chunk_size >= n else chunk_size
    return [(r, min(r + step, n)) for r in range(0, max(n, 1), step)]


def _row_groups(plan: Plan) -> dict[int, list[int]]:
    """The pairs sharing each row matrix (every level's image rows): one matmul each."""
    groups: dict[int, list[int]] = {}
    for k, pair in enumerate(plan.pairs):
        groups.setdefault(pair.rows, []).append(k)
    return groups


def level_logits(
    plan: Plan, tensors: Sequence[torch.Tensor], spans: Sequence[tuple[int, int]]
) -> list[torch.Tensor]:
    """Every pair's (level's) logits for its rows of a tile (``spans``): one matmul per row
    matrix against the concatenated distinct columns of all the pairs that share it."""
    logits: list[torch.Tensor] = [torch.empty(0)] * len(plan.pairs)
    for rows, members in _row_groups(plan).items():
        cols = [pair_columns(plan.pairs[k], tensors) for k in members]
        p0, p1 = spans[members[0]]
        z = tensors[rows][p0:p1] @ (cols[0] if len(cols) == 1 else torch.cat(cols)).T
        for k, piece in zip(members, z.split([c.shape[0] for c in cols], dim=1), strict=True):
            d = plan.pairs[k].distinct
            logits[k] = piece if d is None else piece.index_select(1, d.inverse)
    return logits


def pair_columns(pair: Pair, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    cols = tensors[pair.cols]
    return cols if pair.distinct is None else cols.index_select(0, pair.distinct.first)


@dataclass
class Positives:
    """A pair's positives. Multi-hot: ``tile(r0, r1)`` is the (rows, cols) 0/1 mask Y. Class
    ids (``by_class``): ``keys_*`` are compact ids, the counts per row and column come from
    counting them, and every sum over positives goes through per-class sums of vectors,
    ``sum_{j: k_j = k_i} <r_i, c_j> = <r_i, sum of the c of class k_i>``, O(N D): no N x N mask
    is ever built."""

    pair: Pair
    keys_rows: torch.Tensor
    keys_cols: torch.Tensor
    n_rows: torch.Tensor | None  # (R,) positives of each row
    n_cols: torch.Tensor | None  # (C,)
    n_ids: int = 0

    @classmethod
    def of(cls, pair: Pair, dtype: torch.dtype) -> Positives:
        rows, cols = pair.labels_rows, pair.labels_cols
        if rows.dim() == 2:
            return cls(pair, (rows != 0).to(dtype), (cols != 0).to(dtype), None, None)
        r = rows.shape[0]
        ids, inverse = torch.unique(torch.cat([rows, cols]), return_inverse=True)
        count_rows = torch.bincount(inverse[:r], minlength=ids.shape[0]).to(dtype)
        count_cols = torch.bincount(inverse[r:], minlength=ids.shape[0]).to(dtype)
        n_rows, n_cols = count_cols[inverse[:r]], count_rows[inverse[r:]]
        return cls(pair, inverse[:r], inverse[r:], n_rows, n_cols, ids.shape[0])

    @property
    def by_class(self) -> bool:
        return self.n_rows is not None

    def tile(self, r0: int, r1: int) -> torch.Tensor:
        """Multi-hot: the tile's mask Y (label sets overlap) as 0/1 in the compute dtype;
        class-id pairs never build one."""
        return (self.keys_rows[r0:r1] @ self.keys_cols.T).gt_(0)

    def class_sums(self, vectors: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """(ids, D) sums of ``vectors`` (rows or columns, with their ``keys``) per class id."""
        return vectors.new_zeros(self.n_ids, vectors.shape[1]).index_add_(0, keys, vectors)


def _count(mask: torch.Tensor) -> torch.Tensor:
    return mask.sum().clamp(min=1)


def _size(t: torch.Tensor) -> torch.Tensor:
    """``t``'s length (at least 1) as what ``_count`` of an all-true mask gives (an int64
    device tensor), filled on the device."""
    return t.new_full((), max(t.shape[0], 1), dtype=torch.long)
