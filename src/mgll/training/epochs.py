"""An epoch-based supervised engine: train E epochs, validate after each, keep the best, stop
and resume cleanly. Fine-tuning runs on it (:func:`mgll.eval.finetune.fine_tune`), and any
model + loss + validation metric can (segmentation's decoder training does:
:func:`mgll.segmentation.run.segment`).

A caller opens a :func:`~mgll.training.run_control.run_scope` (processes, device, the folder's
lock, the stop flag, the checkpoint to resume; pretraining runs inside the same), builds its
model, data and optimizer, and hands them to :func:`fit` as a :class:`SupervisedTask`;
:func:`fit` returns an :class:`EpochResult` and leaves the best epoch's weights in
``OUT/best.safetensors``.

The order of events, as pretraining's (:mod:`mgll.training.trainer`):

- per step: lr of the step (linear warm-up then half cosine, :func:`~mgll.training.optim.lr_at`,
  times each parameter group's ``lr_scale``), forward and loss under the precision's autocast,
  scaled backward, :func:`~mgll.training.step.optimizer_step` (unscale, clip, step), then
  the stop check: after SIGINT/SIGTERM the run checkpoints *at the step reached* and raises
  :class:`~mgll.training.run_control.RunInterrupted` (exit 130/143);
- per epoch end: validate (rank 0), keep the best epoch (:attr:`SupervisedTask.rank`, larger
  wins, the earlier epoch on ties), checkpoint (the one place that saves: :func:`_save`).

Resuming from a checkpoint (``latest`` or a path) is bit-identical to a run that never stopped,
also from the middle of an epoch: an epoch's batches depend on (seed, epoch) only
(:class:`~mgll.training.sampling.GlobalBatchSampler`, which skips the steps already taken), each
sample's augmentation on (seed, epoch, index) (:class:`~mgll.training.sampling.SeededSamples`),
and the checkpoint holds the weights, optimizer, loss scaler, every rank's RNG state and the
epoch's running training loss. ``batch_size`` is the global batch (all processes); under
``torchrun`` the model is wrapped in DistributedDataParallel, each rank reads its share of every
batch and rank 0 validates and writes.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mgll.distributed import all_reduce_mean, any_rank, barrier
from mgll.io import atomic_write
from mgll.schema import ConfigError
from mgll.training import checkpoint as ckpt
from mgll.training.optim import lr_at
from mgll.training.run_control import RunInterrupted, RunScope, run_scope
from mgll.training.sampling import GlobalBatchSampler, SeededSamples
from mgll.training.step import Precision, optimizer_step

__all__ = [
    "BEST_WEIGHTS",
    "EpochResult",
    "EpochSettings",
    "EpochState",
    "RunScope",
    "SupervisedTask",
    "fit",
    "run_scope",
]

BEST_WEIGHTS = "best.safetensors"  # the best validation epoch's model state_dict


@dataclass(frozen=True)
class EpochSettings:
    """How the engine trains (the caller's config maps onto these).

    ``batch_size``: samples per optimizer step over all processes; the incomplete last batch
    of an epoch is kept. ``kind``: stamped in every checkpoint (``finetune``, ``segment``).
    """

    epochs: int
    batch_size: int
    lr: float
    warmup_epochs: float = 1.0
    min_lr: float = 0.0
    grad_clip: float | None = None
    precision: str = "fp32"
    seed: int = 0
    num_workers: int = 0
    kind: str = "finetune"
    keep_last: int = 1
    progress: bool = True

    @classmethod
    def from_config(cls, config: Any, **given: Any) -> EpochSettings:
        """The settings a caller's config names (its fields named like these: ``epochs``,
        ``batch_size``, ``lr`` ...), then ``given`` (what the config does not hold)."""
        names = [f.name for f in dataclasses.fields(cls)]
        named = {name: getattr(config, name) for name in names if hasattr(config, name)}
        return cls(**{**named, **given})


@dataclass
class SupervisedTask:
    """What :func:`fit` trains: the caller's model, data, loss and validation.

    - ``model``: the plain module on the scope's device (saved, validated, restored);
    - ``train_set``: its items are collated by ``collate_fn`` (default: torch's) into batches
      that :func:`fit` moves to the device (tensors inside tuples, lists and dicts);
    - ``loss(model, batch)``: the batch's scalar training loss; ``model`` is what to call (DDP
      around ``task.model`` under torchrun); runs under the precision's autocast;
    - ``validate(model, precision)``: rank 0's validation metrics after an epoch (a flat dict
      of numbers or None), logged in the epoch's history row; None: no validation set;
    - ``rank(row)``: the tuple an epoch's history row is kept by (larger is better); None:
      the last epoch is kept;
    - ``optimizer``: built over ``model``'s parameters; a group's ``lr_scale`` (default 1)
      multiplies the scheduled lr (layer-wise decay, a smaller encoder lr);
    - ``config``: what the run computes from; saved in each checkpoint, and a resume with
      another value of a key it saved warns naming the key.
    """

    model: nn.Module
    train_set: Dataset
    loss: Callable[[nn.Module, Any], torch.Tensor]
    validate: Callable[[nn.Module, Precision], dict[str, Any]] | None
    rank: Callable[[Mapping[str, Any]], tuple[float, ...]] | None
    optimizer: torch.optim.Optimizer
    config: dict[str, Any]
    collate_fn: Callable[[list[Any]], Any] | None = None


@dataclass
class EpochResult:
    """What :func:`fit` did: the kept epoch (1-based) and its row, every epoch's row, the
    optimizer steps in all and the seconds this process trained."""

    best_epoch: int
    best: dict[str, Any]
    history: list[dict[str, Any]]
    steps: int
    seconds: float
    best_weights: Path


@dataclass
class EpochState:
    """Where a run is, and what it has seen: saved in every checkpoint."""

    step: int = 0
    epoch: int = 0  # epochs completed
    epoch_step: int = 0  # steps taken in the current epoch
    loss_sum: float = 0.0  # the current epoch's training loss x samples, so far
    seen: int = 0
    best: dict[str, Any] = field(default_factory=dict)  # the kept epoch's row
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Run:
    scope: RunScope
    task: SupervisedTask
    settings: EpochSettings
    sampler: GlobalBatchSampler
    loader: DataLoader
    wrapped: nn.Module
    precision: Precision
    warmup_steps: int
    total_steps: int


def fit(scope: RunScope, task: SupervisedTask, settings: EpochSettings) -> EpochResult:
    """Train ``task`` for ``settings.epochs`` epochs from scratch or from
    ``scope.resume_from``; validate after each epoch and keep the best in ``best.safetensors``."""
    run = _prepare(scope, task, settings)
    state = _restore(run, scope.resume_from) if scope.resume_from else EpochState()
    started = time.perf_counter()
    task.model.train()
    while state.epoch < settings.epochs:
        _train_epoch(run, state)
        _end_epoch(run, state)
    return EpochResult(
        best_epoch=int(state.best.get("epoch", 0)),
        best=dict(state.best),
        history=list(state.history),
        steps=state.step,
        seconds=round(time.perf_counter() - started, 3),
        best_weights=scope.output_dir / BEST_WEIGHTS,
    )


def _prepare(scope: RunScope, task: SupervisedTask, settings: EpochSettings) -> _Run:
    """The batch plan, loader, DDP wrapper, precision and schedule of a run."""
    n = len(task.train_set)  # type: ignore[arg-type]
    if n == 0:
        raise ConfigError("the training split is empty: there is nothing to train on")
    info = scope.info
    try:
        sampler = GlobalBatchSampler(
            n, settings.batch_size, info.rank, info.world_size, settings.seed, drop_last=False
        )
    except ValueError as err:
        raise ConfigError(f"batch_size: {err}") from err
    loader = DataLoader(
        SeededSamples(task.train_set),
        batch_sampler=sampler,
        num_workers=settings.num_workers,
        collate_fn=task.collate_fn,
        pin_memory=scope.device.type == "cuda",
        # A private generator: starting an epoch's iterator draws nothing from the global RNG.
        generator=torch.Generator().manual_seed(settings.seed),
    )
    wrapped: nn.Module = task.model
    if info.enabled:
        ids = [scope.device.index] if scope.device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(task.model, device_ids=ids)
    steps = sampler.steps_per_epoch
    return _Run(
        scope=scope,
        task=task,
        settings=settings,
        sampler=sampler,
        loader=loader,
        wrapped=wrapped,
        precision=Precision(settings.precision, scope.device),  # type: ignore[arg-type]
        warmup_steps=round(settings.warmup_epochs * steps),
        total_steps=settings.epochs * steps,
    )


def _train_epoch(run: _Run, state: EpochState) -> None:
    """The steps left in the current epoch; a stop request checkpoints at the step reached
    and ends the run (at the epoch's last step, :func:`_end_epoch` does, after validating)."""
    run.sampler.set_epoch(state.epoch, state.epoch_step)
    batches: Any = run.loader
    if run.settings.progress and run.scope.info.is_main:
        from tqdm.auto import tqdm

        batches = tqdm(
            run.loader,
            desc=f"epoch {state.epoch + 1}/{run.settings.epochs}",
            leave=False,
            disable=None,
        )
    params = [p for group in run.task.optimizer.param_groups for p in group["params"]]
    for batch in batches:
        _train_step(run, state, batch, params)
        if _stop_requested(run) and state.epoch_step < run.sampler.steps_per_epoch:
            _interrupt(run, state, _save(run, state))


def _train_step(run: _Run, state: EpochState, batch: Any, params: list[torch.Tensor]) -> None:
    """One optimizer step at the scheduled lr; advances ``state``."""
    settings, optimizer = run.settings, run.task.optimizer
    lr = lr_at(state.step, settings.lr, settings.min_lr, run.warmup_steps, run.total_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    batch = _to_device(batch, run.scope.device)
    with run.precision.autocast():
        loss = run.task.loss(run.wrapped, batch)
    run.precision.scaler.scale(loss).backward()
    optimizer_step(optimizer, run.precision, params, settings.grad_clip)
    size = _batch_size(batch)
    state.loss_sum += float(all_reduce_mean(loss.detach().float())) * size
    state.seen += size
    state.step += 1
    state.epoch_step += 1


def _end_epoch(run: _Run, state: EpochState) -> None:
    """Validate, keep the best epoch, move to the next epoch, checkpoint (then stop if asked)."""
    row: dict[str, Any] = {
        "epoch": state.epoch + 1,
        "train_loss": state.loss_sum / max(state.seen, 1),
    }
    if run.scope.info.is_main:
        if run.task.validate is not None:
            run.task.model.eval()
            row.update(run.task.validate(run.task.model, run.precision))
            run.task.model.train()
        if not state.best or _rank(run.task, row) > _rank(run.task, state.best):
            state.best = dict(row)
            path = run.scope.output_dir / BEST_WEIGHTS
            atomic_write(path, lambda tmp: _save_weights(run.task.model, tmp))
        state.history.append(row)
    barrier()
    state.epoch, state.epoch_step, state.loss_sum, state.seen = state.epoch + 1, 0, 0.0, 0
    stop = _stop_requested(run)
    saved = _save(run, state)
    if stop and state.epoch < run.settings.epochs:
        _interrupt(run, state, saved)


def _rank(task: SupervisedTask, row: Mapping[str, Any]) -> tuple[float, ...]:
    return task.rank(row) if task.rank is not None else (float(row["epoch"]),)


def _save_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_model

    save_model(model, str(path))


def _save(run: _Run, state: EpochState) -> Path:
    """The one place that saves: checkpoint at ``state`` (every rank takes part)."""
    saved = {
        "step": state.step,
        "epoch": state.epoch,
        "epoch_step": state.epoch_step,
        "loss_sum": state.loss_sum,
        "seen": state.seen,
        "best": state.best,
        "history": state.history,
        "optimizer": run.task.optimizer.state_dict(),
        "scaler": run.precision.scaler.state_dict(),
        "config": run.task.config,
    }
    return ckpt.save_run_state(
        run.scope.checkpoint_dir,
        state.step,
        run.task.model,
        saved,
        run.task.config,
        kind=run.settings.kind,
        keep_last=run.settings.keep_last,
    )


def _interrupt(run: _Run, state: EpochState, saved: Path) -> None:
    received = run.scope.stop.received or "a signal to another process of the run"
    raise RunInterrupted(received, state.step, saved)


def _stop_requested(run: _Run) -> bool:
    """Whether any rank received a stop signal (all ranks stop at the same step)."""
    (stop,) = any_rank(run.scope.stop.requested, device=run.scope.device)
    return stop


def _restore(run: _Run, weights: Path) -> EpochState:
    """Load a checkpoint into the run: weights, optimizer, loss scaler, RNG, position."""
    saved = ckpt.load_run_state(
        weights,
        run.task.model,
        run.task.optimizer,
        run.precision.scaler,
        kind=run.settings.kind,
        config=run.task.config,
        rank=run.scope.info.rank,
        noun="settings",
    )
    if run.scope.info.is_main:
        print(f"resumed from {weights} at step {saved['step']} (epoch {saved['epoch']})")
    return EpochState(
        step=saved["step"],
        epoch=saved["epoch"],
        epoch_step=saved["epoch_step"],
        loss_sum=float(saved.get("loss_sum", 0.0)),
        seen=int(saved.get("seen", 0)),
        best=dict(saved.get("best") or {}),
        history=list(saved.get("history") or []),
    )


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _batch_size(batch: Any) -> int:
    """Samples in a batch: the first dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    items = batch.values() if isinstance(batch, Mapping) else batch
    return next((_batch_size(v) for v in items if isinstance(v, (torch.Tensor, list, tuple))), 0)
