"""The ``mgll`` command line: one sub-command per capability, each registered by its own module.

Each package has a thin command layer (``cli.py`` / ``*_cli.py``) whose ``register``
functions add a parser whose ``func`` takes the parsed arguments and returns an exit code; the
``func`` loads the package's library modules when the command runs. Only the command layer of
the command being run is imported, so ``mgll --help`` and ``mgll COMMAND --help`` stay fast (no
torch import; tests/test_imports_at_top.py).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Sequence

from mgll import __version__
from mgll.errors import UserError

# name -> (the command-line module that registers it, one-line help); "module:function" where
# one module registers several commands (else its ``register``). Adding a command means adding
# a line here. These modules are the command layer: light at import, so that only the library
# of the command being run is loaded (docs/architecture.md).
COMMAND_MODULES: dict[str, tuple[str, str]] = {
    "data": ("mgll.data.cli", "validate datasets and write patient-level splits"),
    "pretrain": ("mgll.training.cli", "pretrain an image-text model with MGLL (or CLIP)"),
    "export": ("mgll.training.export_cli", "export the image encoder of a checkpoint"),
    "cache": ("mgll.data.cache_cli", "show or clear the preprocessing cache"),
    "probe": ("mgll.eval.cli:register_probe", "linear probe of a frozen image encoder"),
    "finetune": (
        "mgll.eval.cli:register_finetune",
        "full fine-tuning of an encoder with a linear head",
    ),
    "zeroshot": ("mgll.eval.cli:register_zeroshot", "zero-shot classification with class prompts"),
    "retrieve": ("mgll.eval.cli:register_retrieve", "image-text retrieval (R@K, label-aware P@K)"),
    "compare": (
        "mgll.eval.cli:register_compare",
        "paired comparison of evaluation outputs (bootstrap CI, p)",
    ),
    "segment": ("mgll.segmentation.cli", "train and evaluate a segmentation decoder on an encoder"),
    "explain": ("mgll.explain_cli", "Grad-CAM heatmaps: where in an image the model sees a text"),
    "demo": ("mgll.demo.cli", "random init vs CLIP vs MGLL, pretrained and evaluated end to end"),
    "ablate": (
        "mgll.demo.cli:register_ablate",
        "the paper's ablation: loss terms, levels, missing labels",
    ),
    "benchmark": ("mgll.benchmark.cli", "encoders over the paper's tasks: one table, seeds pooled"),
}


def add_resume_argument(parser: argparse.ArgumentParser) -> None:
    """``--resume [latest|PATH]``, the one spelling of every training command: alone or with
    ``latest``, the newest checkpoint in ``--output-dir``; else a checkpoint file or folder."""
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="latest|PATH",
        help="continue a stopped run from the newest checkpoint in --output-dir (--resume "
        "alone or --resume latest) or from a checkpoint file",
    )


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
            module, _, function = module_name.partition(":")
            getattr(importlib.import_module(module), function or "register")(subparsers)
        else:
            subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def _format_warning(message, category, filename, lineno, line=None) -> str:
    # Users of the command need the message (it names the file and row), not our source line.
    return f"warning: {message}\n"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse a command line; only the named command's module is imported."""
    argv = list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMAND_MODULES else None)
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may stand before, between or after a command's options: argparse
    # fills a positional list from one run only, so later runs arrive here, in order.
    overrides = getattr(args, "overrides", None)
    stray = [a for a in extra if overrides is None or a.startswith("-") or "=" not in a]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*overrides, *extra]
    args.print_help = parser.print_help
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mgll`` console script; returns the process exit code.

    A :class:`~mgll.errors.UserError` from any command is one line on stderr and its exit code
    (1; 2 for usage errors, as argparse's); any other exception is a bug and keeps its traceback.
    """
    warnings.formatwarning = _format_warning
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if getattr(args, "func", None) is None:
        args.print_help()  # no command: the help, and a usage error like `mgll data` alone
        return 2
    name = getattr(args, "command_name", None) or f"mgll {args.command}"
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"{name}: {err.label}{err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:  # a training command's second Ctrl-C, or any command's first
        resumable = "resume" in vars(args)  # checkpointing commands: pretrain, finetune, segment
        print(
            f"{name}: stopped at once (Ctrl-C)"
            + (
                "; the checkpoints written so far are intact: continue with --resume latest"
                if resumable
                else ""
            ),
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
