"""``mgll export``: write the image encoder of a pretraining checkpoint for downstream use.

The checkpoint is an mgll run (its folder or a ``step_*.safetensors`` file) or one of the
authors' released checkpoints (``checkpoint-19.pth``, recognised from its content and read
without unpickling: :mod:`mgll.models.authors`), whose image tower is exported alone.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mgll.errors import UsageError
from mgll.models.authors import (
    AuthorsCheckpoint,
    is_torch_pickle,
    load_authors_checkpoint,
)
from mgll.models.image_tower import authors_image_tower
from mgll.process import offline_hubs
from mgll.training.checkpoint import load_model, resolve_checkpoint


def authors_checkpoint(checkpoint: str | Path) -> AuthorsCheckpoint | None:
    """One of the authors' checkpoints; None for anything else (an mgll run). A PyTorch file
    in another layout, or one refused as unsafe, is an error."""
    path = Path(checkpoint)
    if path.name.endswith(".state.pt") or not is_torch_pickle(path):
        return None
    return load_authors_checkpoint(
        path, "mgll export reads mgll runs (a run folder or step_*.safetensors) and those"
    )


def export_checkpoint(checkpoint: str | Path, output: str | Path) -> Path:
    """Rebuild the model of a pretraining checkpoint, load its weights, export its image tower.

    ``checkpoint`` is a ``step_*.safetensors`` file, a run folder or its ``checkpoints`` folder
    (the newest checkpoint is used), or one of the authors' checkpoints. Returns the written
    weights file.
    """
    from mgll.models import export_image_encoder
    from mgll.models.export import export_image_tower

    authors = authors_checkpoint(checkpoint)
    if authors is not None:
        return export_image_tower(authors_image_tower(authors), output)
    model, _ = load_model(checkpoint)
    return export_image_encoder(model, output)


def export_hf_clip_vision(checkpoint: str | Path, output_dir: str | Path) -> Path:
    """Export the image tower of a pretraining run (or of one of the authors' checkpoints) as
    a transformers ``CLIPVisionModel``."""
    from mgll.models.hf_export import export_hf_clip_vision as export_tower

    authors = authors_checkpoint(checkpoint)
    if authors is not None:
        tower, source = authors_image_tower(authors), authors.path
    else:
        tower, source = load_model(checkpoint)[0].image_tower, resolve_checkpoint(checkpoint)
    info = {"source": str(source), "arch": tower.arch}
    return export_tower(tower.visual, tower.preprocess_cfg, output_dir, info)


def export_hf_timm(checkpoint: str | Path, output_dir: str | Path) -> Path:
    """Export the timm image tower of a pretraining run as a transformers ``TimmWrapperModel``."""
    from mgll.models.hf_export import export_hf_timm as export_tower

    tower = load_model(checkpoint)[0].image_tower
    info = {"source": str(resolve_checkpoint(checkpoint)), "arch": tower.arch}
    return export_tower(tower.visual, tower.preprocess_cfg, output_dir, info)


def export_pretrained(checkpoint: str | Path, output_dir: str | Path) -> Path:
    """Save a pretraining run as an ``mgll.from_pretrained`` folder with its last validation
    metrics in the model card."""
    from mgll.models.hub import save_pretrained
    from mgll.training.config import migrate
    from mgll.training.run_log import METRICS_FILE, read_metrics

    model, run_config = load_model(checkpoint)
    run_config = migrate(run_config)  # keys moved since the run was written
    run_dir = resolve_checkpoint(checkpoint).parent.parent
    rows = read_metrics(run_dir) if (run_dir / METRICS_FILE).is_file() else []
    val_rows = [row for row in rows if row.get("kind") == "val"]
    return save_pretrained(model, output_dir, run_config, val_rows[-1] if val_rows else None)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``export`` sub-command."""
    parser = subparsers.add_parser(
        "export",
        help="export the image encoder of a pretraining checkpoint",
        description="Write the image tower of a pretraining checkpoint as a safetensors file "
        "(open_clip key layout) with a JSON sidecar, or as an open_clip local-dir folder.",
    )
    parser.add_argument(
        "checkpoint",
        help="a checkpoints/step_*.safetensors file, a run folder (newest), or one of the "
        "authors' released checkpoints (checkpoint-*.pth)",
    )
    parser.add_argument(
        "--output",
        help="FILE.safetensors (sidecar FILE.json beside it) or a folder for open_clip",
    )
    parser.add_argument(
        "--format",
        choices=("open_clip", "hf-clip-vision", "hf-timm", "mgll-pretrained"),
        default="open_clip",
        help="open_clip (default, --output); hf-clip-vision: a transformers CLIPVisionModel "
        "folder for LLaVA-style vision towers (ViT towers); hf-timm: a transformers "
        "TimmWrapperModel folder (timm towers); mgll-pretrained: the whole model for "
        "mgll.from_pretrained, with a model card (all three --output-dir)",
    )
    parser.add_argument("--output-dir", help="the folder written by the folder formats")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Export the checkpoint in the asked format (user errors reach ``mgll.cli.main``)."""
    if args.format != "open_clip" and not args.output_dir:
        raise UsageError(f"--format {args.format} needs --output-dir")
    if args.format == "open_clip" and (not args.output or args.output_dir):
        raise UsageError("--format open_clip needs --output (and no --output-dir)")
    with offline_hubs():
        if args.format == "open_clip":
            path = export_checkpoint(args.checkpoint, args.output)
        else:
            writers = {
                "hf-clip-vision": export_hf_clip_vision,
                "hf-timm": export_hf_timm,
                "mgll-pretrained": export_pretrained,
            }
            path = writers[args.format](args.checkpoint, args.output_dir)
    print(f"wrote {path}")
    return 0
