"""The ``mgll`` command line: one sub-command per capability, each registered by its own module.

Sub-command modules expose ``register(subparsers)``, which adds a parser whose ``func`` takes
the parsed arguments and returns an exit code. Only the module of the command being run is
imported, so ``mgll --version`` and ``mgll --help`` stay fast (no torch import).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Sequence

from mgll import __version__

# name -> (module that registers it, one-line help). Adding a command means adding a line here.
COMMAND_MODULES: dict[str, tuple[str, str]] = {
    "data": ("mgll.data.cli", "validate datasets and write patient-level splits"),
    "pretrain": ("mgll.training.cli", "pretrain an image-text model with MGLL (or CLIP)"),
    "export": ("mgll.training.export_cli", "export the image encoder of a checkpoint"),
    "probe": ("mgll.eval.probe", "linear probe of a frozen image encoder"),
    "zeroshot": ("mgll.eval.zeroshot", "zero-shot classification with class prompts"),
    "compare": ("mgll.eval.compare", "paired comparison of evaluation outputs (bootstrap CI, p)"),
    "demo": ("mgll.demo.cli", "random init vs CLIP vs MGLL, pretrained and evaluated end to end"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``mgll`` parser; only ``command``'s module is imported (the others list their help)."""
    parser = argparse.ArgumentParser(
        prog="mgll",
        description="Multi-Granular Language Learning: label-aware image-text pretraining "
        "for medical images.",
    )
    parser.add_argument("--version", action="version", version=f"mgll {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMAND_MODULES.items():
        if name == command:
            importlib.import_module(module_name).register(subparsers)
        else:
            subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def _format_warning(message, category, filename, lineno, line=None) -> str:
    # Users of the command need the message (it names the file and row), not our source line.
    return f"warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mgll`` console script; returns the process exit code."""
    warnings.formatwarning = _format_warning
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMAND_MODULES else None)
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0 if args.command is None else 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
