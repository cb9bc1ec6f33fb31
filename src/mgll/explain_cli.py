"""``mgll explain``: the command layer of :mod:`mgll.explain` (loads it when the command runs)."""

from __future__ import annotations

from typing import Any

# mgll.explain.CAM_METHODS' names, written here so the help loads no torch (a test holds them equal)
CAM_METHOD_NAMES = ("gradcam", "gradcam++", "hirescam")


def register(subparsers: Any) -> None:
    """Add the ``explain`` sub-command."""
    parser = subparsers.add_parser(
        "explain",
        help="Grad-CAM heatmaps: where in an image the model sees a text",
        description="Grad-CAM of the image-text similarity on the image tower's last stage "
        "(ViT: patch tokens of the last block). Writes an overlay PNG and the raw map (.npy) "
        "per image and text, and explanations.json.",
    )
    parser.add_argument("images", nargs="+", help="image files (any format mgll reads)")
    parser.add_argument(
        "--model",
        required=True,
        help="a pretraining run folder, a checkpoint file, or a save_pretrained folder",
    )
    parser.add_argument(
        "--text", action="append", required=True, help="a text to explain (repeatable)"
    )
    parser.add_argument("--output-dir", required=True, help="folder for the heatmaps")
    parser.add_argument(
        "--method",
        choices=CAM_METHOD_NAMES,
        default="gradcam",
        help="CAM variant of the grad-cam package (default gradcam)",
    )
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1 or auto (default: cuda if available)"
    )
    parser.set_defaults(func=run)


def run(args: Any) -> int:
    """Run ``mgll explain`` (user errors reach ``mgll.cli.main`` as one line)."""
    from mgll.explain import explain_images, load_explain_model
    from mgll.process import offline_hubs

    with offline_hubs():
        model = load_explain_model(args.model, args.device)
        entries = explain_images(model, args.images, args.text, args.output_dir, args.method)
    for entry in entries:
        print(f"{entry['overlay']}: similarity {entry['similarity']:.3f}")
    print(f"wrote {len(entries)} heatmap(s) to {args.output_dir}")
    return 0
