"""Train a segmentation decoder on an encoder, evaluate it with MONAI, write the results folder.

Loss: MONAI ``DiceCELoss`` with a sigmoid per class (Dice + binary cross-entropy). Classes are
independent channels because real masks overlap (ground-glass opacity lies inside the lungs);
a binary task is one channel. Metrics: MONAI ``DiceMetric`` and ``MeanIoU`` per test image and
class at probability 0.5; an image whose ground truth lacks a class does not count for that
class (``ignore_empty``: Dice is undefined there, and averaging in 1.0 for "both empty" would
reward predicting nothing). The per-class value is the mean over the images that have the
class; ``mean`` is the mean over classes. 95% CIs resample *patients* with replacement
(:func:`mgll.metrics.bootstrap_indices`), so images of one patient never narrow an interval.

The weights evaluated on test are those of the epoch with the best validation mean Dice.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mgll.eval.options import resolve_device
from mgll.io import atomic_write
from mgll.segmentation.config import SegmentationConfig
from mgll.segmentation.data import SegDataset, SegSample

PALETTE = np.array(
    [
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
    ],
    dtype=np.float32,
)


@dataclass
class FitResult:
    """What :func:`fit` returns: the per-epoch history, the epoch kept and its weights."""

    history: list[dict[str, float]]
    best_epoch: int
    best_state: dict[str, torch.Tensor] | None


def per_image_scores(logits: torch.Tensor, target: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) Dice and IoU per image and class (NaN where the ground truth lacks the class)."""
    from monai.metrics import DiceMetric, MeanIoU

    prediction = (torch.sigmoid(logits) > 0.5).float()
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=True)
    iou = MeanIoU(include_background=True, reduction="none", ignore_empty=True)
    return dice(prediction, target).cpu().numpy(), iou(prediction, target).cpu().numpy()


def _class_means(scores: np.ndarray) -> np.ndarray:
    """Per-class mean over images with the class (NaN where none has it)."""
    present = ~np.isnan(scores)
    sums = np.where(present, scores, 0.0).sum(axis=0)
    counts = present.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def summarize_scores(
    scores: np.ndarray, patients: list[str], classes: list[str], n_resamples: int, seed: int
) -> dict[str, Any]:
    """Per-class and mean values of an (N, C) score matrix with patient-bootstrap 95% CIs."""
    from mgll.metrics import bootstrap_indices, patient_groups

    point = _class_means(scores)
    boot = np.array(
        [
            np.append(means, np.nanmean(means) if np.isfinite(means).any() else np.nan)
            for means in (
                _class_means(scores[rows])
                for rows in bootstrap_indices(patient_groups(patients), n_resamples, seed)
            )
        ]
    ).reshape(n_resamples, len(classes) + 1)
    out: dict[str, Any] = {}
    names = [*classes, "mean"]
    values = [*point, np.nanmean(point) if np.isfinite(point).any() else np.nan]
    for k, (name, value) in enumerate(zip(names, values, strict=True)):
        finite = boot[:, k][np.isfinite(boot[:, k])]
        ci = [float(v) for v in np.percentile(finite, [2.5, 97.5])] if finite.size else None
        n_images = int((~np.isnan(scores)).sum(axis=0)[k]) if k < len(classes) else len(scores)
        out[name] = {
            "value": None if not math.isfinite(value) else float(value),
            "ci95": ci,
            "n_images": n_images,
        }
    return out


def _loader(
    dataset: Dataset, batch_size: int, shuffle: bool, seed: int, num_workers: int = 0
) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size, shuffle=shuffle, generator=generator, num_workers=num_workers
    )


@torch.no_grad()
def predict(
    model: torch.nn.Module, dataset: Dataset, batch_size: int, device: str, num_workers: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets of every sample, in order."""
    model.eval()
    logits, targets = [], []
    for images, target in _loader(dataset, batch_size, False, 0, num_workers):
        logits.append(model(images.to(device)).cpu())
        targets.append(target)
    return torch.cat(logits), torch.cat(targets)


def fit(
    model: torch.nn.Module,
    datasets: Mapping[str, Dataset],
    config: SegmentationConfig,
    log: Callable[[str], Any] = print,
) -> FitResult:
    """Train on ``datasets["train"]`` with DiceCELoss, validating on ``datasets["val"]`` (absent or
    empty: the last epoch is kept); the weights of the best validation mean Dice are
    loaded back into ``model`` and returned with the history.
    """
    from monai.losses import DiceCELoss

    train, val = datasets["train"], datasets.get("val", ())
    device, workers = resolve_device(config.device), config.num_workers
    loss_fn = DiceCELoss(sigmoid=True)
    optimizer = torch.optim.AdamW(
        model.param_groups(config.lr, config.encoder_lr), weight_decay=config.weight_decay
    )
    steps = max(1, config.epochs * math.ceil(len(train) / config.batch_size))
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=[g["lr"] for g in optimizer.param_groups],
        total_steps=steps,
        pct_start=0.1,
    )
    history: list[dict[str, float]] = []
    best, best_epoch, best_state = -1.0, 0, None
    for epoch in range(config.epochs):
        model.train()
        started, total, count = time.perf_counter(), 0.0, 0
        for images, target in _loader(train, config.batch_size, True, config.seed + epoch, workers):
            images, target = images.to(device), target.to(device)
            loss = loss_fn(model(images), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(images)
            count += len(images)
        row = {"epoch": epoch + 1, "train_loss": total / max(count, 1)}
        if len(val):
            logits, targets = predict(model, val, config.batch_size, device, workers)
            row["val_loss"] = float(loss_fn(logits, targets))
            dice, _ = per_image_scores(logits, targets)
            means = _class_means(dice)
            row["val_dice"] = float(np.nanmean(means)) if np.isfinite(means).any() else 0.0
        else:
            row["val_dice"] = -row["train_loss"]  # no validation images: keep the last epoch
        row["seconds"] = round(time.perf_counter() - started, 2)
        history.append(row)
        log(
            f"epoch {epoch + 1}/{config.epochs}: train loss {row['train_loss']:.4f}"
            + (f", val Dice {row['val_dice']:.4f}" if len(val) else "")
        )
        if row["val_dice"] >= best:
            best, best_epoch = row["val_dice"], epoch + 1
            best_state = copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    return FitResult(history, best_epoch, best_state)


def _stem(sample: SegSample, index: int) -> str:
    return f"{index:03d}_{sample.image.stem}"[:80]


def write_predictions(
    folder: Path, dataset: SegDataset, logits: torch.Tensor, classes: list[str]
) -> None:
    """Per test image: one 0/255 PNG mask per class and an overlay (prediction filled, ground
    truth outlined, one colour per class)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    predicted = (torch.sigmoid(logits) > 0.5).numpy()
    for i, sample in enumerate(dataset.samples):
        stem = _stem(sample, i)
        image = dataset.image_uint8(i).astype(np.float32)
        overlay = image.copy()
        for k, name in enumerate(classes):
            mask = predicted[i, k]
            png = folder / f"{stem}_{name}.png"
            atomic_write(
                png, lambda p, m=mask: Image.fromarray((m * 255).astype(np.uint8)).save(p, "PNG")
            )
            colour = PALETTE[k % len(PALETTE)]
            overlay[mask] = 0.55 * overlay[mask] + 0.45 * colour
            truth = dataset.targets[i][k].astype(bool)
            edge = truth & ~_eroded(truth)
            overlay[edge] = colour
        out = folder / f"{stem}_overlay.png"
        atomic_write(
            out,
            lambda p, o=overlay: Image.fromarray(o.clip(0, 255).astype(np.uint8)).save(p, "PNG"),
        )


def _eroded(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    return (
        padded[1:-1, 1:-1]
        & padded[:-2, 1:-1]
        & padded[2:, 1:-1]
        & padded[1:-1, :-2]
        & padded[1:-1, 2:]
    )


def plot_curve(path: Path, history: list[dict[str, float]], best_epoch: int) -> None:
    """Training loss and validation Dice per epoch (matplotlib, PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, left = plt.subplots(figsize=(6, 3.5))
    left.plot(epochs, [row["train_loss"] for row in history], label="train loss", color="C0")
    if "val_loss" in history[0]:
        left.plot(
            epochs, [row["val_loss"] for row in history], label="val loss", color="C0", ls="--"
        )
    left.set_xlabel("epoch")
    left.set_ylabel("Dice + CE loss")
    if "val_loss" in history[0]:
        right = left.twinx()
        right.plot(epochs, [row["val_dice"] for row in history], color="C1", label="val Dice")
        right.axvline(best_epoch, color="grey", ls=":", lw=1)
        right.set_ylabel("val mean Dice")
        right.legend(loc="lower right")
    left.legend(loc="upper right")
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)


def write_results(path: Path, results: dict[str, Any]) -> None:
    """results.json, written atomically."""
    atomic_write(path, lambda p: p.write_text(json.dumps(results, indent=2) + "\n"))
