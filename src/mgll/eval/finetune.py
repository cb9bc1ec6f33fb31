"""``mgll finetune``: full fine-tuning of an encoder with a linear head (METHOD.md section 4).

The authors' downstream recipe: 50 epochs, batch 32, AdamW with lr 1.25e-4 and weight decay
1e-3 (not on biases, norms and embeddings: :func:`mgll.training.optim.parameter_groups`),
flips / rotation / colour jitter (:data:`mgll.data.transforms.DEFAULT_AUGMENTATION`), a linear
warm-up over the first epoch then a half-cosine rate (:func:`mgll.training.optim.lr_at`); the
epoch with the best validation macro AUC is kept and the test split is scored once with it.
Optional layer-wise lr decay (``--layer-decay 0.75``) scales block ``i`` of a ViT by
``decay ** (depth + 1 - i)``.

The head reads the same pre-projection features as the linear probe (the unused projection is
frozen). Mixed precision and the update (unscale, clip, step) are the pretraining engine's
(:class:`mgll.training.step.Precision`, :func:`mgll.training.step.optimizer_step`);
checkpoints are written atomically after every epoch with
:func:`mgll.training.checkpoint.save_checkpoint` into ``OUT/checkpoints`` and ``--resume``
continues from the newest. Under ``torchrun`` the model is wrapped in DistributedDataParallel
and each rank trains on its shard of every epoch (``DistributedSampler``); rank 0 validates
and writes.
"""

from __future__ import annotations

import argparse
import math
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mgll.eval.options import DEFAULT_OPTIONS, EvalOptions
from mgll.eval.task import TaskError

DEFAULTS: dict[str, Any] = {
    "epochs": 50,
    "batch_size": 32,
    "lr": 1.25e-4,
    "weight_decay": 1e-3,
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "grad_clip": None,
    "warmup_epochs": 1.0,
    "layer_decay": None,
}


class FineTuneModel(nn.Module):
    """The encoder's tower and a linear head on its pre-projection features."""

    def __init__(self, encoder: Any, n_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.feature_dim, n_classes)
        proj = getattr(encoder.tower, "proj", None)
        if isinstance(proj, nn.Parameter):
            proj.requires_grad_(False)  # not used by the pre-projection features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.encode(images))


def _layer_of(name: str, depth: int) -> int:
    """Layer index for layer-wise lr decay: embeddings 0, ViT block i -> i + 1, rest depth + 1."""
    match = re.search(r"transformer\.resblocks\.(\d+)\.", name)
    if match:
        return int(match.group(1)) + 1
    if any(k in name for k in ("conv1", "class_embedding", "positional_embedding", "ln_pre")):
        return 0
    return depth + 1


def parameter_groups(model: FineTuneModel, weight_decay: float, layer_decay: float | None):
    """AdamW groups: the pretraining engine's decay / no-decay split, each scaled per layer
    (``lr_scale``) when ``layer_decay`` is set."""
    from mgll.training.optim import parameter_groups as decay_groups

    groups = decay_groups(model, weight_decay)
    if not layer_decay:
        for group in groups:
            group["lr_scale"] = 1.0
        return groups
    blocks = getattr(getattr(model.encoder.tower, "transformer", None), "resblocks", [])
    depth = len(blocks)
    names = {id(p): n for n, p in model.named_parameters()}
    scaled = []
    for group in groups:
        by_layer: dict[int, list[nn.Parameter]] = {}
        for p in group["params"]:
            by_layer.setdefault(_layer_of(names[id(p)], depth), []).append(p)
        for layer, params in sorted(by_layer.items()):
            scaled.append(
                {
                    "params": params,
                    "weight_decay": group["weight_decay"],
                    "lr_scale": layer_decay ** (depth + 1 - layer),
                }
            )
    return scaled


class _LabelledImages(torch.utils.data.Dataset):
    """Images of one split with the task's label rows (merged classes already applied)."""

    def __init__(self, images: Any, y: np.ndarray) -> None:
        self.images, self.y = images, torch.from_numpy(y.astype(np.float32))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        item = self.images[index]
        j = item["index"]  # the replacement's label when an image could not be read
        return item["image"], self.y[j], index


def _datasets(encoder: Any, data: Any, augmentation: Any, seed: int) -> dict[str, Any]:
    from mgll.data.cache import PreprocessCache, default_cache_dir
    from mgll.data.dataset import MultiGranularDataset
    from mgll.data.transforms import build_transform

    cache_dir = default_cache_dir(data.folder)
    out = {}
    for split in ("train", "val", "test"):
        rows = data.rows[split]
        images = MultiGranularDataset(
            data.records.subset([int(i) for i in rows]),
            image_size=encoder.image_size,
            transform=build_transform(
                train=split == "train",
                mean=encoder.image_mean,
                std=encoder.image_std,
                augmentation=augmentation,
            ),
            cache=PreprocessCache(cache_dir, encoder.image_size) if cache_dir else None,
            seed=seed,
        )
        out[split] = _LabelledImages(images, data.y[rows])
    return out


def _loss(task_type: str) -> nn.Module:
    return nn.BCEWithLogitsLoss() if task_type == "multilabel" else nn.CrossEntropyLoss()


def _target(y: torch.Tensor, task_type: str) -> torch.Tensor:
    return y if task_type == "multilabel" else y.argmax(1)


def _scores(logits: torch.Tensor, task_type: str) -> torch.Tensor:
    return logits.sigmoid() if task_type == "multilabel" else logits.softmax(1)


@torch.no_grad()
def predict(
    model: nn.Module, dataset: Any, task_type: str, precision: Any, batch_size: int, workers: int
) -> np.ndarray:
    """(N, C) class scores of a split, in dataset order."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    device = next(model.parameters()).device
    model.eval()
    out = []
    for images, _, _ in loader:
        with precision.autocast():
            logits = model(images.to(device, non_blocking=True))
        out.append(_scores(logits.float(), task_type).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0))


def fine_tune(
    encoder: Any,
    data: Any,
    output_dir: str | Path,
    options: EvalOptions = DEFAULT_OPTIONS,
    *,
    epochs: int = DEFAULTS["epochs"],
    batch_size: int = DEFAULTS["batch_size"],
    lr: float = DEFAULTS["lr"],
    weight_decay: float = DEFAULTS["weight_decay"],
    layer_decay: float | None = None,
    augmentation: Any = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Fine-tune ``encoder`` (an :class:`~mgll.eval.encoders.Encoder` or a spec) with a linear
    head on ``data``; writes the output folder (probe layout plus ``checkpoints/`` and
    ``best.safetensors``) and returns results.json's dict (None on ranks other than 0).
    ``batch_size`` is the training batch (the recipe's); ``options.batch_size`` batches the
    scoring of the validation and test images."""
    from safetensors.torch import load_model as load_safetensors
    from safetensors.torch import save_model as save_safetensors

    from mgll.distributed import barrier, init_distributed
    from mgll.eval.encoders import load_encoder
    from mgll.eval.results import write_classification_outputs
    from mgll.io import atomic_write
    from mgll.metrics import classification_metrics
    from mgll.process import seed_everything
    from mgll.training import checkpoint as ckpt
    from mgll.training.optim import lr_at
    from mgll.training.step import Precision, optimizer_step

    seed, precision, num_workers = options.seed, options.precision, options.num_workers
    progress, scoring_batch = options.progress, options.batch_size
    info, dev = init_distributed(options.device)
    if isinstance(encoder, (str, Path)):
        encoder = load_encoder(encoder)
    out = Path(output_dir)
    task = data.task
    if len(data.rows["val"]) == 0:
        raise TaskError("the validation split is empty: fine-tuning picks its epoch on it")
    seed_everything(seed)
    model = FineTuneModel(encoder, len(task.classes)).to(dev)
    datasets = _datasets(encoder, data, augmentation, seed)
    sampler = (
        torch.utils.data.DistributedSampler(datasets["train"], seed=seed, drop_last=False)
        if info.enabled
        else torch.utils.data.RandomSampler(
            datasets["train"], generator=torch.Generator().manual_seed(seed)
        )
    )
    loader = torch.utils.data.DataLoader(
        datasets["train"],
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=False,
        pin_memory=dev.type == "cuda",
    )
    groups = parameter_groups(model, weight_decay, layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=DEFAULTS["betas"], eps=DEFAULTS["eps"])
    amp = Precision(precision, dev)
    train_model: nn.Module = model
    if info.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None
        )
    steps_per_epoch = max(1, len(loader))
    total_steps = epochs * steps_per_epoch
    warmup = int(DEFAULTS["warmup_epochs"] * steps_per_epoch)
    config = {
        "protocol": "finetune",
        "encoder": encoder.name,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "layer_decay": layer_decay,
        "precision": precision,
        "seed": seed,
        "world_size": info.world_size,
    }
    start_epoch, best = 0, {"epoch": -1, "val_auc_macro": -math.inf, "val_accuracy": -math.inf}
    history: list[dict[str, Any]] = []
    checkpoints = out / ckpt.CHECKPOINT_SUBDIR
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        if not ckpt.list_checkpoints(checkpoints):
            raise ckpt.CheckpointError(
                f"--resume: no complete checkpoint in {checkpoints}; drop --resume to start anew"
            )
        weights = ckpt.resolve_checkpoint(checkpoints)
        ckpt.load_weights(model, weights)
        state = ckpt.load_state(weights)
        optimizer.load_state_dict(state["optimizer"])
        amp.scaler.load_state_dict(state["scaler"])
        ckpt.restore_rng_state(state["rng"])
        start_epoch, best, history = state["epoch"], state["best"], state["history"]
    loss_fn = _loss(task.type)
    val_y = data.y[data.rows["val"]].astype(int)
    present = [c for c in range(val_y.shape[1]) if 0 < val_y[:, c].sum() < len(val_y)]
    started = time.perf_counter()
    for epoch in range(start_epoch, epochs):
        if info.enabled:
            sampler.set_epoch(epoch)
        else:  # the order of an epoch depends on (seed, epoch) only, so a resume replays it
            sampler.generator.manual_seed(seed * 100_003 + epoch)
        train_model.train()
        datasets["train"].images.set_epoch(epoch)
        running, seen = 0.0, 0
        batches = loader
        if progress and info.is_main:
            from tqdm.auto import tqdm

            batches = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False, disable=None)
        for i, (images, y, _) in enumerate(batches):
            step = epoch * steps_per_epoch + i
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, lr, 0.0, warmup, total_steps) * group["lr_scale"]
            with amp.autocast():
                logits = train_model(images.to(dev, non_blocking=True))
            loss = loss_fn(logits.float(), _target(y.to(dev), task.type))
            amp.scaler.scale(loss).backward()
            optimizer_step(optimizer, amp, list(model.parameters()), DEFAULTS["grad_clip"])
            running += float(loss.detach()) * len(images)
            seen += len(images)
        row: dict[str, Any] = {"epoch": epoch + 1, "train_loss": running / max(seen, 1)}
        if info.is_main:
            val_scores = predict(model, datasets["val"], task.type, amp, scoring_batch, num_workers)
            m = classification_metrics(
                val_y, val_scores, task.type, classes=task.classes, macro_classes=present
            )
            row["val_auc_macro"] = m["auc_macro"] if present else None
            row["val_accuracy"] = m["accuracy"]
            key = (row["val_auc_macro"] if present else -1.0, m["accuracy"])
            if key > (best["val_auc_macro"], best["val_accuracy"]):
                best = {"epoch": epoch + 1, "val_auc_macro": key[0], "val_accuracy": key[1]}
                atomic_write(
                    out / "best.safetensors", lambda tmp: save_safetensors(model, str(tmp))
                )
            history.append(row)
            state = {
                "step": (epoch + 1) * steps_per_epoch,
                "epoch": epoch + 1,
                "epoch_step": 0,
                "optimizer": optimizer.state_dict(),
                "scaler": amp.scaler.state_dict(),
                "rng": ckpt.capture_rng_state(),
                "config": config,
                "best": best,
                "history": history,
            }
            ckpt.save_checkpoint(
                checkpoints,
                (epoch + 1) * steps_per_epoch,
                model,
                state,
                config,
                keep_last=1,
                kind="finetune",
            )
        barrier()
    if not info.is_main:
        return None
    load_safetensors(model, str(out / "best.safetensors"))
    scores = {
        split: predict(model, datasets[split], task.type, amp, scoring_batch, num_workers)
        for split in ("val", "test")
    }
    details = {
        **config,
        "best_epoch": best["epoch"],
        "criterion": "validation macro AUC" if present else "validation accuracy",
        "history": history,
        "train_seconds": round(time.perf_counter() - started, 3),
        "n_train": len(data.rows["train"]),
        "n_val": len(data.rows["val"]),
    }
    return write_classification_outputs(
        out,
        data,
        data.rows["test"],
        scores["test"],
        val_rows=data.rows["val"],
        val_scores=scores["val"],
        protocol="finetune",
        encoder=encoder.describe(),
        details=details,
        seed=seed,
        n_resamples=options.n_resamples,
        progress=progress,
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``finetune`` sub-command."""
    from mgll.eval.cli import add_run_arguments, add_task_arguments

    parser = subparsers.add_parser(
        "finetune",
        help="full fine-tuning of an encoder with a linear head",
        description="Full fine-tuning (the authors' recipe: 50 epochs, lr 1.25e-4, weight decay "
        "1e-3, flips/rotation/colour jitter, best validation epoch, test once). Runs under "
        "torchrun for several GPUs.",
    )
    parser.add_argument(
        "--encoder",
        required=True,
        help="run folder/checkpoint, exported encoder, open_clip:ARCH:TAG, hf-hub:ORG/REPO or "
        "random:ARCH[:SEED]",
    )
    add_task_arguments(parser)
    add_run_arguments(parser)
    parser.set_defaults(batch_size=DEFAULTS["batch_size"])
    parser.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help="epochs (50)")
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="peak lr (1.25e-4)")
    parser.add_argument(
        "--weight-decay", type=float, default=DEFAULTS["weight_decay"], help="AdamW (1e-3)"
    )
    parser.add_argument(
        "--layer-decay", type=float, help="layer-wise lr decay factor, e.g. 0.75 (default off)"
    )
    parser.add_argument(
        "--no-augmentation", action="store_true", help="train without flips/rotation/jitter"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from OUT/checkpoints (newest)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``mgll finetune``."""
    from mgll.eval.cli import run_offline

    def body() -> int:
        from mgll.eval.cli import eval_options, load_task
        from mgll.eval.encoders import load_encoder
        from mgll.eval.probe import format_metrics

        options = eval_options(args)
        encoder = load_encoder(args.encoder)
        data = load_task(args, encoder.run_config)
        results = fine_tune(
            encoder,
            data,
            args.output_dir,
            options,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            weight_decay=args.weight_decay,
            layer_decay=args.layer_decay,
            augmentation=False if args.no_augmentation else None,
            resume=args.resume,
        )
        if results is not None:
            print(format_metrics(results))
            print(f"wrote {args.output_dir}")
        return 0

    return run_offline(body)
