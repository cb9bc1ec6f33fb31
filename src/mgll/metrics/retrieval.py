"""Retrieval ranking: per-query hits of R@K and label-aware P@K, without sorting rows."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _top_k_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """(Q, G) bool: each row's k best entries, ties at the cut taken in column order (the
    order a stable sort of the row would give), without sorting the rows."""
    k = min(k, scores.shape[1])
    if k == 0:
        return np.zeros(scores.shape, dtype=bool)
    kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1 : k]  # the k-th largest per row
    above = scores > kth
    ties = scores == kth
    mask = above | ties
    need = k - above.sum(axis=1)
    crowded = np.flatnonzero(ties.sum(axis=1) > need)  # more ties at the cut than places
    if crowded.size:
        first = np.cumsum(ties[crowded], axis=1) <= need[crowded, None]
        mask[crowded] = above[crowded] | (ties[crowded] & first)
    return mask


def retrieval_hits(
    similarity: np.ndarray,
    own_text: np.ndarray,
    image_labels: np.ndarray,
    text_labels: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    *,
    text_to_image: bool = True,
) -> dict[str, np.ndarray]:
    """Per-query hit arrays (float, one entry per query) of every retrieval metric, the one
    ranking kernel of validation during pretraining and of ``mgll retrieve``.

    ``similarity`` (I, T) images x texts; ``own_text`` (I,) the gallery index of each image's
    text; ``image_labels`` (I, C) and ``text_labels`` (T, C) 0/1 label matrices. Keys:
    ``i2t_R@K`` (own text in the top K), ``t2i_R@K`` (one of the text's images in the top K),
    ``i2t_P@K``/``t2i_P@K`` (share of the top K whose labels overlap the query's; a K beyond
    the gallery counts the whole gallery) and ``i2t_rank`` (1-based rank of the own text);
    ``text_to_image=False`` leaves the ``t2i`` keys out. Ties rank in gallery order, as a
    stable sort would (which favours the earlier entry; exact ties are rare with float
    embeddings). No row is sorted: O(I x T) per K in time and memory.
    """
    similarity = np.asarray(similarity)
    own_text = np.asarray(own_text, dtype=np.int64)
    n_images, n_texts = similarity.shape
    rows = np.arange(n_images)
    own = similarity[rows, own_text][:, None]
    earlier = np.arange(n_texts)[None, :] < own_text[:, None]
    rank_of_own = (similarity > own).sum(axis=1) + ((similarity == own) & earlier).sum(axis=1)
    # 0/1 labels: float32 products are exact counts, and BLAS makes them cheap
    overlap = (
        np.asarray(image_labels, dtype=np.float32) @ np.asarray(text_labels, dtype=np.float32).T
    ) > 0  # (I, T)
    out: dict[str, np.ndarray] = {}
    if text_to_image:
        owner = np.zeros((n_texts, n_images), dtype=bool)
        owner[own_text, rows] = True
    for k in ks:
        out[f"i2t_R@{k}"] = (rank_of_own < k).astype(float)
        top = _top_k_mask(similarity, k)
        out[f"i2t_P@{k}"] = (top & overlap).sum(axis=1) / max(min(k, n_texts), 1)
        if text_to_image:
            top_t = _top_k_mask(similarity.T, k)
            out[f"t2i_R@{k}"] = (top_t & owner).any(axis=1).astype(float)
            out[f"t2i_P@{k}"] = (top_t & overlap.T).sum(axis=1) / max(min(k, n_images), 1)
    out["i2t_rank"] = rank_of_own.astype(float) + 1
    return out
