"""``mgll export``: write the image encoder of a pretraining checkpoint for downstream use."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mgll.models.weights import PretrainedWeightsError
from mgll.process import offline_hubs
from mgll.training.checkpoint import CheckpointError, load_model
from mgll.training.config import ConfigError


def export_checkpoint(checkpoint: str | Path, output: str | Path) -> Path:
    """Rebuild the model of a pretraining checkpoint, load its weights, export its image tower.

    ``checkpoint`` is a ``step_*.safetensors`` file, a run folder or its ``checkpoints`` folder
    (the newest checkpoint is used). Returns the written weights file.
    """
    from mgll.models import export_image_encoder

    model, _ = load_model(checkpoint)
    return export_image_encoder(model, output)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``export`` sub-command."""
    parser = subparsers.add_parser(
        "export",
        help="export the image encoder of a pretraining checkpoint",
        description="Write the image tower of a pretraining checkpoint as a safetensors file "
        "(open_clip key layout) with a JSON sidecar, or as an open_clip local-dir folder.",
    )
    parser.add_argument(
        "checkpoint", help="a checkpoints/step_*.safetensors file, or a run folder (newest)"
    )
    parser.add_argument(
        "--output",
        required=True,
        help="FILE.safetensors (sidecar FILE.json beside it) or a folder for open_clip",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Export, turning expected failures into one-line errors (exit code 1)."""
    try:
        with offline_hubs():
            path = export_checkpoint(args.checkpoint, args.output)
    except (CheckpointError, ConfigError, PretrainedWeightsError, ValueError) as err:
        print(f"mgll export: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0
