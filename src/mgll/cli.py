"""The ``mgll`` command line: one sub-command per capability, each registered by its own module.

Sub-command modules expose ``register(subparsers)``, which adds a parser whose ``func`` takes
the parsed arguments and returns an exit code. They are imported only when the command line is
built, so ``mgll --version`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from mgll import __version__

# name -> module that registers it; adding a command means adding a line here.
COMMAND_MODULES: dict[str, str] = {
    "data": "mgll.data.cli",
    "pretrain": "mgll.training.cli",
    "export": "mgll.training.export_cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mgll",
        description="Multi-Granular Language Learning: label-aware image-text pretraining "
        "for medical images.",
    )
    parser.add_argument("--version", action="version", version=f"mgll {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES.values():
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mgll`` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0 if args.command is None else 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
