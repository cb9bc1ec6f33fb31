"""``mgll export``: the command layer of :mod:`mgll.training.export` (loaded when it runs)."""

from __future__ import annotations

import argparse

from mgll.errors import UsageError


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
    from mgll.process import offline_hubs
    from mgll.training.export import (
        export_checkpoint,
        export_hf_clip_vision,
        export_hf_timm,
        export_pretrained,
    )

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
