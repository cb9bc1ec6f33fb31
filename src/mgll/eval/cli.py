"""Arguments shared by the evaluation sub-commands, and their error handling.

Each command module (``probe``, ``finetune``, ``zeroshot``, ``retrieve``, ``compare``)
registers its own parser with :func:`add_task_arguments` and runs its body through
:func:`run_offline` (the model hubs offline). Its user errors reach ``mgll.cli.main``, which
prints ``mgll <cmd>: error: ...`` and exits 1.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mgll.eval.options import DEFAULT_OPTIONS, EvalOptions
from mgll.eval.task import TaskError

DEFAULT_SPLIT_FRACTIONS = "0.8,0.1,0.1"


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """--data/--data-root/--source/--options/--level/--classes/--ordinal and the split."""
    from mgll.data.cli import add_options_argument

    parser.add_argument(
        "--data",
        required=True,
        help="dataset folder or spec file (.yaml/.json), relative to --data-root first",
    )
    parser.add_argument("--data-root", help="folder that relative --data paths are under")
    parser.add_argument(
        "--source", metavar="NAME", help="the folder's format, as data.source (default: detected)"
    )
    add_options_argument(parser)
    parser.add_argument("--level", required=True, help="granularity level that is the task")
    parser.add_argument(
        "--classes",
        help="classes to keep, comma-separated; A+B=NAME merges A and B (default: all)",
    )
    parser.add_argument(
        "--ordinal",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="classes are ordered grades: report quadratic-weighted kappa (default: when the "
        "class names are increasing numbers)",
    )
    parser.add_argument(
        "--split",
        metavar="MODE",
        help="'source' (the split the data ships), 'patient' (seeded patient-level split, "
        "--split-fractions), or a split CSV from `mgll data split`; default: the pretraining "
        "run's split when --encoder/--model is a run on this data, else the source's split "
        "when it has one, else 'patient'",
    )
    parser.add_argument(
        "--split-fractions",
        metavar="TRAIN,VAL,TEST",
        help=f"fractions of a '--split patient' split (default {DEFAULT_SPLIT_FRACTIONS})",
    )
    parser.add_argument("--split-seed", type=int, help="seed of a 'patient' split (default 0)")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model`` (a pretraining run folder or checkpoint: image and text towers)."""
    parser.add_argument(
        "--model",
        required=True,
        help="pretraining run folder or checkpoints/step_*.safetensors (image and text towers)",
    )


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """--output-dir and the flags of :class:`~mgll.eval.options.EvalOptions`, its defaults."""
    d = DEFAULT_OPTIONS
    parser.add_argument("--output-dir", required=True, help="folder for results.json and plots")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of draws and bootstrap")
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=d.n_resamples,
        metavar="N",
        help=f"bootstrap resamples ({d.n_resamples})",
    )
    parser.add_argument(
        "--batch-size", type=int, default=d.batch_size, help=f"images per batch ({d.batch_size})"
    )
    parser.add_argument(
        "--num-workers",
        type=int,
        default=d.num_workers,
        help=f"data-loader workers (default here: {d.num_workers}; 0 on 2 cores, where "
        "workers would compete with the forward pass)",
    )
    parser.add_argument(
        "--device", default=d.device, help=f"cpu, cuda, cuda:1 or auto (default {d.device})"
    )
    parser.add_argument(
        "--precision",
        default=d.precision,
        choices=["fp32", "bf16", "fp16"],
        help=f"autocast ({d.precision})",
    )
    parser.add_argument(
        "--cache-dir",
        default=d.cache_dir,
        help="feature cache folder (default: <user cache>/features, $MGLL_CACHE_DIR/features)",
    )
    parser.add_argument(
        "--no-progress", dest="quiet", action="store_true", default=d.quiet, help="no progress bars"
    )


def eval_options(args: argparse.Namespace) -> EvalOptions:
    """The :class:`~mgll.eval.options.EvalOptions` of :func:`add_run_arguments`'s flags."""
    flags = {"n_resamples": "bootstrap"}  # option name -> argparse name, where they differ
    values = {
        f.name: getattr(args, flags.get(f.name, f.name))
        for f in dataclasses.fields(EvalOptions)
        if hasattr(args, flags.get(f.name, f.name))
    }
    return EvalOptions(**values)


def split_settings(args: argparse.Namespace) -> dict[str, Any] | None:
    """The ``data.split`` mapping the split arguments describe (None = the default)."""
    if args.split_fractions is not None and args.split != "patient":
        raise TaskError(  # never ignored silently
            f"--split-fractions {args.split_fractions}: applies to a patient split; add "
            "--split patient"
        )
    if args.split is None:
        return None
    if args.split == "source":
        return {"mode": "source"}
    if args.split == "patient":
        fractions = args.split_fractions or DEFAULT_SPLIT_FRACTIONS
        try:
            train, val, test = (float(v) for v in fractions.split(","))
        except ValueError:
            raise TaskError(
                f"--split-fractions: {args.split_fractions!r} is not TRAIN,VAL,TEST"
            ) from None
        return {"train": train, "val": val, "test": test, "seed": args.split_seed or 0}
    if not Path(args.split).is_file():
        raise TaskError(f"--split: {args.split!r} is not 'source', 'patient' or a split CSV")
    return {"file": str(Path(args.split).absolute())}


def load_task(args: argparse.Namespace, encoder_config: dict[str, Any] | None = None):
    """The :class:`~mgll.eval.task.EvalData` the task arguments describe."""
    from mgll.data.cli import parse_options
    from mgll.eval.task import load_eval_data

    return load_eval_data(
        args.data,
        args.level,
        data_root=args.data_root,
        data_format=args.source,
        options=parse_options(args.options),
        classes=args.classes,
        ordinal=args.ordinal,
        split=split_settings(args),
        split_seed=args.split_seed,
        encoder_config=encoder_config,
    )


def run_offline(body: Callable[[], int]) -> int:
    """Run ``body`` with the model hubs offline: an evaluation reads local models only, never
    a download. Errors pass through untouched (``mgll.cli.main`` prints user errors on one
    line; any other exception is a bug and keeps its traceback)."""
    from mgll.process import offline_hubs

    with offline_hubs():
        return body()
