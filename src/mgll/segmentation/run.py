"""``segment``: the whole segmentation protocol as a library function, in named steps.

:func:`segment` reads a mask source, prepares image/mask pairs for the encoder's input, splits
them by patient, trains a decoder on the image tower (:func:`mgll.segmentation.train.fit`),
scores the best-validation weights on test and writes the results folder:

- ``results.json``: encoder, data counts, config, best epoch, Dice/IoU per class with
  patient-bootstrap 95% CIs, per-image Dice, per-epoch history;
- ``predictions/``: per test image a PNG mask per class and an overlay;
- ``training_curve.png``.

``mgll segment`` (:mod:`mgll.segmentation.cli`) only turns flags into its arguments.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mgll.data.cache import PreprocessCache, default_cache_dir
from mgll.data.images import ImageLoadError
from mgll.eval.encoders import Encoder, load_encoder
from mgll.eval.options import resolve_device
from mgll.segmentation import train as T
from mgll.segmentation.config import SegmentationConfig
from mgll.segmentation.data import (
    MaskCache,
    MaskProblem,
    SegDataError,
    SegDataset,
    SegSample,
    SegSource,
    report_problems,
    seg_split,
)
from mgll.segmentation.decoders import SegmentationModel
from mgll.segmentation.sources import load_source

Log = Callable[[str], Any]
PROBLEM_KINDS = tuple(MaskProblem.MESSAGES)


@dataclass
class PreparedMasks:
    """The usable image/mask pairs of a source, at the encoder's input size."""

    source: SegSource
    samples: list[SegSample]
    targets: list[np.ndarray]
    image_cache: PreprocessCache
    problems: list[MaskProblem]
    unreadable_images: int


@dataclass
class Scores:
    """Test logits, per-image Dice/IoU and their per-class summaries with CIs."""

    logits: torch.Tensor
    dice: np.ndarray
    metrics: dict[str, Any]


def segment(
    encoder: Encoder | str,
    source: SegSource | str | Path,
    output_dir: str | Path,
    cfg: SegmentationConfig | None = None,
    log: Log = print,
) -> dict[str, Any]:
    """Train and score a decoder on ``encoder``'s tower; returns what results.json holds.

    ``encoder`` is an :class:`~mgll.eval.encoders.Encoder` or a spec of
    :func:`~mgll.eval.encoders.load_encoder`; ``source`` a loaded :class:`SegSource` or a path
    whose format is detected (:mod:`mgll.segmentation.sources`). ``output_dir`` must be absent
    or empty; nothing is written there before the scores exist. A given ``Encoder``'s tower is
    trained in place (unless ``cfg.freeze_encoder``): load a fresh one for each run.
    """
    cfg = cfg or SegmentationConfig()
    cfg = dataclasses.replace(cfg, device=resolve_device(cfg.device))
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise SegDataError(f"--output-dir: {output_dir} exists and is not empty")
    if not isinstance(source, SegSource):
        source = load_source(source)
    if not isinstance(encoder, Encoder):
        encoder = load_encoder(encoder, cfg.device)
    data = prepare_masks(source, encoder, cfg, log)
    datasets, split = split_datasets(data, encoder, cfg)
    log(
        f"{len(data.samples)} images ({len({s.patient_id for s in data.samples})} patients): "
        + ", ".join(f"{len(datasets[name])} {name}" for name in ("train", "val", "test"))
        + f"; classes {source.classes}; encoder {encoder.name} ({encoder.arch}, "
        f"{encoder.image_size} px)"
    )
    model = build_model(encoder, len(source.classes), cfg)
    fitted = T.fit(model, datasets, cfg, log)
    scores = score(model, datasets["test"], source.classes, cfg)
    results = results_dict(encoder, data, split, datasets["test"], cfg, fitted, scores)
    write_outputs(output_dir, results, datasets["test"], scores, fitted)
    return results


def prepare_masks(
    source: SegSource, encoder: Encoder, cfg: SegmentationConfig, log: Log = print
) -> PreparedMasks:
    """Masks resized (and cached) at the encoder's size; samples with unusable masks or images
    are dropped with one warning per kind of problem."""
    cache_root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(source.folder)
    if cache_root is None:
        cache_root = Path(tempfile.mkdtemp(prefix="mgll-seg-cache-"))
    image_cache = PreprocessCache(cache_root, encoder.image_size, cfg.resize)
    mask_cache = MaskCache(cache_root, encoder.image_size, cfg.resize)
    problems: list[MaskProblem] = []
    unreadable: list[str] = []
    samples, targets = [], []
    for sample in source.samples:
        try:
            target = mask_cache.target(sample, problems)
            if target is not None:
                image_cache.load(sample.image)
        except ImageLoadError as err:
            unreadable.append(str(err))
            continue
        if target is not None:
            samples.append(sample)
            targets.append(target)
    for line in report_problems(problems):
        log(f"warning: {line}")
    if unreadable:
        log(f"warning: {len(unreadable)} image(s) cannot be read (dropped): {unreadable[:5]}")
    if not samples:
        raise SegDataError(f"no usable image/mask pair in {source.folder}")
    return PreparedMasks(source, samples, targets, image_cache, problems, len(unreadable))


def split_datasets(
    data: PreparedMasks, encoder: Encoder, cfg: SegmentationConfig
) -> tuple[dict[str, SegDataset], dict[str, list[int]]]:
    """Train (augmented), val and test datasets of a patient-level split, and the split."""
    split = seg_split(data.samples, cfg.split.fractions(), cfg.split_seed)

    def dataset(name: str) -> SegDataset:
        idx = split[name]
        return SegDataset(
            [data.samples[i] for i in idx],
            [data.targets[i] for i in idx],
            data.image_cache,
            encoder.image_mean,
            encoder.image_std,
            augment=name == "train",
        )

    datasets = {name: dataset(name) for name in ("train", "val", "test")}
    if not len(datasets["train"]) or not len(datasets["test"]):
        fractions = ",".join(f"{v:g}" for v in cfg.split.fractions().values())
        raise SegDataError(
            f"--split-fractions {fractions}: {len(datasets['train'])} train and "
            f"{len(datasets['test'])} test images; both need at least one patient"
        )
    return datasets, split


def build_model(encoder: Encoder, n_classes: int, cfg: SegmentationConfig) -> SegmentationModel:
    """The decoder on the encoder's tower, initialised from ``cfg.seed``, on ``cfg.device``."""
    torch.manual_seed(cfg.seed)
    model = SegmentationModel(
        encoder.tower, n_classes, encoder.image_size, cfg.feature_size, cfg.freeze_encoder
    )
    return model.to(resolve_device(cfg.device))


def score(
    model: torch.nn.Module, test: SegDataset, classes: list[str], cfg: SegmentationConfig
) -> Scores:
    """Dice and IoU of every test image and class, summarised with patient-bootstrap CIs."""
    device = resolve_device(cfg.device)
    logits, truth = T.predict(model, test, cfg.batch_size, device, cfg.num_workers)
    dice, iou = T.per_image_scores(logits, truth)
    patients = [s.patient_id for s in test.samples]
    metrics = {
        name: T.summarize_scores(values, patients, classes, cfg.bootstrap, cfg.seed)
        for name, values in (("dice", dice), ("iou", iou))
    }
    return Scores(logits, dice, metrics)


def results_dict(
    encoder: Encoder,
    data: PreparedMasks,
    split: dict[str, list[int]],
    test: SegDataset,
    cfg: SegmentationConfig,
    fitted: T.FitResult,
    scores: Scores,
) -> dict[str, Any]:
    """What results.json holds (plain JSON)."""
    source = data.source
    return {
        "task": "segmentation",
        "encoder": encoder.describe(),
        "data": {
            "source": source.format or "custom",
            "folder": str(source.folder),
            "classes": source.classes,
            "images": len(data.samples),
            "patients": len({s.patient_id for s in data.samples}),
            "split": {name: len(idx) for name, idx in split.items()},
            "test_patients": len({s.patient_id for s in test.samples}),
            "mask_problems": {
                kind: sum(p.kind == kind for p in data.problems) for kind in PROBLEM_KINDS
            },
            "unreadable_images": data.unreadable_images,
        },
        "config": cfg.to_dict(),
        "best_epoch": fitted.best_epoch,
        "metrics": scores.metrics,
        "per_image": [
            {
                "image": str(s.image),
                "patient_id": s.patient_id,
                "dice": [None if np.isnan(v) else float(v) for v in scores.dice[i]],
            }
            for i, s in enumerate(test.samples)
        ],
        "history": fitted.history,
    }


def write_outputs(
    output_dir: Path,
    results: dict[str, Any],
    test: SegDataset,
    scores: Scores,
    fitted: T.FitResult,
) -> None:
    """Predictions, the training curve and results.json (last: its presence means done)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    classes = results["data"]["classes"]
    T.write_predictions(output_dir / "predictions", test, scores.logits, classes)
    T.plot_curve(output_dir / "training_curve.png", fitted.history, fitted.best_epoch)
    T.write_results(output_dir / "results.json", results)
