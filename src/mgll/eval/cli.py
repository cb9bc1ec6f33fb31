"""Arguments shared by the evaluation sub-commands, and their error handling.

Each command module (``probe``, ``finetune``, ``zeroshot``, ``retrieve``, ``compare``)
registers its own parser with :func:`add_task_arguments` and runs through :func:`run_safely`
(model hubs offline); ``mgll.cli.main`` turns user errors into ``mgll <cmd>: error: ...``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mgll.eval.data import TaskError

# Loader workers pay off only when cores are left over for them (measured: on 2 cores, 2
# workers make extraction 0.79x the bare forward, none 0.95x; benchmarks/eval.py).
DEFAULT_WORKERS = 0 if (os.cpu_count() or 1) <= 2 else 2


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """--data/--data-root/--source/--options/--level/--classes/--ordinal and the split."""
    parser.add_argument(
        "--data",
        required=True,
        help="dataset folder or spec file (.yaml/.json), relative to --data-root first",
    )
    parser.add_argument("--data-root", help="folder that relative --data paths are under")
    parser.add_argument(
        "--source", metavar="NAME", help="the folder's format, as data.source (default: detected)"
    )
    parser.add_argument(
        "--options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one entry of data.options (repeatable), e.g. --options language=zh",
    )
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
        default="0.8,0.1,0.1",
        metavar="TRAIN,VAL,TEST",
        help="fractions of a 'patient' split (default 0.8,0.1,0.1)",
    )
    parser.add_argument("--split-seed", type=int, help="seed of a 'patient' split (default 0)")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """--output-dir, seeds, bootstrap, batching, device, precision, caches, progress."""
    parser.add_argument("--output-dir", required=True, help="folder for results.json and plots")
    parser.add_argument("--seed", type=int, default=0, help="seed of draws and bootstrap")
    parser.add_argument(
        "--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples (1000)"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (64)")
    parser.add_argument(
        "--num-workers",
        type=int,
        default=DEFAULT_WORKERS,
        help=f"data-loader workers (default here: {DEFAULT_WORKERS}; 0 on 2 cores, where "
        "workers would compete with the forward pass)",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    parser.add_argument(
        "--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast (fp32)"
    )
    parser.add_argument(
        "--cache-dir",
        help="feature cache folder (default: <user cache>/features, $MGLL_CACHE_DIR/features)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments the protocol functions share, from :func:`add_run_arguments`."""
    return {
        "seed": args.seed,
        "n_resamples": args.bootstrap,
        "cache_dir": args.cache_dir,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "precision": args.precision,
        "progress": not args.no_progress,
    }


def split_settings(args: argparse.Namespace) -> dict[str, Any] | None:
    """The ``data.split`` mapping the split arguments describe (None = the default)."""
    if args.split is None:
        return None
    if args.split == "source":
        return {"mode": "source"}
    if args.split == "patient":
        try:
            train, val, test = (float(v) for v in args.split_fractions.split(","))
        except ValueError:
            raise TaskError(
                f"--split-fractions: {args.split_fractions!r} is not TRAIN,VAL,TEST"
            ) from None
        return {"train": train, "val": val, "test": test, "seed": args.split_seed or 0}
    if not Path(args.split).is_file():
        raise TaskError(f"--split: {args.split!r} is not 'source', 'patient' or a split CSV")
    return {"file": str(Path(args.split).absolute())}


def resolve_device(name: str) -> str:
    """``auto`` -> cuda when available, else cpu."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_task(args: argparse.Namespace, encoder_config: dict[str, Any] | None = None):
    """The :class:`~mgll.eval.data.EvalData` the task arguments describe."""
    from mgll.data.cli import _options as parse_options  # the `mgll data` KEY=VALUE parser
    from mgll.eval.data import load_eval_data

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


def run_safely(command: str, body: Callable[[], int]) -> int:
    """Run ``body`` with the model hubs offline. Its user errors (``mgll.errors.UserError``)
    reach ``mgll.cli.main``, which prints them on one line; any other exception is a bug and
    keeps its traceback (a ``ValueError`` from a library is not turned into a one-liner)."""
    from mgll.process import offline_hubs

    with offline_hubs():
        return body()
