"""Write the image encoder of a pretraining checkpoint for downstream use (the library of
``mgll export``, whose command layer is :mod:`~mgll.training.export_cli`).

The checkpoint is an mgll run (its folder or a ``step_*.safetensors`` file) or one of the
authors' released checkpoints (``checkpoint-19.pth``, recognised from its content and read
without unpickling: :mod:`mgll.models.authors`), whose image tower is exported alone.
"""

from __future__ import annotations

from pathlib import Path

from mgll.models import export_image_encoder, hf_export
from mgll.models.authors import (
    AuthorsCheckpoint,
    is_torch_pickle,
    load_authors_checkpoint,
)
from mgll.models.export import export_image_tower
from mgll.models.hub import save_pretrained
from mgll.models.image_tower import authors_image_tower
from mgll.training.checkpoint import load_model, resolve_checkpoint
from mgll.training.config import migrate
from mgll.training.run_log import METRICS_FILE, read_metrics


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
    authors = authors_checkpoint(checkpoint)
    if authors is not None:
        return export_image_tower(authors_image_tower(authors), output)
    model, _ = load_model(checkpoint)
    return export_image_encoder(model, output)


def export_hf_clip_vision(checkpoint: str | Path, output_dir: str | Path) -> Path:
    """Export the image tower of a pretraining run (or of one of the authors' checkpoints) as
    a transformers ``CLIPVisionModel``."""
    authors = authors_checkpoint(checkpoint)
    if authors is not None:
        tower, source = authors_image_tower(authors), authors.path
    else:
        tower, source = load_model(checkpoint)[0].image_tower, resolve_checkpoint(checkpoint)
    info = {"source": str(source), "arch": tower.arch}
    return hf_export.export_hf_clip_vision(tower.visual, tower.preprocess_cfg, output_dir, info)


def export_hf_timm(checkpoint: str | Path, output_dir: str | Path) -> Path:
    """Export the timm image tower of a pretraining run as a transformers ``TimmWrapperModel``."""
    tower = load_model(checkpoint)[0].image_tower
    info = {"source": str(resolve_checkpoint(checkpoint)), "arch": tower.arch}
    return hf_export.export_hf_timm(tower.visual, tower.preprocess_cfg, output_dir, info)


def export_pretrained(checkpoint: str | Path, output_dir: str | Path) -> Path:
    """Save a pretraining run as an ``mgll.from_pretrained`` folder with its last validation
    metrics in the model card."""
    model, run_config = load_model(checkpoint)
    run_config = migrate(run_config)  # keys moved since the run was written
    run_dir = resolve_checkpoint(checkpoint).parent.parent
    rows = read_metrics(run_dir) if (run_dir / METRICS_FILE).is_file() else []
    val_rows = [row for row in rows if row.get("kind") == "val"]
    return save_pretrained(model, output_dir, run_config, val_rows[-1] if val_rows else None)
