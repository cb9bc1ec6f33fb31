"""``mgll segment``: train a decoder on an encoder's image tower and report Dice/IoU with CIs.

    mgll segment --encoder ENC --data covid-cxr-seg --data-root ../shared/data --output-dir OUT

ENC is any spec :func:`mgll.eval.encoders.load_encoder` accepts (a run folder or checkpoint, an
exported encoder, ``open_clip:ARCH:TAG``, ``random:ARCH[:SEED]``), so pretrained and baseline
encoders go through the same code. OUT receives ``results.json``, ``training_curve.png`` and
``predictions/`` (per test image a PNG mask per class and an overlay).
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path
from typing import Any

from mgll.segmentation.data import SOURCES, SegDataError

DEFAULTS_HELP = "(default: %(default)s)"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``segment`` sub-command."""
    from mgll.segmentation.train import SegConfig

    d = SegConfig()
    parser = subparsers.add_parser(
        "segment",
        help="train and evaluate a segmentation decoder on an encoder",
        description="Train a UNETR-style decoder (ViT towers) or U-Net/FPN (convolutional "
        "towers) on a pretrained image tower with Dice + cross-entropy (MONAI), and report "
        "Dice and IoU per class with patient-bootstrap 95%% CIs on a patient-level test split.",
    )
    parser.add_argument(
        "--encoder",
        required=True,
        help="run folder/checkpoint, export, open_clip:ARCH:TAG or random:ARCH[:SEED]",
    )
    parser.add_argument("--data", required=True, choices=SOURCES, help="segmentation source")
    parser.add_argument(
        "--data-root",
        default=".",
        help="folder holding covid-cxr-seg (or that folder itself); the mask folder (folder); "
        "the CSV file (table) " + DEFAULTS_HELP,
    )
    parser.add_argument("--output-dir", required=True, help="results folder (created)")
    parser.add_argument(
        "--classes",
        help="comma-separated classes (covid-cxr-seg default: lungs,ground_glass_opacity,"
        "consolidation; others: cardiomediastinum, airways, pleural_effusion, pneumothorax, "
        "tubes_and_lines)",
    )
    parser.add_argument("--epochs", type=int, default=d.epochs, help=DEFAULTS_HELP)
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help=DEFAULTS_HELP)
    parser.add_argument("--lr", type=float, default=d.lr, help="decoder lr " + DEFAULTS_HELP)
    parser.add_argument(
        "--encoder-lr", type=float, default=d.encoder_lr, help="tower lr " + DEFAULTS_HELP
    )
    parser.add_argument("--freeze-encoder", action="store_true", help="train the decoder only")
    parser.add_argument("--feature-size", type=int, default=d.feature_size, help=DEFAULTS_HELP)
    parser.add_argument("--seed", type=int, default=d.seed, help="split and training seed")
    parser.add_argument(
        "--split",
        default="0.6,0.1,0.3",
        help="train,val,test fractions of images, split by patient " + DEFAULTS_HELP,
    )
    parser.add_argument(
        "--resize", choices=("pad", "crop", "stretch"), default=d.resize, help=DEFAULTS_HELP
    )
    parser.add_argument("--bootstrap", type=int, default=d.bootstrap, help="CI resamples")
    parser.add_argument("--cache-dir", help="preprocessing cache (default: the user cache)")
    parser.add_argument("--device", default=d.device, help=DEFAULTS_HELP)
    parser.set_defaults(func=run)


def _fractions(text: str) -> dict[str, float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3 or min(values) < 0 or sum(values) <= 0:
        raise SegDataError(f"--split: {text!r} is not three fractions train,val,test")
    return dict(zip(("train", "val", "test"), values, strict=True))


def _data_path(source: str, root: Path) -> Path:
    if source == "covid-cxr-seg" and (root / "covid-cxr-seg").is_dir():
        return root / "covid-cxr-seg"
    return root


def segment(args: argparse.Namespace, log: Any = print) -> dict[str, Any]:
    """Run the whole command; returns the results written to results.json."""
    import numpy as np
    import torch

    from mgll.data.cache import PreprocessCache, default_cache_dir
    from mgll.data.images import ImageLoadError
    from mgll.eval.encoders import load_encoder
    from mgll.segmentation import train as T
    from mgll.segmentation.data import (
        MaskCache,
        SegDataset,
        load_seg_source,
        report_problems,
        seg_split,
    )
    from mgll.segmentation.decoders import SegmentationModel

    config = T.SegConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        encoder_lr=args.encoder_lr,
        freeze_encoder=args.freeze_encoder,
        feature_size=args.feature_size,
        seed=args.seed,
        resize=args.resize,
        split=_fractions(args.split),
        bootstrap=args.bootstrap,
        device=args.device,
    )
    output_dir = Path(args.output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise SegDataError(f"--output-dir: {output_dir} exists and is not empty")
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    source = load_seg_source(args.data, _data_path(args.data, Path(args.data_root)), classes)
    encoder = load_encoder(args.encoder, config.device)

    cache_root = Path(args.cache_dir) if args.cache_dir else default_cache_dir(source.folder)
    if cache_root is None:
        cache_root = Path(tempfile.mkdtemp(prefix="mgll-seg-cache-"))
    image_cache = PreprocessCache(cache_root, encoder.image_size, config.resize)
    mask_cache = MaskCache(cache_root, encoder.image_size, config.resize)
    problems: list = []
    unreadable_images: list[str] = []
    samples, targets = [], []
    for sample in source.samples:
        try:
            target = mask_cache.target(sample, problems)
            if target is not None:
                image_cache.load(sample.image)
        except ImageLoadError as err:
            unreadable_images.append(str(err))
            continue
        if target is not None:
            samples.append(sample)
            targets.append(target)
    for line in report_problems(problems):
        log(f"warning: {line}")
    if unreadable_images:
        log(
            f"warning: {len(unreadable_images)} image(s) cannot be read (dropped): "
            f"{unreadable_images[:5]}"
        )
    if not samples:
        raise SegDataError(f"no usable image/mask pair in {source.folder}")

    split = seg_split(samples, config.split, config.seed)
    mean, std = encoder.image_mean, encoder.image_std

    def dataset(name: str, augment: bool = False) -> SegDataset:
        idx = split[name]
        return SegDataset(
            [samples[i] for i in idx], [targets[i] for i in idx], image_cache, mean, std, augment
        )

    train_set, val_set, test_set = dataset("train", True), dataset("val"), dataset("test")
    if not len(train_set) or not len(test_set):
        raise SegDataError(
            f"--split {args.split}: {len(train_set)} train and {len(test_set)} test images; "
            "both need at least one patient"
        )
    log(
        f"{len(samples)} images ({len({s.patient_id for s in samples})} patients): "
        f"{len(train_set)} train, {len(val_set)} val, {len(test_set)} test; classes "
        f"{source.classes}; encoder {encoder.name} ({encoder.arch}, {encoder.image_size} px)"
    )
    torch.manual_seed(config.seed)
    model = SegmentationModel(
        encoder.tower,
        len(source.classes),
        encoder.image_size,
        config.feature_size,
        config.freeze_encoder,
    ).to(config.device)
    history, best_epoch = T.fit(model, train_set, val_set, config, log)

    logits, truth = T.predict(model, test_set, config.batch_size, config.device)
    dice, iou = T.per_image_scores(logits, truth)
    patients = [s.patient_id for s in test_set.samples]
    metrics = {
        name: T.summarize_scores(scores, patients, source.classes, config.bootstrap, config.seed)
        for name, scores in (("dice", dice), ("iou", iou))
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    T.write_predictions(output_dir / "predictions", test_set, logits, source.classes)
    T.plot_curve(output_dir / "training_curve.png", history, best_epoch)
    results = {
        "task": "segmentation",
        "encoder": encoder.describe(),
        "data": {
            "source": args.data,
            "folder": str(source.folder),
            "classes": source.classes,
            "images": len(samples),
            "patients": len({s.patient_id for s in samples}),
            "split": {name: len(idx) for name, idx in split.items()},
            "test_patients": len(set(patients)),
            "mask_problems": {
                kind: sum(p.kind == kind for p in problems)
                for kind in ("unreadable", "size", "empty")
            },
            "unreadable_images": len(unreadable_images),
        },
        "config": T.config_dict(config),
        "best_epoch": best_epoch,
        "metrics": metrics,
        "per_image": [
            {
                "image": str(s.image),
                "patient_id": s.patient_id,
                "dice": [None if np.isnan(v) else float(v) for v in dice[i]],
            }
            for i, s in enumerate(test_set.samples)
        ],
        "history": history,
    }
    T.write_results(output_dir / "results.json", results)
    return results


def _format(results: dict[str, Any]) -> str:
    lines = ["| class | Dice [95% CI] | IoU [95% CI] | test images |", "| --- | --- | --- | --- |"]
    for name, dice in results["metrics"]["dice"].items():
        iou = results["metrics"]["iou"][name]

        def cell(m: dict[str, Any]) -> str:
            if m["value"] is None:
                return "n/a"
            ci = f" [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]" if m["ci95"] else ""
            return f"{m['value']:.3f}{ci}"

        lines.append(f"| {name} | {cell(dice)} | {cell(iou)} | {dice['n_images']} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run ``mgll segment`` (user errors reach ``mgll.cli.main`` as one line)."""
    from mgll.process import offline_hubs

    with offline_hubs(), warnings.catch_warnings():
        warnings.simplefilter("default")
        results = segment(args)
    print(_format(results))
    print(f"wrote {Path(args.output_dir) / 'results.json'}")
    return 0
