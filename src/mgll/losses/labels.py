"""Label tensors and positive masks: which samples of a batch are positives of which, per level."""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence

import torch

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
