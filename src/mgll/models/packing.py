"""Token rows for a Hugging Face text encoder: several strings per row (sequence packing).

A step's distinct texts mix short coarse-level prompts ("pneumonia", ~10 tokens) with clinical
notes (up to ``max_length``). Padding every string to the longest wastes most of the short
ones' work, and encoding length groups in separate calls pays a per-call cost each. Packing
places strings end to end in rows of the longest string's width (first-fit decreasing), and a
block-diagonal attention mask with position ids restarting at each string keeps every string
seeing only itself, so each string's features equal those of encoding it alone up to float
rounding; pooling then runs per string (segment), not per row.

An encoder must take ``position_ids`` and a 4-D attention mask for this (BERT-style ones do);
:func:`packing_is_exact` checks that once when a tower is built, and a tower whose encoder
fails the check encodes one string per row instead (:func:`one_per_row`, in length groups).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class TokenRows:
    """One encoder call: ``input_ids``, ``positions`` and ``segments`` are (rows, width);
    ``segments`` holds the index of the string a token belongs to, -1 on padding."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    segments: torch.Tensor

    def to(self, device: torch.device) -> TokenRows:
        """The same rows on ``device``."""
        return TokenRows(
            *(upload(t, device) for t in (self.input_ids, self.positions, self.segments))
        )


def upload(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t``, a CPU tensor built for this call (token ids, an index), on ``device``.

    To a GPU it goes through pinned memory without blocking: a plain copy from pageable memory
    makes the host wait for every kernel queued before it, so the host would stop queueing the
    step's next kernels at each text-tower call. Elsewhere it is ``t.to(device)``.
    """
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def first_fit_rows(lengths: Sequence[int], width: int) -> list[list[int]]:
    """String indices placed in rows of ``width`` tokens, longest first, each into the first row
    with room (first-fit decreasing: at most 11/9 of the fewest rows plus one)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(width - lengths[i])
    return rows


def length_buckets(lengths: Sequence[int], call_cost: int) -> list[list[int]]:
    """Indices grouped by similar length, minimising padded tokens plus a cost per group.

    A group padded to its longest member costs ``len(group) * longest`` tokens of encoder work,
    and each group is one more encoder call, charged ``call_cost`` tokens (the tower uses one
    full-length row). Over the lengths in sorted order the best split into contiguous groups is
    an O(n^2) dynamic programme; n is the number of distinct strings of a batch.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sorted_lengths = [lengths[i] for i in order]
    n = len(order)
    best = [0] + [math.inf] * n  # best[j]: cost of the first j sorted lengths
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            cost = best[i] + (j - i) * sorted_lengths[j - 1] + call_cost
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def token_rows(
    ids: Sequence[Sequence[int]],
    rows: Sequence[Sequence[int]],
    pad_id: int,
    position_offset: int = 0,
    left: bool = False,
) -> TokenRows:
    """The tensors of one call: ``rows[r]`` lists the strings (indices into ``ids``) laid end to
    end in row r, padded with ``pad_id`` to the widest row (on the left if ``left``)."""
    width = max(sum(len(ids[i]) for i in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    segments = torch.full(shape, -1, dtype=torch.long)
    for r, row in enumerate(rows):
        col = width - sum(len(ids[i]) for i in row) if left else 0
        for i in row:
            n = len(ids[i])
            input_ids[r, col : col + n] = torch.as_tensor(ids[i], dtype=torch.long)
            positions[r, col : col + n] = torch.arange(position_offset, position_offset + n)
            segments[r, col : col + n] = i
            col += n
    return TokenRows(input_ids, positions, segments)


def block_mask(segments: torch.Tensor, additive_dtype: torch.dtype | None) -> torch.Tensor:
    """(rows, 1, width, width) attention mask letting a token see only its own string's tokens.

    A row's padding is one more block, so no query is left without a key (a softmax over
    nothing is NaN, and NaN would reach the weight gradients through the padding's
    activations). Boolean (True: attend) for SDPA; ``additive_dtype`` gives the 0 / -inf-like
    float form that eager attention adds to its scores.
    """
    rows = torch.arange(segments.shape[0], device=segments.device).unsqueeze(1)
    blocks = torch.where(segments >= 0, segments, -1 - rows)  # each row's padding: its own id
    allowed = (blocks.unsqueeze(2) == blocks.unsqueeze(1)).unsqueeze(1)
    if additive_dtype is None:
        return allowed
    zero = torch.zeros((), dtype=additive_dtype, device=segments.device)
    return torch.where(allowed, zero, torch.finfo(additive_dtype).min)


def _mean(tokens: torch.Tensor, segments: torch.Tensor, count: int) -> torch.Tensor:
    sums = tokens.new_zeros(count, tokens.shape[1]).index_add(0, segments, tokens)
    sizes = torch.bincount(segments, minlength=count).clamp(min=1).to(tokens.dtype)
    return sums / sizes.unsqueeze(1)


def _cls(tokens: torch.Tensor, segments: torch.Tensor, count: int) -> torch.Tensor:
    index = torch.arange(len(segments), device=segments.device)
    first = torch.full((count,), len(segments), device=segments.device, dtype=torch.long)
    first = first.scatter_reduce(0, segments, index, reduce="amin")
    return tokens.index_select(0, first)


# (tokens of real positions (T, hidden) in row order, their string index (T,), strings) ->
# (strings, hidden). A string's tokens are contiguous and in order.
POOLINGS: dict[str, Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]] = {
    "mean": _mean,
    "cls": _cls,
}


def pool(hidden: torch.Tensor, segments: torch.Tensor, count: int, pooling: str) -> torch.Tensor:
    """(count, hidden) string features from an encoder's (rows, width, hidden) output."""
    flat_segments = segments.reshape(-1)
    real = (flat_segments >= 0).nonzero().squeeze(1)
    tokens = hidden.reshape(-1, hidden.shape[-1]).index_select(0, real)
    return POOLINGS[pooling](tokens, flat_segments.index_select(0, real), count)


def position_offset(encoder: nn.Module) -> int:
    """The position id of a string's first token: 0 for BERT-style encoders; RoBERTa-style
    embeddings (a ``padding_idx``) count from ``padding_idx + 1``."""
    padding_idx = getattr(getattr(encoder, "embeddings", None), "padding_idx", None)
    return int(padding_idx) + 1 if isinstance(padding_idx, int) else 0


def run_packed(encoder: nn.Module, rows: TokenRows) -> torch.Tensor:
    """Last hidden states of packed ``rows`` (block-diagonal mask, restarting positions)."""
    eager = getattr(encoder.config, "_attn_implementation", None) == "eager"
    mask = block_mask(rows.segments, encoder.dtype if eager else None)
    out = encoder(input_ids=rows.input_ids, attention_mask=mask, position_ids=rows.positions)
    return out.last_hidden_state


def run_one_per_row(encoder: nn.Module, rows: TokenRows) -> torch.Tensor:
    """Last hidden states of rows holding one string each (a plain padding mask)."""
    mask = (rows.segments >= 0).long()
    return encoder(input_ids=rows.input_ids, attention_mask=mask).last_hidden_state


def packing_is_exact(encoder: nn.Module, tokenizer: Any, pooling: str) -> bool:
    """Whether ``encoder`` gives two packed strings the features it gives them one per row.

    Run once per tower on two short texts in eval mode without gradients; an encoder that
    rejects a 4-D mask or ``position_ids``, or lets strings of a row see each other, fails.
    """
    ids = tokenizer(["a chest x-ray", "no acute cardiopulmonary disease"])["input_ids"]
    was_training = encoder.training
    encoder.eval()
    try:
        rows_packed = token_rows(ids, [[0, 1]], tokenizer.pad_token_id, position_offset(encoder))
        rows_alone = token_rows(ids, [[0], [1]], tokenizer.pad_token_id)
        with torch.no_grad():
            packed = pool(run_packed(encoder, rows_packed), rows_packed.segments, 2, pooling)
            alone = pool(run_one_per_row(encoder, rows_alone), rows_alone.segments, 2, pooling)
    except (TypeError, ValueError, RuntimeError, IndexError):
        return False
    finally:
        encoder.train(was_training)
    return bool(torch.allclose(packed, alone, rtol=1e-4, atol=1e-5))
