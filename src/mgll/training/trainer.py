"""The pretraining loop in four steps: build, restore, loop, summarize.

:func:`train` reads top to bottom:

1. :func:`build`: the records first (they fix the number of levels G), then the objective and
   the model for G levels, then the datasets the model's input size asks for, the loaders and
   the optimizer; all held by a :class:`Run`;
2. :func:`restore`: weights, optimizer, loss scaler, position and RNG states of a checkpoint;
3. :func:`loop`: optimizer steps, logging, validation at epoch ends, checkpoints; the position
   lives in an explicit :class:`TrainState`;
4. :func:`summarize`: ``summary.json`` and the printed report.

One process per device; under ``torchrun`` every process runs this same function and the
contrastive loss gathers embeddings across processes by itself. Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm import tqdm

from mgll.data.config import DataConfig
from mgll.distributed import DistributedInfo, barrier, init_distributed, is_distributed
from mgll.io import atomic_write
from mgll.models.config import ModelConfig
from mgll.models.model import ContrastiveModel
from mgll.process import torch_settings
from mgll.schema import ConfigError
from mgll.training import checkpoint as ckpt
from mgll.training.config import RunConfig, save_config
from mgll.training.evaluate import validate
from mgll.training.objective import Objective
from mgll.training.optim import build_optimizer, lr_at, set_lr
from mgll.training.run_control import RunInterrupted, RunLock, StopRequests
from mgll.training.run_log import MetricsLog, flatten, truncate_after
from mgll.training.sampling import GlobalBatchSampler, SeededSamples, sample_seed
from mgll.training.step import Precision, forward_backward, optimizer_step

SUMMARY_FILE = "summary.json"
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


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


@dataclass
class TrainState:
    """Where a run is: optimizer steps taken, epoch, steps taken in that epoch."""

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0


@dataclass
class Run:
    """Everything :func:`build` makes, in one place."""

    cfg: RunConfig
    output_dir: Path
    info: DistributedInfo
    device: torch.device
    objective: Objective
    level_names: list[str]
    model: ContrastiveModel  # the plain model (checkpoints, validation)
    wrapped: nn.Module  # what the step calls: DDP and/or torch.compile around ``model``
    train_set: Dataset
    val_set: Dataset | None
    sampler: Any  # GlobalBatchSampler, or a stream's batch plan: steps_per_epoch, set_epoch
    train_loader: DataLoader
    val_loader: DataLoader | None
    optimizer: torch.optim.Optimizer
    precision: Precision
    warmup_steps: int
    total_steps: int
    max_steps: int
    skipped: set[str] = field(default_factory=set)
    sources: dict[str, dict[str, int]] = field(default_factory=dict)  # images per source, split
    write_split: Callable[[Path], None] | None = None  # writes split.csv (the data's, if known)
    stop: StopRequests | None = None  # signals asking for a clean stop
    last_checkpoint: Path | None = None  # written (or resumed from) by this run
    validated_at_end: bool = False

    @property
    def main(self) -> bool:
        """Whether this process writes files (rank 0)."""
        return self.info.is_main

    @property
    def checkpoint_dir(self) -> Path:
        """``OUT/checkpoints``."""
        return self.output_dir / ckpt.CHECKPOINT_SUBDIR


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
    info, device = init_distributed(cfg.train.device)
    extra_signals = (signal.SIGUSR1,) if cfg.checkpoint.on_sigusr1 else ()
    with (
        torch_settings(cfg.train.deterministic, cuda=device.type == "cuda"),
        RunLock(output_dir, enabled=info.is_main),
        StopRequests(extra_signals) as stop,
    ):
        seed_everything(cfg.train.seed)
        # Fail on a bad --resume before the (slow) model and data are built, and before writing
        # anything: a refused run must leave the folder's existing run untouched.
        resume_from = ckpt.resolve_checkpoint(resume, output_dir) if resume is not None else None
        if resume_from is None and ckpt.list_checkpoints(output_dir / ckpt.CHECKPOINT_SUBDIR):
            raise ckpt.CheckpointError(
                f"{output_dir} already holds a run with checkpoints; continue it with --resume "
                "latest or choose a new --output-dir"
            )
        if info.is_main and resume_from is None:
            save_config(cfg, output_dir / CONFIG_FILE)
        run = build(
            cfg, data_root, output_dir, info, device, model_factory, data_builder, collate_fn
        )
        run.stop = stop
        state = TrainState()
        if info.is_main and resume_from is None and run.write_split is not None:
            run.write_split(output_dir / SPLIT_FILE)
        if resume_from is not None:
            state = restore(run, resume_from)
            if state.step >= run.max_steps or state.epoch >= cfg.train.epochs:
                return _already_complete(run, state, resume_from)
            # The resume is accepted: only now does the run folder change.
            if info.is_main:
                truncate_after(output_dir, state.step)  # rows after the checkpoint are redone
                save_config(cfg, output_dir / CONFIG_FILE)
                if run.write_split is not None:
                    run.write_split(output_dir / SPLIT_FILE)
                print(
                    f"resumed from {resume_from} at step {state.step} (epoch {state.epoch}, "
                    f"step {state.epoch_step})"
                )
            run.last_checkpoint = resume_from
        start = (time.perf_counter(), state.step)
        last_train, last_val = loop(run, state, fresh=resume_from is None)
        return summarize(run, state, start, last_train, last_val)


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
    if model_factory is None or data_builder is None or collate_fn is None:
        from mgll.data import collate_samples, prepare_data
        from mgll.models import create_model

        model_factory = model_factory or create_model
        data_builder = data_builder or prepare_data
        collate_fn = collate_fn or collate_samples
    seed, tcfg = cfg.train.seed, cfg.train
    try:
        data = data_builder(cfg.data, data_root, seed)
    except ValueError as err:  # the builder names the data.* key, file or row at fault
        raise ConfigError(f"data section (data root {data_root}): {err}") from err
    num_levels = len(data.levels)
    objective = Objective.from_config(cfg.loss, num_levels)
    try:
        model = model_factory(cfg.model.resolved(), num_levels)
    except ValueError as err:  # the factory names the model.* key at fault
        raise ConfigError(f"model section: {err}") from err
    model = model.to(device)  # type: ignore[attr-defined]
    _fit_model_to_run(model, objective, tcfg.grad_checkpointing)

    try:
        datasets = data.datasets(
            image_size=model.image_size, mean=model.image_mean, std=model.image_std
        )
    except ValueError as err:
        raise ConfigError(f"data section (data root {data_root}): {err}") from err
    train_set, val_set = datasets["train"], datasets.get("val")
    tcfg.per_process_batch(info.world_size)
    # A custom data builder may know nothing of sources, weights or split files.
    weights = data.sampling_weights("train") if hasattr(data, "sampling_weights") else None
    sources = data.source_counts() if hasattr(data, "source_counts") else {}
    write_split = getattr(data, "write_split", None)
    if isinstance(train_set, IterableDataset):  # shards: streams that plan their own batches
        sampler, train_loader, val_loader = _stream_loaders(cfg, info, device, train_set, val_set)
    else:
        sampler, train_loader, val_loader = _map_loaders(
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


def _map_loaders(
    cfg: RunConfig,
    info: DistributedInfo,
    device: torch.device,
    train_set: Dataset,
    val_set: Dataset | None,
    collate_fn: Callable,
    weights: Sequence[float] | None = None,
) -> tuple[GlobalBatchSampler, DataLoader, DataLoader | None]:
    """Loaders of indexable datasets: global batches by :class:`GlobalBatchSampler` (drawn
    in proportion to ``weights`` when a pool gives them)."""
    seed, tcfg = cfg.train.seed, cfg.train
    try:
        sampler = GlobalBatchSampler(
            len(train_set),  # type: ignore[arg-type]
            tcfg.batch_size,
            info.rank,
            info.world_size,
            seed=seed,
            weights=weights,
        )
    except ValueError as err:
        raise ConfigError(str(err)) from err
    workers = cfg.data.num_workers
    loader_kwargs: dict[str, Any] = {
        "num_workers": workers,
        "collate_fn": collate_fn,
        "pin_memory": device.type == "cuda",
        "persistent_workers": workers > 0,
        # A private generator: creating an iterator must not draw from the global RNG.
        "generator": torch.Generator().manual_seed(seed),
    }
    train_loader = DataLoader(SeededSamples(train_set), batch_sampler=sampler, **loader_kwargs)
    val_loader = None
    if val_set is not None and len(val_set) > 0 and info.is_main:  # type: ignore[arg-type]
        # Validation draws the same texts and seeds every epoch: epochs stay comparable.
        val_keys = [(i, 0, sample_seed(seed, 0, i)) for i in range(len(val_set))]  # type: ignore[arg-type]
        val_loader = DataLoader(
            SeededSamples(val_set),
            sampler=val_keys,
            batch_size=cfg.eval.batch_size,
            **loader_kwargs,
        )
    return sampler, train_loader, val_loader


def _stream_loaders(
    cfg: RunConfig,
    info: DistributedInfo,
    device: torch.device,
    train_set: Any,
    val_set: Any,
) -> tuple[Any, DataLoader, DataLoader | None]:
    """Loaders of streaming datasets (``data.source: shards``): the stream's own batch plan
    (``ShardSplit.batches``) is the sampler; workers are started each epoch with its plan."""
    workers = cfg.data.num_workers
    loader_kwargs: dict[str, Any] = {
        "batch_size": None,  # the streams collate their batches
        "num_workers": workers,
        "pin_memory": device.type == "cuda",
        "generator": torch.Generator().manual_seed(cfg.train.seed),
    }
    try:
        sampler = train_set.batches(
            cfg.train.batch_size // info.world_size, info.rank, info.world_size, workers=workers
        )
        val_loader = None
        if val_set is not None and len(val_set) > 0 and info.is_main:
            # Validation reads every sample once, in epoch 0's draws, every epoch.
            val_batches = val_set.batches(
                cfg.eval.batch_size, workers=workers, shuffle=False, drop_last=False
            )
            val_loader = DataLoader(val_batches, **loader_kwargs)
    except ValueError as err:  # the stream names the shards and the setting at fault
        raise ConfigError(str(err)) from err
    return sampler, DataLoader(sampler, **loader_kwargs), val_loader


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


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ and that change what a resumed run computes.

    A config saved by an older mgll is read through :class:`RunConfig` first, so keys it did
    not write (they had their defaults) do not count as differences.
    """
    with contextlib.suppress(ConfigError):  # else not a current config: compare as written
        old = RunConfig.from_dict(old).to_dict()
    a, b = flatten(old), flatten(new)
    return [
        k
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k) and not any(k.startswith(free) for free in _RESUME_FREE_KEYS)
    ]


def restore(run: Run, weights: Path) -> TrainState:
    """Load a checkpoint into the run: weights, optimizer, loss scaler, position, RNG states.

    Nothing in the run folder changes here: the caller accepts the resume first.
    """
    saved = ckpt.load_state(weights)
    changed = config_differences(saved["config"], run.cfg.to_dict())
    if changed and run.main:
        print(
            f"warning: resuming {weights} with a config that differs in: {', '.join(changed)}",
            file=sys.stderr,
        )
    _check_stream_layout(run, saved, weights)
    ckpt.load_weights(run.model, weights)  # type: ignore[arg-type]
    try:
        run.optimizer.load_state_dict(saved["optimizer"])
    except ValueError as err:  # parameter groups of another model or optimizer setup
        raise ckpt.CheckpointError(
            f"{ckpt.state_path_for(weights)}: its optimizer state does not fit this model "
            f"({err}); resume with the config the run was started with"
        ) from err
    if saved["scaler"]:  # empty when saved without fp16 loss scaling: start a fresh one
        run.precision.scaler.load_state_dict(saved["scaler"])
    rank = run.info.rank
    ckpt.restore_rng_state(saved["rng"][rank] if rank < len(saved["rng"]) else saved["rng"][0])
    return TrainState(saved["step"], saved["epoch"], saved["epoch_step"])


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
    rng = ckpt.capture_rng_state()
    if run.info.enabled:
        everyone: list[Any] = [None] * run.info.world_size
        dist.all_gather_object(everyone, rng)
        rng_states = everyone
    else:
        rng_states = [rng]
    if run.main:
        cfg = run.cfg.to_dict()
        saved = {
            "step": state.step,
            "epoch": state.epoch,
            "epoch_step": state.epoch_step,
            "optimizer": run.optimizer.state_dict(),
            "scaler": run.precision.scaler.state_dict(),
            "schedule": {"warmup_steps": run.warmup_steps, "total_steps": run.total_steps},
            "rng": rng_states,
            "config": cfg,
        }
        run.last_checkpoint = ckpt.save_checkpoint(
            run.checkpoint_dir,
            state.step,
            run.model,  # type: ignore[arg-type]
            saved,
            cfg,
            run.cfg.checkpoint.keep_last,
            run.model.build_facts(),
        )
    barrier()


# ---- 3. loop ----------------------------------------------------------------------------------


def loop(run: Run, state: TrainState, fresh: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train from ``state`` to ``run.max_steps``; returns the last train and val rows."""
    cfg, tcfg, device = run.cfg, run.cfg.train, run.device
    if run.main and fresh:
        truncate_after(
            run.output_dir, 0
        )  # a fresh run (e.g. after a failed start) starts a new log
    log = MetricsLog(run.output_dir, cfg.log.tensorboard) if run.main else None
    bar = tqdm(
        total=run.max_steps,
        initial=state.step,
        disable=not (run.main and cfg.log.progress_bar),
        dynamic_ncols=True,
        desc="pretrain",
    )
    params = [p for group in run.optimizer.param_groups for p in group["params"]]
    steps_per_epoch = run.sampler.steps_per_epoch
    last_train: dict[str, Any] = {}
    last_val: dict[str, Any] = {}
    last_saved_step = -1
    stop = False
    minutes = cfg.checkpoint.every_minutes
    saved_at = time.monotonic()
    window_time, window_samples = time.perf_counter(), 0
    run.wrapped.train()
    try:
        while state.epoch < tcfg.epochs and state.step < run.max_steps:
            run.sampler.set_epoch(state.epoch, state.epoch_step)
            for batch in run.train_loader:
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
                    run.optimizer,
                    run.precision,
                    params,
                    tcfg.grad_clip,
                    logit_scale=run.model.logit_scale,
                )
                state.step += 1
                state.epoch_step += 1
                window_samples += tcfg.batch_size
                values = {k: float(v) for k, v in terms.items()}
                if run.main:
                    now = time.perf_counter()
                    rate = window_samples / max(now - window_time, 1e-9)
                    bar.update(1)
                    bar.set_postfix(
                        {k: f"{v:.4f}" for k, v in values.items()}
                        | {"lr": f"{lr:.2e}", "samples/s": f"{rate:.1f}"}
                    )
                    if state.step % cfg.log.every_steps == 0 or state.step == run.max_steps:
                        last_train = {
                            "kind": "train",
                            "step": state.step,
                            "epoch": state.epoch,
                            **values,
                            "lr": lr,
                            "grad_norm": float(grad_norm),
                            "logit_scale": float(run.model.logit_scale.detach()),
                            "samples_per_s": rate,
                        }
                        log.write(last_train)  # type: ignore[union-attr]
                        window_time, window_samples = now, 0
                # The last step of an epoch is saved after validation, below.
                due = state.step % cfg.checkpoint.every_steps == 0
                overdue = minutes is not None and time.monotonic() - saved_at >= 60 * minutes
                stop, overdue = _agree(run, overdue)
                if (due or overdue or stop) and state.epoch_step < steps_per_epoch:
                    save(run, state)
                    last_saved_step, saved_at = state.step, time.monotonic()
                    if stop:
                        raise RunInterrupted(_signal_name(run), state.step, run.last_checkpoint)
                if stop or state.step >= run.max_steps:
                    break  # at an epoch's end a stop is saved below, after its validation
            if state.epoch_step >= steps_per_epoch:  # the epoch is complete
                every = cfg.eval.every_epochs
                if run.val_loader is not None and every > 0 and (state.epoch + 1) % every == 0:
                    last_val = _validate(run, state)
                    log.write(last_val)  # type: ignore[union-attr]
                    bar.write(_format_val(last_val))
                barrier()
                state.epoch, state.epoch_step = state.epoch + 1, 0
                save(run, state)
                last_saved_step, saved_at = state.step, time.monotonic()
                if stop and state.step < run.max_steps:
                    raise RunInterrupted(_signal_name(run), state.step, run.last_checkpoint)
        if state.epoch == 0 and run.val_loader is not None and cfg.eval.every_epochs > 0:
            # --max-steps ended the run inside its first epoch: validate once, at the end.
            last_val = _validate(run, state)
            log.write(last_val)  # type: ignore[union-attr]
            bar.write(_format_val(last_val))
            run.validated_at_end = True
        if last_saved_step != state.step:
            save(run, state)
    finally:
        bar.close()
        if log is not None:
            log.close()
    return last_train, last_val


def _signal_name(run: Run) -> str:
    received = run.stop.received if run.stop is not None else None
    return received or "a signal to another process of the run"


def _agree(run: Run, overdue: bool) -> tuple[bool, bool]:
    """(stop requested, checkpoint overdue) as every rank sees it: a signal may reach one rank
    only and clocks differ, but all must checkpoint and stop at the same step."""
    stop = run.stop is not None and run.stop.requested
    if not run.info.enabled:
        return stop, overdue
    flags = torch.tensor([float(stop), float(overdue)], device=run.device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags[0]), bool(flags[1])


def _validate(run: Run, state: TrainState) -> dict[str, Any]:
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
    return {"kind": "val", "split": "val", "step": state.step, "epoch": state.epoch} | metrics


# ---- 4. summarize -----------------------------------------------------------------------------


def _gather_skipped(paths: set[str]) -> list[str]:
    """Every rank's replaced (unreadable) image paths, once each."""
    if not is_distributed():
        return sorted(paths)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sorted(paths))
    return sorted({p for rank_paths in everyone for p in rank_paths})


def summarize(
    run: Run,
    state: TrainState,
    start: tuple[float, int],
    last_train: Mapping[str, Any],
    last_val: Mapping[str, Any],
) -> dict[str, Any]:
    """The run summary; rank 0 writes ``summary.json`` and prints it."""
    elapsed = time.perf_counter() - start[0]
    steps_this_run = state.step - start[1]
    skipped_all = _gather_skipped(run.skipped)
    summary = {
        "steps": state.step,
        "epochs_completed": state.epoch,
        "steps_this_run": steps_this_run,
        "seconds": elapsed,
        "samples_per_s": steps_this_run * run.cfg.train.batch_size / max(elapsed, 1e-9),
        "world_size": run.info.world_size,
        "device": str(run.device),
        "train": dict(last_train),
        "val": dict(last_val),
        "samples": {
            "train": len(run.train_set),  # type: ignore[arg-type]
            "val": len(run.val_set) if run.val_set is not None else 0,  # type: ignore[arg-type]
        },
        "sources": run.sources,
        "skipped_images": len(skipped_all),
        "skipped_image_paths": skipped_all,
        "checkpoint": str(run.last_checkpoint) if run.last_checkpoint else None,
    }
    if run.validated_at_end:
        summary["validation"] = (
            "once, at the end: the run stopped (--max-steps) before its first epoch ended"
        )
    if run.main:
        text = json.dumps(summary, indent=2)
        atomic_write(run.output_dir / SUMMARY_FILE, lambda tmp: tmp.write_text(text, "utf-8"))
        print(format_summary(summary))
    return summary


def _format_val(row: Mapping[str, Any]) -> str:
    parts = [f"val epoch {row['epoch']} step {row['step']}: loss {row.get('loss', math.nan):.4f}"]
    for name, m in row.get("levels", {}).items():
        shown = " ".join(f"{k} {v:.3f}" for k, v in m.items() if "@" in k)
        parts.append(f"  [{name}] {shown} ({m.get('texts', 0)} texts)")
    return "\n".join(parts)


def format_summary(summary: Mapping[str, Any]) -> str:
    """The end-of-run report printed by ``mgll pretrain``."""
    lines = [
        f"done: {summary['steps']} steps ({summary['steps_this_run']} in this run, "
        f"{summary['epochs_completed']} epochs completed) in {summary['seconds']:.1f} s, "
        f"{summary['samples_per_s']:.1f} samples/s on {summary['world_size']} x "
        f"{summary['device']}",
    ]
    if summary["train"]:
        terms = {
            k: v
            for k, v in summary["train"].items()
            if k not in ("kind", "step", "epoch", "samples_per_s")
        }
        lines.append("last train step: " + ", ".join(f"{k} {v:.4g}" for k, v in terms.items()))
    if summary["val"]:  # its full block was printed when it ran
        val = summary["val"]
        loss = val.get("loss", math.nan)
        lines.append(f"last validation: epoch {val['epoch']} step {val['step']}, loss {loss:.4f}")
    if "validation" in summary:
        lines.append(f"validation: {summary['validation']}")
    lines.append(
        f"samples: {summary['samples']['train']} train, {summary['samples']['val']} val; "
        f"skipped (unreadable) images: {summary['skipped_images']}"
    )
    lines.extend(f"  {p}" for p in summary["skipped_image_paths"][:10])
    for name, counts in summary.get("sources", {}).items():
        shown = ", ".join(f"{n} {split}" for split, n in counts.items())
        lines.append(f"source {name}: {shown}")
    lines.append(f"checkpoint: {summary['checkpoint']}")
    return "\n".join(lines)
