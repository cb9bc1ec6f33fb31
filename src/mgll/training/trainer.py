"""The pretraining loop in four steps: build, restore, loop, summarize.

:func:`train` reads top to bottom:

1. :func:`build`: the records first (they fix the number of levels G), then the objective and
   the model for G levels, then the datasets the model's input size asks for, the loaders and
   the optimizer; all held by a :class:`Run`;
2. :func:`restore`: weights, optimizer, loss scaler, position and RNG states of a checkpoint;
3. :func:`loop`: optimizer steps, logging, validation at epoch ends, checkpoints; the position
   lives in an explicit :class:`TrainState`;
4. :func:`summarize`: ``summary.json`` and the printed report.

Beside it: :mod:`~mgll.training.state` (``Run``, ``TrainState``), :mod:`~mgll.training.loaders`,
:mod:`~mgll.training.progress` (the loop's log, bar and checkpoint clock) and
:mod:`~mgll.training.summary`.

One process per device; under ``torchrun`` every process runs this same function and the
contrastive loss gathers embeddings across processes by itself. Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, IterableDataset

from mgll.data import collate_samples, prepare_data
from mgll.data.config import DataConfig
from mgll.distributed import DistributedInfo, any_rank, barrier
from mgll.errors import UserError
from mgll.models import create_model
from mgll.models.config import ModelConfig
from mgll.models.model import ContrastiveModel
from mgll.process import seed_everything, torch_settings
from mgll.schema import ConfigError
from mgll.training import checkpoint as ckpt
from mgll.training.config import RunConfig, save_config
from mgll.training.loaders import map_loaders, stream_loaders
from mgll.training.objective import Objective
from mgll.training.optim import build_optimizer, lr_at, set_lr
from mgll.training.progress import Progress
from mgll.training.run_control import RunInterrupted, run_scope
from mgll.training.run_log import truncate_after
from mgll.training.state import Run, TrainState
from mgll.training.step import Precision, forward_backward, optimizer_step
from mgll.training.summary import SUMMARY_FILE, summarize
from mgll.training.validation import validate

__all__ = ["SUMMARY_FILE", "Run", "TrainState", "build", "loop", "restore", "summarize", "train"]

SPLIT_FILE = "split.csv"  # image, source, patient_id, split of every record the run read
CONFIG_FILE = "config.yaml"
# Keys that may differ between a run and its resumption without changing what it computes.
_RESUME_FREE_KEYS = ("train.max_steps", "train.device", "log.", "checkpoint.", "data.num_workers")


class DataSource(Protocol):
    """What the trainer needs of the data before and after the model exists."""

    @property
    def levels(self) -> Sequence[Any]: ...  # G level descriptions with a ``name``

    def datasets(
        self, *, image_size: Any, mean: Sequence[float], std: Sequence[float]
    ) -> Mapping[str, Dataset]: ...  # "train", "val" (optional), "test"


ModelFactory = Callable[[ModelConfig, int], ContrastiveModel]  # (model config, G)
DataBuilder = Callable[[DataConfig, Any, int], DataSource]  # (data config, data root, seed)


def train(
    cfg: RunConfig | Mapping[str, Any],
    data_root: str | Path,
    output_dir: str | Path,
    resume: str | None = None,
    model_factory: ModelFactory | None = None,
    data_builder: DataBuilder | None = None,
    collate_fn: Callable | None = None,
) -> dict[str, Any]:
    """Pretrain the model of ``cfg`` on the data of ``cfg`` and return the run summary.

    ``model_factory``/``data_builder``/``collate_fn`` default to ``mgll.models.create_model``,
    ``mgll.data.prepare_data`` and ``mgll.data.collate_samples``. Process-wide switches that
    the run sets (deterministic algorithms, cuDNN/TF32 flags) are restored when it returns.
    """
    cfg = RunConfig.from_dict(cfg)
    output_dir = Path(output_dir)
    check_device(cfg.train.device)
    extra_signals = (signal.SIGUSR1,) if cfg.checkpoint.on_sigusr1 else ()
    # run_scope refuses a bad --resume before the (slow) model and data are built, and before
    # anything is written: a refused run leaves the folder's existing run untouched.
    with (
        run_scope(output_dir, cfg.train.device, resume, extra_signals) as scope,
        torch_settings(cfg.train.deterministic, cuda=scope.device.type == "cuda"),
    ):
        seed_everything(cfg.train.seed)
        fresh = scope.resume_from is None
        factories = (model_factory, data_builder, collate_fn)
        # built before a file is written: data or a model the run refuses leaves no config.yaml
        run = build(cfg, data_root, output_dir, scope.info, scope.device, *factories)
        run.stop = scope.stop
        state = TrainState()
        if scope.info.is_main and fresh:
            save_config(cfg, output_dir / CONFIG_FILE)
            if run.write_split is not None:
                run.write_split(output_dir / SPLIT_FILE)
        if scope.resume_from is not None:
            state = restore(run, scope.resume_from)
            if state.step >= run.max_steps or state.epoch >= cfg.train.epochs:
                return _already_complete(run, state, scope.resume_from)
            _accept_resume(run, state, scope.resume_from)
        start = (time.perf_counter(), state.step)
        last_train, last_val = loop(run, state, fresh=fresh)
        return summarize(run, state, start, last_train, last_val)


def _accept_resume(run: Run, state: TrainState, weights: Path) -> None:
    """The resume is accepted: only now does the run folder change (rank 0 writes)."""
    if run.main:
        truncate_after(run.output_dir, state.step)  # rows after the checkpoint are redone
        save_config(run.cfg, run.output_dir / CONFIG_FILE)
        if run.write_split is not None:
            run.write_split(run.output_dir / SPLIT_FILE)
        print(
            f"resumed from {weights} at step {state.step} (epoch {state.epoch}, "
            f"step {state.epoch_step})"
        )
    run.last_checkpoint = weights


def check_device(spec: str) -> None:
    """A ConfigError naming ``train.device`` when it asks for CUDA this machine lacks."""
    if not spec.startswith("cuda"):
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = spec.partition(":")[2]
    if count == 0 or (index.isdigit() and int(index) >= count):
        found = f"{count} CUDA device(s)" if count else "no CUDA device"
        cuda = torch.version.cuda or "none"
        raise ConfigError(
            f"train.device={spec!r} but this machine has {found} (torch {torch.__version__}, "
            f"CUDA build {cuda}); use train.device=cpu or auto"
        )


def _already_complete(run: Run, state: TrainState, weights: Path) -> dict[str, Any]:
    """A resume of a finished run: say so, change nothing, return the run's summary."""
    path = run.output_dir / SUMMARY_FILE
    summary = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if run.main:
        print(
            f"the run in {run.output_dir} is complete: {weights.name} is at step {state.step} of "
            f"{run.max_steps}; nothing to do (raise --max-steps or train.epochs to continue)"
        )
    return summary


# ---- 1. build ---------------------------------------------------------------------------------


def build(
    cfg: RunConfig,
    data_root: str | Path,
    output_dir: Path,
    info: DistributedInfo,
    device: torch.device,
    model_factory: ModelFactory | None = None,
    data_builder: DataBuilder | None = None,
    collate_fn: Callable | None = None,
) -> Run:
    """Records (G), objective, model, datasets, loaders, optimizer: a ready :class:`Run`."""
    model_factory = model_factory or create_model
    data_builder = data_builder or prepare_data
    collate_fn = collate_fn or collate_samples
    seed, tcfg = cfg.train.seed, cfg.train
    try:
        data = data_builder(cfg.data, data_root, seed)
    except UserError as err:  # it names the data.* key, file or row; a bug keeps its traceback
        raise ConfigError(f"data section (data root {data_root}): {err}") from err
    num_levels = len(data.levels)
    objective = Objective.from_config(cfg.loss, num_levels)
    try:
        model = model_factory(cfg.model.resolved(), num_levels)
    except UserError as err:  # it names the model.* key at fault
        raise ConfigError(f"model section: {err}") from err
    model = model.to(device)  # type: ignore[attr-defined]
    _fit_model_to_run(model, objective, tcfg.grad_checkpointing)

    try:
        datasets = data.datasets(
            image_size=model.image_size, mean=model.image_mean, std=model.image_std
        )
    except UserError as err:
        raise ConfigError(f"data section (data root {data_root}): {err}") from err
    train_set, val_set = datasets["train"], datasets.get("val")
    # A custom data builder may know nothing of sources, weights or split files.
    weights = data.sampling_weights("train") if hasattr(data, "sampling_weights") else None
    sources = data.source_counts() if hasattr(data, "source_counts") else {}
    write_split = getattr(data, "write_split", None)
    if isinstance(train_set, IterableDataset):  # shards: streams that plan their own batches
        sampler, train_loader, val_loader = stream_loaders(cfg, info, device, train_set, val_set)
    else:
        sampler, train_loader, val_loader = map_loaders(
            cfg, info, device, train_set, val_set, collate_fn, weights
        )
    steps_per_epoch = sampler.steps_per_epoch
    total_steps = steps_per_epoch * tcfg.epochs
    wrapped: nn.Module = model  # type: ignore[assignment]
    if info.enabled:
        wrapped = DistributedDataParallel(
            wrapped, device_ids=[device.index] if device.type == "cuda" else None
        )
    if tcfg.compile:
        wrapped = torch.compile(wrapped)
    return Run(
        cfg=cfg,
        output_dir=output_dir,
        info=info,
        device=device,
        objective=objective,
        level_names=[level.name for level in data.levels],
        model=model,
        wrapped=wrapped,
        train_set=train_set,
        val_set=val_set,
        sampler=sampler,
        train_loader=train_loader,
        val_loader=val_loader,
        optimizer=build_optimizer(model, tcfg),  # type: ignore[arg-type]
        precision=Precision(tcfg.precision, device),
        warmup_steps=round(tcfg.warmup_epochs * steps_per_epoch),
        total_steps=total_steps,
        max_steps=min(total_steps, tcfg.max_steps or total_steps),
        sources=sources,
        write_split=write_split,
    )


def _fit_model_to_run(model: ContrastiveModel, objective: Objective, checkpointing: bool) -> None:
    """The model changes the run asks for: activation checkpointing, a frozen unused bias."""
    if not objective.reads_all_levels and model.text_per_level:
        raise ConfigError(
            "loss.name=clip reads the texts of one level (loss.clip_level) but "
            "model.text_per_level=true builds a text tower per level; set "
            "model.text_per_level=false for the CLIP baseline"
        )
    if checkpointing:
        model.set_grad_checkpointing(True)
    # Nothing would train the bias when no term reads it; frozen, DDP waits for no gradient.
    if not objective.uses_logit_bias:
        model.logit_bias.requires_grad_(False)


# ---- 2. restore -------------------------------------------------------------------------------


def restore(run: Run, weights: Path) -> TrainState:
    """Load a checkpoint into the run: weights, optimizer, loss scaler, position, RNG states.

    Nothing in the run folder changes here: the caller accepts the resume first.
    """
    saved = ckpt.load_run_state(
        weights,
        run.model,  # type: ignore[arg-type]
        run.optimizer,
        run.precision.scaler,
        kind="pretrain",
        config=run.cfg.to_dict(),
        rank=run.info.rank,
        free_keys=_RESUME_FREE_KEYS,
        read_config=_as_current,
    )
    _check_stream_layout(run, saved, weights)
    return TrainState(saved["step"], saved["epoch"], saved["epoch_step"])


def _as_current(saved: Mapping[str, Any]) -> Mapping[str, Any]:
    """A config saved by an older mgll as this one reads it (moved keys in place, keys it did
    not write at their defaults), so only real changes are named; as written when it is not
    a current config."""
    with contextlib.suppress(ConfigError):
        return RunConfig.from_dict(saved).to_dict()
    return saved


def _check_stream_layout(run: Run, saved: Mapping[str, Any], weights: Path) -> None:
    """A run reading shards resumes exactly only with the same processes and loader workers:
    they fix which stream reads which shard (mgll.data.shards)."""
    if not isinstance(run.train_set, IterableDataset):
        return
    was = (len(saved["rng"]), int(saved["config"].get("data", {}).get("num_workers", 0)))
    now = (run.info.world_size, run.cfg.data.num_workers)
    if was != now:
        raise ckpt.CheckpointError(
            f"{weights} was trained from shards with {was[0]} process(es) x data.num_workers="
            f"{was[1]}; resume with the same (now {now[0]} x {now[1]}): they fix which shards "
            "each rank and worker reads"
        )


def save(run: Run, state: TrainState) -> None:
    """Checkpoint the run at ``state`` (every rank takes part: each one's RNG state is kept)."""
    cfg = run.cfg.to_dict()
    saved = {
        "step": state.step,
        "epoch": state.epoch,
        "epoch_step": state.epoch_step,
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.precision.scaler.state_dict(),
        "schedule": {"warmup_steps": run.warmup_steps, "total_steps": run.total_steps},
        "config": cfg,
    }
    run.last_checkpoint = ckpt.save_run_state(
        run.checkpoint_dir,
        state.step,
        run.model,  # type: ignore[arg-type]
        saved,
        cfg,
        kind="pretrain",
        keep_last=run.cfg.checkpoint.keep_last,
        build_facts=run.model.build_facts(),
    )


# ---- 3. loop ----------------------------------------------------------------------------------


def loop(run: Run, state: TrainState, fresh: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train from ``state`` to ``run.max_steps``; returns the last train and val rows.

    Per step: :func:`train_step`, :meth:`Progress.log_step`, :func:`_checkpoint_if_due`; at an
    epoch's end :func:`_end_epoch`. :func:`_checkpoint` is the one place that saves (and stops
    on a signal), :func:`_validate_and_log` the one that validates.
    """
    cfg, tcfg = run.cfg, run.cfg.train
    progress = Progress.open(run, state, fresh)
    params = [p for group in run.optimizer.param_groups for p in group["params"]]
    run.wrapped.train()
    try:
        while state.epoch < tcfg.epochs and state.step < run.max_steps:
            run.sampler.set_epoch(state.epoch, state.epoch_step)
            stop = False
            for batch in run.train_loader:
                values, lr, grad_norm = train_step(run, state, batch, params)
                progress.log_step(run, state, values, lr, grad_norm)
                stop = _checkpoint_if_due(run, state, progress)
                if stop or state.step >= run.max_steps:
                    break  # at an epoch's end a stop is saved by _end_epoch, after validation
            if state.epoch_step >= run.sampler.steps_per_epoch:
                _end_epoch(run, state, progress, stop)
        if state.epoch == 0 and run.val_loader is not None and cfg.eval.every_epochs > 0:
            # --max-steps ended the run inside its first epoch: validate once, at the end.
            _validate_and_log(run, state, progress)
            run.validated_at_end = True
        if progress.saved_step != state.step:
            _checkpoint(run, state, progress)
    finally:
        progress.close()
    return progress.last_train, progress.last_val


def train_step(
    run: Run, state: TrainState, batch: Mapping[str, Any], params: Sequence[torch.Tensor]
) -> tuple[dict[str, float], float, torch.Tensor]:
    """One optimizer step on ``batch`` at the scheduled lr; advances ``state``.

    Returns the loss terms, the lr and the gradient norm before clipping.
    """
    tcfg, device = run.cfg.train, run.device
    images = batch["images"].to(device, non_blocking=True)
    labels = [lab.to(device, non_blocking=True) for lab in batch["labels"]]
    run.skipped.update(batch.get("skipped", []))
    lr = lr_at(state.step, tcfg.lr, tcfg.min_lr, run.warmup_steps, run.total_steps)
    set_lr(run.optimizer, lr)
    texts, labels = run.objective.inputs(batch["texts"], labels)
    terms = forward_backward(
        run.wrapped,
        run.objective.loss,
        images,
        texts,
        labels,
        run.precision,
        tcfg.accum_steps,
        state.step + 1,
    )
    grad_norm = optimizer_step(
        run.optimizer, run.precision, params, tcfg.grad_clip, logit_scale=run.model.logit_scale
    )
    state.step += 1
    state.epoch_step += 1
    return {k: float(v) for k, v in terms.items()}, lr, grad_norm


def _checkpoint_if_due(run: Run, state: TrainState, progress: Progress) -> bool:
    """Inside an epoch, checkpoint when ``checkpoint.every_steps``/``every_minutes`` say so or a
    stop was asked for (then stop); returns whether a stop was asked for. The last step of an
    epoch is saved by :func:`_end_epoch`, after validation."""
    due = state.step % run.cfg.checkpoint.every_steps == 0
    stop, overdue = _agree(run, progress.checkpoint_overdue(run.cfg.checkpoint.every_minutes))
    if (due or overdue or stop) and state.epoch_step < run.sampler.steps_per_epoch:
        _checkpoint(run, state, progress, stop)
    return stop


def _end_epoch(run: Run, state: TrainState, progress: Progress, stop: bool) -> None:
    """Validate when due, move to the next epoch, checkpoint (then stop if asked to)."""
    every = run.cfg.eval.every_epochs
    if run.val_loader is not None and every > 0 and (state.epoch + 1) % every == 0:
        _validate_and_log(run, state, progress)
    barrier()
    state.epoch, state.epoch_step = state.epoch + 1, 0
    _checkpoint(run, state, progress, stop and state.step < run.max_steps)


def _checkpoint(run: Run, state: TrainState, progress: Progress, stop: bool = False) -> None:
    """The one place that saves: checkpoint at ``state``; with ``stop``, then end the run with
    :class:`RunInterrupted` (the checkpoint is at the step the stop reached)."""
    save(run, state)
    progress.saved(state.step)
    if stop:
        raise RunInterrupted(_signal_name(run), state.step, run.last_checkpoint)


def _validate_and_log(run: Run, state: TrainState, progress: Progress) -> None:
    """The one place that validates: metrics on the validation set, logged at ``state``."""
    metrics = validate(
        run.model,  # type: ignore[arg-type]
        run.objective,
        run.val_loader,  # type: ignore[arg-type]
        run.level_names,
        run.precision,
        run.device,
        run.cfg.eval.recall_at,
        run.cfg.eval.precision_at,
    )
    row = {"kind": "val", "split": "val", "step": state.step, "epoch": state.epoch} | metrics
    progress.log_val(row)


def _signal_name(run: Run) -> str:
    received = run.stop.received if run.stop is not None else None
    return received or "a signal to another process of the run"


def _agree(run: Run, overdue: bool) -> tuple[bool, bool]:
    """(stop requested, checkpoint overdue) as every rank sees it: all ranks must checkpoint
    and stop at the same step."""
    stop = run.stop is not None and run.stop.requested
    stop, overdue = any_rank(stop, overdue, device=run.device)
    return stop, overdue
