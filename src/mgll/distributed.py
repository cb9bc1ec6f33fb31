"""Thin helpers over ``torch.distributed``: who am I, and gathers that keep the autograd graph.

Everything here is a no-op in a single process, so callers never special-case it.
Processes are started by ``torchrun`` (or any launcher that sets the standard
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR`` variables); there is no launcher here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedInfo:
    """Rank layout of the current process (``world_size == 1`` when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def distributed_info() -> DistributedInfo:
    """The rank layout, from the initialised process group or else the launcher's variables."""
    if dist.is_available() and dist.is_initialized():
        return DistributedInfo(
            dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
        )
    return DistributedInfo(
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


DEFAULT_TIMEOUT = timedelta(minutes=60)
"""How long a collective may wait (NCCL's own default is 10 minutes, too short while rank 0
validates or writes a large checkpoint and the others wait at a barrier)."""


def init_distributed(
    device: str = "auto", timeout: timedelta = DEFAULT_TIMEOUT
) -> tuple[DistributedInfo, torch.device]:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Picks NCCL when the process uses a CUDA device and gloo otherwise. Returns the rank layout
    and the device this process should use (``cuda:LOCAL_RANK`` on GPU machines).
    """
    info = distributed_info()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", info.local_rank if info.enabled else 0)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timeout)
        info = distributed_info()
    return info, dev


def gather_sizes(n: int, device: torch.device) -> list[int]:
    """Number of rows each rank holds (``[n]`` in one process)."""
    if not is_distributed():
        return [n]
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.long, device=device))
    return [int(s.item()) for s in sizes]


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    pad = t.new_zeros((rows - t.shape[0], *t.shape[1:]))
    return torch.cat([t, pad], dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums every rank's gradient for this rank's rows.

    Summing (not just keeping the local slice) is what makes DDP's gradient averaging give
    the gradient of the global-batch loss.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:  # type: ignore[override]
        rank = dist.get_rank()
        top = max(sizes)
        padded = _pad_rows(tensor.contiguous(), top)
        chunks = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(chunks, padded)
        ctx.sizes, ctx.rank = sizes, rank
        return torch.cat([c[:s] for c, s in zip(chunks, sizes, strict=True)], dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def gather_with_grad(tensor: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, differentiably.

    Ranks may hold different numbers of rows; pass ``sizes`` from :func:`gather_sizes` to save
    a round trip when gathering several tensors of the same batch.
    """
    if not is_distributed():
        return tensor
    sizes = sizes or gather_sizes(tensor.shape[0], tensor.device)
    return _GatherWithGrad.apply(tensor, sizes)


@torch.no_grad()
def gather_no_grad(tensor: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate ``tensor`` (e.g. labels) from every rank along dim 0, without gradient."""
    if not is_distributed():
        return tensor
    sizes = sizes or gather_sizes(tensor.shape[0], tensor.device)
    padded = _pad_rows(tensor.contiguous(), max(sizes))
    chunks = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(chunks, padded)
    return torch.cat([c[:s] for c, s in zip(chunks, sizes, strict=True)], dim=0)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def gather_objects(value: object) -> list[object]:
    """Every rank's ``value`` (picklable), in rank order (``[value]`` in one process)."""
    if not is_distributed():
        return [value]
    everyone: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, value)
    return everyone


def any_rank(*flags: bool, device: torch.device) -> tuple[bool, ...]:
    """Each flag as true when it is true on any rank, in one collective: a signal may reach
    one rank only and clocks differ, yet every rank must stop or checkpoint at the same step."""
    if not is_distributed():
        return tuple(bool(flag) for flag in flags)
    values = torch.tensor([float(flag) for flag in flags], device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return tuple(bool(value) for value in values)


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (returns the tensor itself in one process)."""
    if not is_distributed():
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / dist.get_world_size()
