"""``mgll segment``: train a decoder on an encoder's image tower and report Dice/IoU with CIs.

    mgll segment --encoder ENC --data covid-cxr-seg --data-root ../shared/data --output-dir OUT
    mgll segment --encoder ENC --data masks/ --config seg.yaml epochs=5 split.seed=3 ...
    mgll segment ... --output-dir OUT --resume          # continue a stopped run (Ctrl-C)

ENC is any spec :func:`mgll.eval.encoders.load_encoder` accepts (a run folder or checkpoint, an
exported encoder, ``open_clip:ARCH:TAG``, ``random:ARCH[:SEED]``), so pretrained and baseline
encoders go through the same code. The flags share their names and meanings with the evaluation
commands (``--data``/``--data-root``/``--source``, ``--split``/``--split-fractions``/
``--split-seed``, ``--seed``, ``--bootstrap``, ``--device``, ...). One
:class:`~mgll.segmentation.config.SegmentationConfig` is filled from its defaults, ``--config``,
``key=value`` overrides and the flags (in that order); :func:`mgll.segmentation.run.segment`
does the work.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

from mgll.cli import add_resume_argument
from mgll.errors import UsageError
from mgll.schema import parse_overrides
from mgll.segmentation.config import SegmentationConfig, load_segmentation_config
from mgll.segmentation.samples import SegDataError
from mgll.segmentation.sources import MASK_FORMATS, format_names, load_source

# flag dest -> config key, for the flags that set a config value (None = not given).
FLAG_KEYS = {
    "epochs": "epochs",
    "batch_size": "batch_size",
    "lr": "lr",
    "encoder_lr": "encoder_lr",
    "weight_decay": "weight_decay",
    "freeze_encoder": "freeze_encoder",
    "feature_size": "feature_size",
    "resize": "resize",
    "seed": "seed",
    "precision": "precision",
    "split_seed": "split.seed",
    "bootstrap": "bootstrap",
    "device": "device",
    "num_workers": "num_workers",
    "cache_dir": "cache_dir",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``segment`` sub-command."""
    parser = subparsers.add_parser(
        "segment",
        help="train and evaluate a segmentation decoder on an encoder",
        description="Train a UNETR-style decoder (ViT towers) or U-Net/FPN (convolutional "
        "towers) on a pretrained image tower with Dice + cross-entropy (MONAI), and report "
        "Dice and IoU per class with patient-bootstrap 95% CIs on a patient-level test split. "
        "Settings: --config FILE.yaml, then key=value overrides (e.g. epochs=10), then "
        "the flags (docs/transfer.md). Ctrl-C (or SIGTERM) stops after the current step with "
        "a checkpoint; continue with --resume. Runs under torchrun for several GPUs.",
    )
    _add_data_arguments(parser)
    _add_training_arguments(parser, SegmentationConfig())
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.set_defaults(func=run)


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--encoder",
        required=True,
        help="run folder/checkpoint, export, open_clip:ARCH:TAG, timm:NAME[@SIZE] or "
        "random:ARCH[:SEED]",
    )
    parser.add_argument(
        "--data",
        required=True,
        help="mask dataset folder or CSV, relative to --data-root first (formats: "
        f"{', '.join(format_names())})",
    )
    parser.add_argument("--data-root", help="folder that relative --data paths are under")
    parser.add_argument(
        "--source",
        metavar="NAME",
        help=f"the mask format, one of {format_names()} (default: detected)",
    )
    parser.add_argument(
        "--classes",
        help="comma-separated classes (covid-cxr-seg default: lungs,ground_glass_opacity,"
        "consolidation; others: cardiomediastinum, airways, pleural_effusion, pneumothorax, "
        "tubes_and_lines)",
    )
    parser.add_argument("--output-dir", required=True, help="results folder (created)")
    parser.add_argument("--config", metavar="FILE", help="a YAML file of SegmentationConfig keys")


def _add_training_arguments(parser: argparse.ArgumentParser, d: SegmentationConfig) -> None:
    def flag(name: str, kind: type, text: str, **extra: Any) -> None:
        parser.add_argument(name, type=kind, default=None, help=text, **extra)

    flag("--epochs", int, f"epochs ({d.epochs})")
    flag("--batch-size", int, f"images per batch ({d.batch_size})")
    flag("--lr", float, f"decoder peak lr: linear warm-up, then half cosine ({d.lr:g})")
    flag("--encoder-lr", float, f"tower peak lr ({d.encoder_lr:g})")
    flag("--weight-decay", float, f"AdamW ({d.weight_decay:g})")
    parser.add_argument(
        "--freeze-encoder", action="store_const", const=True, help="train the decoder only"
    )
    flag("--feature-size", int, f"decoder channels ({d.feature_size})")
    flag("--resize", str, f"onto the square input ({d.resize})", choices=("pad", "crop", "stretch"))
    flag("--seed", int, f"decoder init, batch order and bootstrap ({d.seed})")
    flag("--precision", str, f"autocast ({d.precision})", choices=("fp32", "bf16", "fp16"))
    parser.add_argument(
        "--split",
        metavar="MODE",
        help="'patient' (the only mode here: seeded patient-level split, --split-fractions)",
    )
    parser.add_argument(
        "--split-fractions",
        metavar="TRAIN,VAL,TEST",
        help="fractions of the 'patient' split (default "
        f"{d.split.train:g},{d.split.val:g},{d.split.test:g})",
    )
    flag("--split-seed", int, "seed of the 'patient' split (default: --seed)")
    flag("--bootstrap", int, f"bootstrap resamples ({d.bootstrap})", metavar="N")
    flag("--device", str, f"cpu, cuda, cuda:1 or auto (default {d.device})")
    flag("--num-workers", int, f"data-loader workers ({d.num_workers})")
    flag("--cache-dir", str, "preprocessing cache folder (default: the user cache)")
    add_resume_argument(parser)


def _fractions(flag: str, text: str) -> list[tuple[str, Any]]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3:
        raise SegDataError(f"{flag}: {text!r} is not three fractions TRAIN,VAL,TEST")
    return [(f"split.{name}", v) for name, v in zip(("train", "val", "test"), values, strict=True)]


def split_overrides(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """The config pairs of ``--split``/``--split-fractions`` (the old ``--split 0.6,0.1,0.3``
    is read as ``--split-fractions`` with a warning)."""
    pairs: list[tuple[str, Any]] = []
    mode = args.split
    if mode is not None and mode != "patient":
        if "," not in mode:
            raise UsageError(
                f"--split: {mode!r} is not available here; mask sources carry no split, so "
                "segmentation splits by patient (--split patient, --split-fractions)"
            )
        warnings.warn(
            "--split TRAIN,VAL,TEST is deprecated; use --split-fractions", FutureWarning, 2
        )
        if args.split_fractions is not None:
            raise UsageError("give the fractions once: --split-fractions, not also --split")
        pairs = _fractions("--split", mode)
    if args.split_fractions is not None:
        pairs = _fractions("--split-fractions", args.split_fractions)
    return pairs


def config_from_args(args: argparse.Namespace) -> SegmentationConfig:
    """Defaults, then ``--config``, then ``key=value`` overrides, then the flags."""
    pairs = parse_overrides(getattr(args, "overrides", None) or [])
    pairs += split_overrides(args)
    pairs += [
        (key, getattr(args, dest))
        for dest, key in FLAG_KEYS.items()
        if getattr(args, dest) is not None
    ]
    return load_segmentation_config(args.config, pairs)


def data_path(args: argparse.Namespace) -> tuple[Path, str | None]:
    """The dataset path of ``--data`` (under ``--data-root`` first) and the format to read it
    as (None: detected). The old form ``--data FORMAT --data-root FOLDER`` still works, with a
    warning, when no such path exists."""
    root = Path(args.data_root) if args.data_root else None
    candidates = [root / args.data] if root is not None else []
    for path in [*candidates, Path(args.data)]:
        if path.exists():
            return path, args.source
    named = next((f for f in MASK_FORMATS if args.data in (f.name, *f.aliases)), None)
    if named is None or args.source is not None:
        raise SegDataError(f"--data: {candidates[0] if candidates else args.data} does not exist")
    warnings.warn(
        f"--data {args.data} (a format) is deprecated; give the folder or CSV as --data "
        "and the format, if detection needs help, as --source",
        FutureWarning,
        2,
    )
    return root or Path("."), named.name


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
    # Imported here, not at the top: the hubs go offline before open_clip loads.
    from mgll.process import offline_hubs
    from mgll.segmentation.run import segment

    with offline_hubs(), warnings.catch_warnings():
        warnings.simplefilter("default")
        cfg = config_from_args(args)
        path, source_format = data_path(args)
        classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
        source = load_source(path, source_format, classes)
        results = segment(args.encoder, source, args.output_dir, cfg, resume=args.resume)
    if results is None:  # a rank other than 0 under torchrun
        return 0
    print(_format(results))
    print(f"wrote {Path(args.output_dir) / 'results.json'}")
    return 0
