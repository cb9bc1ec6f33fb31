"""The pretraining loop, readable top to bottom: build, (resume), train, validate, checkpoint.

One process per device; under ``torchrun`` every process runs this same function and the
contrastive loss gathers embeddings across processes by itself. Only rank 0 writes files.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from mgll.distributed import barrier, init_distributed, is_distributed
from mgll.io import atomic_write
from mgll.training import checkpoint as ckpt
from mgll.training.config import ConfigError, resolve_package_paths, save_config
from mgll.training.evaluate import validate
from mgll.training.optim import build_optimizer, lr_at, set_lr
from mgll.training.run_log import MetricsLog, flatten, truncate_after
from mgll.training.sampling import GlobalBatchSampler, SeededSamples, sample_seed
from mgll.training.step import (
    Precision,
    build_loss,
    forward_backward,
    optimizer_step,
    select_levels,
)

ModelFactory = Callable[[dict[str, Any]], nn.Module]
DatasetBuilder = Callable[..., Mapping[str, Any]]
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"
# Keys that may differ between a run and its resumption without changing what it computes.
_RESUME_FREE_KEYS = ("train.max_steps", "train.device", "log.", "checkpoint.", "data.num_workers")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def enable_determinism() -> None:
    """Deterministic kernels everywhere (errors if an op has no deterministic version)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def _default_components() -> tuple[ModelFactory, DatasetBuilder, Callable]:
    from mgll.data import build_datasets, collate_samples
    from mgll.models import create_model

    return create_model, build_datasets, collate_samples


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ and that change what a resumed run computes."""
    a, b = flatten(old), flatten(new)
    keys = sorted(set(a) | set(b))
    return [
        k
        for k in keys
        if a.get(k) != b.get(k) and not any(k.startswith(free) for free in _RESUME_FREE_KEYS)
    ]


def _find_parameter(model: nn.Module, name: str) -> nn.Parameter | None:
    for pname, param in model.named_parameters():
        if pname.split(".")[-1] == name:
            return param
    return None


def _build_facts(model: nn.Module) -> dict[str, Any]:
    """What rebuilding the model without its pretrained weights needs to know.

    open_clip picks QuickGELU from the pretrained tag; ``mgll export`` rebuilds the model with
    ``pretrained: null`` (the checkpoint has the weights) and must pin the same activation.
    """
    open_clip_cfg = getattr(getattr(model, "image_tower", None), "open_clip_cfg", None) or {}
    return {"image.quick_gelu": open_clip_cfg.get("quick_gelu")}


def _gather_skipped(paths: set[str]) -> list[str]:
    """Every rank's replaced (unreadable) image paths, once each."""
    if not is_distributed():
        return sorted(paths)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sorted(paths))
    return sorted({p for rank_paths in everyone for p in rank_paths})


def train(
    cfg: dict[str, Any],
    data_root: str | Path,
    output_dir: str | Path,
    resume: str | None = None,
    model_factory: ModelFactory | None = None,
    dataset_builder: DatasetBuilder | None = None,
    collate_fn: Callable | None = None,
) -> dict[str, Any]:
    """Pretrain the model of ``cfg`` on the data of ``cfg`` and return the run summary.

    ``model_factory``/``dataset_builder``/``collate_fn`` default to ``mgll.models.create_model``,
    ``mgll.data.build_datasets`` and ``mgll.data.collate_samples``. Process-wide switches that
    the run sets (deterministic algorithms, cuDNN/TF32 flags) are restored when it returns.
    """
    switches = (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    try:
        return _run(cfg, data_root, output_dir, resume, model_factory, dataset_builder, collate_fn)
    finally:
        torch.use_deterministic_algorithms(switches[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = switches[1:3]
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = switches[3:]


def _run(
    cfg: dict[str, Any],
    data_root: str | Path,
    output_dir: str | Path,
    resume: str | None,
    model_factory: ModelFactory | None,
    dataset_builder: DatasetBuilder | None,
    collate_fn: Callable | None,
) -> dict[str, Any]:
    if model_factory is None or dataset_builder is None or collate_fn is None:
        defaults = _default_components()
        model_factory = model_factory or defaults[0]
        dataset_builder = dataset_builder or defaults[1]
        collate_fn = collate_fn or defaults[2]
    output_dir = Path(output_dir)
    tcfg, loss_cfg = cfg["train"], cfg["loss"]
    info, device = init_distributed(tcfg["device"])
    main = info.is_main
    seed = int(tcfg["seed"])
    if tcfg["deterministic"]:
        enable_determinism()
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    seed_everything(seed)
    ckpt_dir = output_dir / ckpt.CHECKPOINT_SUBDIR
    # Fail on a bad --resume before the (slow) model and data are built, and before writing
    # anything: a refused run must leave the folder's existing run untouched.
    resume_from = ckpt.resolve_checkpoint(resume, output_dir) if resume is not None else None
    if resume_from is None and ckpt.list_checkpoints(ckpt_dir):
        raise ckpt.CheckpointError(
            f"{output_dir} already holds a run with checkpoints; continue it with --resume "
            "latest or choose a new --output-dir"
        )
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / CONFIG_FILE)

    # ---- model, loss, data -----------------------------------------------------------------
    try:
        model = model_factory(resolve_package_paths(cfg["model"])).to(device)
    except ValueError as err:  # the factory names the model.* key at fault
        raise ConfigError(f"model section: {err}") from err
    if tcfg["grad_checkpointing"]:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ConfigError(
                f"train.grad_checkpointing is true but {type(model).__name__} has no "
                "set_grad_checkpointing(); set train.grad_checkpointing=false"
            )
        model.set_grad_checkpointing(True)
    if loss_cfg["name"] == "clip" and getattr(model, "text_per_level", False):
        raise ConfigError(
            "loss.name=clip reads the texts of one level (loss.clip_level) but "
            "model.text_per_level=true builds a text tower per level; set "
            "model.text_per_level=false for the CLIP baseline"
        )
    # The bias only feeds the point-wise term: freeze it when that term is off (keeps DDP happy).
    if loss_cfg["name"] == "clip" or loss_cfg["weights"]["pointwise"] == 0:
        bias = _find_parameter(model, "logit_bias")
        if bias is not None:
            bias.requires_grad_(False)
    loss_fn = build_loss(loss_cfg)
    eval_loss_fn = build_loss(loss_cfg, gather=False)

    try:
        datasets = dataset_builder(
            cfg["data"],
            data_root,
            image_size=model.image_size,
            mean=model.image_mean,
            std=model.image_std,
            seed=seed,
        )
    except ValueError as err:  # the builder names the data.* key, file or row at fault
        raise ConfigError(f"data section (data root {data_root}): {err}") from err
    train_set, val_set = datasets["train"], datasets.get("val")
    level_names = [level.name for level in train_set.levels]
    num_workers = int(cfg["data"].get("num_workers", 0))
    global_batch, accum = int(tcfg["batch_size"]), int(tcfg["accum_steps"])
    if global_batch % (info.world_size * accum):
        raise ConfigError(
            f"train.batch_size ({global_batch}) must be divisible by processes x "
            f"train.accum_steps ({info.world_size} x {accum})"
        )
    try:
        sampler = GlobalBatchSampler(
            len(train_set), global_batch, info.rank, info.world_size, seed=seed
        )
    except ValueError as err:
        raise ConfigError(str(err)) from err
    loader_kwargs: dict[str, Any] = {
        "num_workers": num_workers,
        "collate_fn": collate_fn,
        "pin_memory": device.type == "cuda",
        "persistent_workers": num_workers > 0,
        # A private generator: creating an iterator must not draw from the global RNG.
        "generator": torch.Generator().manual_seed(seed),
    }
    train_loader = DataLoader(SeededSamples(train_set), batch_sampler=sampler, **loader_kwargs)
    val_loader = None
    if val_set is not None and len(val_set) > 0 and main:
        # Validation draws the same texts and seeds every epoch: epochs stay comparable.
        val_keys = [(i, 0, sample_seed(seed, 0, i)) for i in range(len(val_set))]
        val_loader = DataLoader(
            SeededSamples(val_set),
            sampler=val_keys,
            batch_size=int(cfg["eval"]["batch_size"]),
            **loader_kwargs,
        )

    steps_per_epoch = sampler.steps_per_epoch
    total_steps = steps_per_epoch * int(tcfg["epochs"])
    max_steps = min(total_steps, int(tcfg["max_steps"] or total_steps))
    warmup_steps = round(float(tcfg["warmup_epochs"]) * steps_per_epoch)

    # ---- optimizer, precision, resume --------------------------------------------------------
    optimizer = build_optimizer(model, tcfg)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    precision = Precision(tcfg["precision"], device)
    step, epoch, epoch_step = 0, 0, 0
    if resume_from is not None:
        weights = resume_from
        state = ckpt.load_state(weights)
        changed = config_differences(state["config"], cfg)
        if changed and main:
            print(
                f"warning: resuming {weights} with a config that differs in: {', '.join(changed)}",
                file=sys.stderr,
            )
        ckpt.load_weights(model, weights)
        try:
            optimizer.load_state_dict(state["optimizer"])
        except ValueError as err:  # parameter groups of another model or optimizer setup
            raise ckpt.CheckpointError(
                f"{ckpt.state_path_for(weights)}: its optimizer state does not fit this model "
                f"({err}); resume with the config the run was started with"
            ) from err
        if state["scaler"]:  # empty when saved without fp16 loss scaling: start a fresh one
            precision.scaler.load_state_dict(state["scaler"])
        step, epoch, epoch_step = state["step"], state["epoch"], state["epoch_step"]
        rng = state["rng"][info.rank] if info.rank < len(state["rng"]) else state["rng"][0]
        ckpt.restore_rng_state(rng)
        if main:
            truncate_after(output_dir, step)  # rows logged after the checkpoint are redone
            print(f"resumed from {weights} at step {step} (epoch {epoch}, step {epoch_step})")

    raw_model = model
    if info.enabled:
        model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if tcfg["compile"]:
        model = torch.compile(model)

    def save(at_epoch: int, at_epoch_step: int) -> Path | None:
        # Every rank's RNG state, so each continues its own stream after resuming.
        rng = ckpt.capture_rng_state()
        if info.enabled:
            everyone: list[Any] = [None] * info.world_size
            dist.all_gather_object(everyone, rng)
            rng_states = everyone
        else:
            rng_states = [rng]
        path = None
        if main:
            state = {
                "step": step,
                "epoch": at_epoch,
                "epoch_step": at_epoch_step,
                "optimizer": optimizer.state_dict(),
                "scaler": precision.scaler.state_dict(),
                "schedule": {"warmup_steps": warmup_steps, "total_steps": total_steps},
                "rng": rng_states,
                "config": cfg,
            }
            keep = int(cfg["checkpoint"]["keep_last"])
            path = ckpt.save_checkpoint(
                ckpt_dir, step, raw_model, state, cfg, keep, _build_facts(raw_model)
            )
        barrier()
        return path

    # ---- train --------------------------------------------------------------------------------
    if main and resume_from is None:
        truncate_after(output_dir, 0)  # a fresh run (e.g. after a failed start) starts a new log
    log = MetricsLog(output_dir, cfg["log"]["tensorboard"]) if main else None
    bar = tqdm(
        total=max_steps,
        initial=step,
        disable=not (main and cfg["log"]["progress_bar"]),
        dynamic_ncols=True,
        desc="pretrain",
    )
    log_every, ckpt_every = int(cfg["log"]["every_steps"]), int(cfg["checkpoint"]["every_steps"])
    scale_param = _find_parameter(raw_model, "logit_scale")
    skipped: set[str] = set()
    last_train: dict[str, Any] = {}
    last_val: dict[str, Any] = {}
    last_saved_step = -1
    start_time = time.perf_counter()
    start_step = step
    window_time, window_samples = time.perf_counter(), 0
    model.train()
    try:
        while epoch < int(tcfg["epochs"]) and step < max_steps:
            sampler.set_epoch(epoch, epoch_step)
            for batch in train_loader:
                images = batch["images"].to(device, non_blocking=True)
                labels = [lab.to(device, non_blocking=True) for lab in batch["labels"]]
                texts, labels = select_levels({"texts": batch["texts"], "labels": labels}, loss_cfg)
                skipped.update(batch.get("skipped", []))
                lr = lr_at(step, tcfg["lr"], tcfg["min_lr"], warmup_steps, total_steps)
                set_lr(optimizer, lr)
                terms = forward_backward(
                    model, loss_fn, images, texts, labels, precision, accum, step + 1
                )
                grad_norm = optimizer_step(
                    optimizer, precision, params, tcfg["grad_clip"], logit_scale=scale_param
                )
                step += 1
                epoch_step += 1
                window_samples += global_batch
                values = {k: float(v) for k, v in terms.items()}
                if main:
                    now = time.perf_counter()
                    rate = window_samples / max(now - window_time, 1e-9)
                    bar.update(1)
                    bar.set_postfix(
                        {k: f"{v:.4f}" for k, v in values.items()}
                        | {"lr": f"{lr:.2e}", "samples/s": f"{rate:.1f}"}
                    )
                    if step % log_every == 0 or step == max_steps:
                        last_train = {
                            "kind": "train",
                            "step": step,
                            "epoch": epoch,
                            **values,
                            "lr": lr,
                            "grad_norm": float(grad_norm),
                            "logit_scale": float(scale_param.detach()),
                            "samples_per_s": rate,
                        }
                        log.write(last_train)
                        window_time, window_samples = now, 0
                # The last step of an epoch is saved after validation, below.
                if step % ckpt_every == 0 and epoch_step < steps_per_epoch:
                    save(epoch, epoch_step)
                    last_saved_step = step
                if step >= max_steps:
                    break
            if epoch_step >= steps_per_epoch:  # the epoch is complete
                every = int(cfg["eval"]["every_epochs"])
                if val_loader is not None and every > 0 and (epoch + 1) % every == 0:
                    last_val = validate(
                        raw_model,
                        eval_loss_fn,
                        val_loader,
                        level_names,
                        loss_cfg,
                        precision,
                        device,
                        cfg["eval"]["recall_at"],
                        cfg["eval"]["precision_at"],
                    )
                    last_val = {"kind": "val", "split": "val", "step": step, "epoch": epoch} | (
                        last_val
                    )
                    log.write(last_val)
                    bar.write(_format_val(last_val))
                barrier()
                epoch, epoch_step = epoch + 1, 0
                save(epoch, epoch_step)
                last_saved_step = step
        if last_saved_step != step:
            save(epoch, epoch_step)
    finally:
        bar.close()
        if log is not None:
            log.close()

    elapsed = time.perf_counter() - start_time
    skipped_all = _gather_skipped(skipped)
    latest = ckpt.list_checkpoints(ckpt_dir)
    summary = {
        "steps": step,
        "epochs_completed": epoch,
        "steps_this_run": step - start_step,
        "seconds": elapsed,
        "samples_per_s": (step - start_step) * global_batch / max(elapsed, 1e-9),
        "world_size": info.world_size,
        "device": str(device),
        "train": last_train,
        "val": last_val,
        "samples": {"train": len(train_set), "val": len(val_set) if val_set is not None else 0},
        "skipped_images": len(skipped_all),
        "skipped_image_paths": skipped_all,
        "checkpoint": str(latest[-1][1]) if latest else None,
    }
    if main:
        text = json.dumps(summary, indent=2)
        atomic_write(output_dir / SUMMARY_FILE, lambda tmp: tmp.write_text(text, "utf-8"))
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
    if summary["val"]:
        lines.append(_format_val(summary["val"]))
    lines.append(
        f"samples: {summary['samples']['train']} train, {summary['samples']['val']} val; "
        f"skipped (unreadable) images: {summary['skipped_images']}"
    )
    lines.extend(f"  {p}" for p in summary["skipped_image_paths"][:10])
    lines.append(f"checkpoint: {summary['checkpoint']}")
    return "\n".join(lines)
