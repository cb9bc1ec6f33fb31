"""``mgll pretrain``: train a model from a shipped recipe or a YAML config."""

from __future__ import annotations

import argparse
from pathlib import Path

from mgll.cli import add_resume_argument
from mgll.schema import shipped_config_names


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``pretrain`` sub-command."""
    names = ", ".join(shipped_config_names())
    parser = subparsers.add_parser(
        "pretrain",
        help="pretrain an image-text model with the MGLL (or CLIP) objective",
        description="Pretrain an image-text model. Every config key can be overridden with "
        "dotted key=value pairs (values are YAML), e.g. train.lr=3e-4 loss.name=clip. Config "
        "sections: model, data, loss, train, eval, log, checkpoint; every key, its default and "
        "meaning: docs/pretraining.md, section 'Configuration reference'. Ctrl-C (or SIGTERM) "
        "stops after the current step with a checkpoint; continue with --resume latest.",
    )
    parser.add_argument("config", help=f"a shipped config ({names}) or a YAML file")
    parser.add_argument(
        "--data-root", default=".", help="folder holding the datasets (default: current folder)"
    )
    parser.add_argument("--output-dir", required=True, help="run folder (config, metrics, ...)")
    parser.add_argument(
        "--max-steps", type=int, default=None, help="stop after this many optimizer steps in total"
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (train.seed)")
    parser.add_argument(
        "--deterministic", action="store_true", help="deterministic kernels (train.deterministic)"
    )
    add_resume_argument(parser)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Resolve the config and train (user errors reach ``mgll.cli.main`` as one line)."""
    overrides: list[tuple[str, object]] = []
    if args.max_steps is not None:
        overrides.append(("train.max_steps", args.max_steps))
    if args.seed is not None:
        overrides.append(("train.seed", args.seed))
    if args.deterministic:
        overrides.append(("train.deterministic", True))
    from mgll.process import offline_hubs
    from mgll.training.config import load_config, parse_overrides

    try:
        pairs = parse_overrides(args.overrides) + overrides
        cfg = load_config(args.config, pairs)
        from mgll.training.trainer import train

        with offline_hubs():
            train(cfg, Path(args.data_root), Path(args.output_dir), resume=args.resume)
    finally:
        _leave_process_group()
    return 0


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
