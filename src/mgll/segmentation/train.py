"""Train a segmentation decoder on an encoder, evaluate it with MONAI, write the results folder.

Loss: MONAI ``DiceCELoss`` with a sigmoid per class (Dice + binary cross-entropy). Classes are
independent channels because real masks overlap (ground-glass opacity lies inside the lungs);
a binary task is one channel. Metrics: MONAI ``DiceMetric`` and ``MeanIoU`` per test image and
class at probability 0.5; an image whose ground truth lacks a class does not count for that
class (``ignore_empty``: Dice is undefined there, and averaging in 1.0 for "both empty" would
reward predicting nothing). The per-class value is the mean over the images that have the
class; ``mean`` is the mean over classes. 95% CIs resample *patients* with replacement
(:func:`mgll.metrics.bootstrap_indices`), so images of one patient never narrow an interval.

Training runs on the epoch engine (:mod:`mgll.training.epochs`): :func:`supervised_task` is
the model, loss, optimizer and validation it trains, :func:`epoch_settings` its schedule and
precision. The weights evaluated on test are those of the epoch with the best validation mean
Dice (``OUT/best.safetensors``).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mgll.io import atomic_write
from mgll.metrics import bootstrap_indices, patient_groups
from mgll.segmentation.config import SegmentationConfig
from mgll.segmentation.data import SegDataset, SegSample
from mgll.training.epochs import EpochSettings, SupervisedTask
from mgll.training.step import Precision

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


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    dataset: Dataset,
    batch_size: int,
    device: str | torch.device,
    num_workers: int = 0,
    precision: Precision | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float logits and targets of every sample, in order (under ``precision``'s autocast)."""
    model.eval()
    autocast = precision.autocast if precision is not None else contextlib.nullcontext
    logits, targets = [], []
    for images, target in DataLoader(dataset, batch_size, num_workers=num_workers):
        with autocast():
            logits.append(model(images.to(device)).float().cpu())
        targets.append(target)
    return torch.cat(logits), torch.cat(targets)


def supervised_task(
    model: torch.nn.Module,
    datasets: Mapping[str, Dataset],
    config: SegmentationConfig,
    run_config: dict[str, Any],
    log: Callable[[str], Any] = print,
) -> SupervisedTask:
    """What the epoch engine trains: ``model`` on ``datasets["train"]`` with DiceCELoss,
    AdamW over the model's groups (the tower's ``lr_scale`` is ``encoder_lr / lr``), each
    epoch ranked by validation mean Dice on ``datasets["val"]`` (the later epoch on ties; no
    validation images: no validation, the last epoch is kept). ``run_config`` is saved in
    each checkpoint."""
    from monai.losses import DiceCELoss

    loss_fn = DiceCELoss(sigmoid=True)
    optimizer = torch.optim.AdamW(
        model.param_groups(config.lr, config.encoder_lr), weight_decay=config.weight_decay
    )

    def loss(net: torch.nn.Module, batch: Any) -> torch.Tensor:
        images, target = batch
        return loss_fn(net(images).float(), target)

    val = datasets.get("val", ())

    def validate(net: torch.nn.Module, precision: Precision) -> dict[str, Any]:
        device = next(net.parameters()).device
        logits, targets = predict(
            net, val, config.batch_size, device, config.num_workers, precision
        )
        means = _class_means(per_image_scores(logits, targets)[0])
        row = {
            "val_loss": float(loss_fn(logits, targets)),
            "val_dice": float(np.nanmean(means)) if np.isfinite(means).any() else 0.0,
        }
        log(f"validation: loss {row['val_loss']:.4f}, mean Dice {row['val_dice']:.4f}")
        return row

    return SupervisedTask(
        model=model,
        train_set=datasets["train"],
        loss=loss,
        validate=validate if len(val) else None,
        rank=(lambda row: (row["val_dice"], row["epoch"])) if len(val) else None,
        optimizer=optimizer,
        config=run_config,
    )


def epoch_settings(config: SegmentationConfig, progress: bool = True) -> EpochSettings:
    """The engine's settings of a segmentation run (checkpoints stamped ``segment``)."""
    # epochs, batch_size, lr, warmup_epochs, precision, seed, num_workers
    return EpochSettings.from_config(config, kind="segment", progress=progress)


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
