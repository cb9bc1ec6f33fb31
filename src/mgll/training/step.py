"""One optimizer step: forward, loss, backward (with contrastive-correct accumulation), update.

Gradient accumulation for a contrastive loss cannot simply sum micro-batch losses: every
sample's loss depends on the whole batch. As open_clip's ``accum_freq`` does, the step first
encodes every micro-batch without gradient and caches the embeddings, computes the loss of the
whole batch from the cache, then re-encodes each micro-batch with gradient and back-propagates
the whole-batch loss with that micro-batch's cached embeddings swapped for the live ones.
Summed over micro-batches this is exactly the gradient of the big-batch loss, because

* the random state (dropout) of each micro-batch is replayed, so the live embeddings equal
  the cached ones, and
* the logit scale and bias, used by every re-forward, keep their gradient only in the last one
  (open_clip counts it ``accum_freq`` times).
"""

from __future__ import annotations

import contextlib
import math
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mgll.distributed import all_reduce_mean
from mgll.errors import UserError
from mgll.losses import MAX_LOGIT_SCALE
from mgll.schema import PrecisionName

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(UserError, RuntimeError):
    """The loss became NaN or infinite; the message names the step and the term(s)."""

    def __init__(self, step: int, terms: dict[str, float]) -> None:
        bad = [name for name, value in terms.items() if name != "loss" and not math.isfinite(value)]
        named = ", ".join(f"{name}={terms[name]}" for name in bad) or f"loss={terms['loss']}"
        super().__init__(
            f"non-finite loss at step {step}: {named} (total loss={terms['loss']}). "
            "The run stopped before the update; the last good checkpoint is untouched. "
            "Lower train.lr, use train.precision=fp32 or bf16, or check the data of this step."
        )
        self.step = step
        self.terms = terms


@dataclass
class Precision:
    """Autocast and loss scaling for one of ``fp32``, ``bf16``, ``fp16``."""

    name: PrecisionName
    device: torch.device
    scaler: torch.amp.GradScaler = field(init=False)

    def __post_init__(self) -> None:
        if self.name not in typing.get_args(PrecisionName):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.name!r}")
        # Only fp16 underflows without scaling; a disabled scaler passes everything through.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.name == "fp16")

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context of the model's forward (a no-op for fp32)."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_AUTOCAST_DTYPES[self.name])


def _terms(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # With loss.local_loss each rank holds its share of the loss and the rank-mean is the
    # global loss: report (and check for NaN) that mean, so every rank logs and stops alike.
    names = list(out)
    values = all_reduce_mean(torch.stack([out[k].detach().float() for k in names]))
    return dict(zip(names, values, strict=True))


def _check_finite(terms: dict[str, torch.Tensor], step: int) -> None:
    if not bool(torch.isfinite(terms["loss"])):
        raise NonFiniteLossError(step, {k: float(v) for k, v in terms.items()})


def compute_loss(
    loss_fn: nn.Module, out: dict[str, Any], labels: Sequence[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The loss terms of a model output (call it outside autocast: the loss works in fp32)."""
    return loss_fn(
        out["image_emb"],
        out["text_embs"],
        labels,
        logit_scale=out["logit_scale"],
        logit_bias=out["logit_bias"],
    )


def _rng_snapshot(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _rng_restore(snapshot: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(snapshot[0])
    if snapshot[1] is not None:
        torch.cuda.set_rng_state(snapshot[1], device)


def _micro_batches(
    images: torch.Tensor, texts: list[list[str]], parts: int
) -> Iterator[tuple[torch.Tensor, list[list[str]]]]:
    size = images.shape[0] // parts  # divisible: TrainConfig.per_process_batch checked it
    for j in range(parts):
        sl = slice(j * size, (j + 1) * size)
        yield images[sl], [level[sl] for level in texts]


def forward_backward(
    model: nn.Module,
    loss_fn: nn.Module,
    images: torch.Tensor,
    texts: list[list[str]],
    labels: list[torch.Tensor],
    precision: Precision,
    accum_steps: int,
    step: int,
) -> dict[str, torch.Tensor]:
    """Accumulate the gradient of the whole-batch loss into ``.grad``; return its terms.

    Raises :class:`NonFiniteLossError` before any backward pass when the loss is not finite.
    """
    scaler = precision.scaler
    if accum_steps == 1:
        with precision.autocast():
            out = model(images, texts)
        losses = compute_loss(loss_fn, out, labels)
        terms = _terms(losses)
        _check_finite(terms, step)
        scaler.scale(losses["loss"]).backward()
        return terms

    micro = list(_micro_batches(images, texts, accum_steps))
    snapshots, cached_images, cached_texts = [], [], []
    with torch.no_grad():
        for mb_images, mb_texts in micro:
            snapshots.append(_rng_snapshot(images.device))
            with precision.autocast():
                out = model(mb_images, mb_texts)
            cached_images.append(out["image_emb"])
            cached_texts.append(out["text_embs"])
        levels = len(cached_texts[0])
        whole = {
            "image_emb": torch.cat(cached_images),
            "text_embs": [torch.cat([c[g] for c in cached_texts]) for g in range(levels)],
            "logit_scale": out["logit_scale"],
            "logit_bias": out["logit_bias"],
        }
        terms = _terms(compute_loss(loss_fn, whole, labels))
    _check_finite(terms, step)

    for j, (mb_images, mb_texts) in enumerate(micro):
        last = j == accum_steps - 1
        _rng_restore(snapshots[j], images.device)
        sync = contextlib.nullcontext()
        ddp = getattr(model, "_orig_mod", model)  # under torch.compile, the wrapped DDP
        if not last and isinstance(ddp, DistributedDataParallel):
            sync = ddp.no_sync()  # all-reduce the gradients once, after the last micro-batch
        with sync:
            with precision.autocast():
                out = model(mb_images, mb_texts)
            live = {
                "image_emb": torch.cat(
                    [*cached_images[:j], out["image_emb"], *cached_images[j + 1 :]]
                ),
                "text_embs": [
                    torch.cat(
                        [
                            *(c[g] for c in cached_texts[:j]),
                            out["text_embs"][g],
                            *(c[g] for c in cached_texts[j + 1 :]),
                        ]
                    )
                    for g in range(levels)
                ],
                "logit_scale": out["logit_scale"] if last else out["logit_scale"].detach(),
                "logit_bias": out["logit_bias"] if last else out["logit_bias"].detach(),
            }
            scaler.scale(compute_loss(loss_fn, live, labels)["loss"]).backward()
    return terms


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    params: Sequence[torch.Tensor],
    grad_clip: float | None,
    logit_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unscale, clip, step and zero the gradients; returns the gradient norm before clipping.

    ``logit_scale`` (the model's log-scale parameter) is clamped to at most ln(100) after the
    update, as CLIP does: the loss caps the scale too, but its clamp has no gradient above the
    cap, so a parameter that AdamW's momentum carried past it could never come back down.
    """
    scaler = precision.scaler
    scaler.unscale_(optimizer)
    max_norm = float(grad_clip) if grad_clip else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if logit_scale is not None:
        with torch.no_grad():
            logit_scale.clamp_(max=math.log(MAX_LOGIT_SCALE))
    return grad_norm.detach()
