"""``mgll export``: write the image encoder of a pretraining checkpoint for downstream use."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mgll.models.weights import PretrainedWeightsError
from mgll.training.checkpoint import (
    CheckpointError,
    load_weights,
    read_metadata,
    resolve_checkpoint,
)
from mgll.training.config import ConfigError, resolve_package_paths


def export_checkpoint(checkpoint: str | Path, output: str | Path) -> Path:
    """Rebuild the model of a pretraining checkpoint, load its weights, export its image tower.

    ``checkpoint`` is a ``step_*.safetensors`` file, a run folder or its ``checkpoints`` folder
    (the newest checkpoint is used). Returns the written weights file.
    """
    from mgll.models import create_model, export_image_encoder

    weights = resolve_checkpoint(checkpoint)
    meta = read_metadata(weights)
    model_cfg = resolve_package_paths(meta["config"]["model"])
    # The checkpoint holds every weight: skip fetching the image tower's pretrained ones, but
    # keep the activation those weights implied (open_clip derives QuickGELU from the tag).
    image_cfg = {**model_cfg["image"], "pretrained": None}
    quick_gelu = meta["extra"].get("image.quick_gelu")
    if quick_gelu is not None and image_cfg.get("quick_gelu") is None:
        image_cfg["quick_gelu"] = quick_gelu
    model_cfg["image"] = image_cfg
    model = create_model(model_cfg)
    load_weights(model, weights)
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
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        path = export_checkpoint(args.checkpoint, args.output)
    except (CheckpointError, ConfigError, PretrainedWeightsError, ValueError) as err:
        print(f"mgll export: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0
