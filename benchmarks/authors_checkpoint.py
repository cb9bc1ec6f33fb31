"""The authors' ViT-L-14 on CPU: reading one of their checkpoints, embedding a few images,
exporting it in both formats.

Without ``--checkpoint`` a checkpoint in exactly their layout is written first (a random
``ViT-L-14`` image tower, GELU, under ``clip.visual.*``; with ``--optimizer``, AdamW moments
for it too, as their files carry). Each step runs the code the commands run:
:func:`mgll.eval.encoders.load_encoder` (``--encoder FILE.pth``), ``Encoder.encode`` on
224 px images (the pre-projection features a probe uses; ImageNet-normalised random pixels, as
the cost does not depend on the content), and ``mgll export`` to safetensors and to
hf-clip-vision. Prints a Markdown table of wall times and the process's peak memory; nothing is
asserted. Example:

    python benchmarks/authors_checkpoint.py --images 4 --batch-size 1,4
    python benchmarks/authors_checkpoint.py --checkpoint checkpoint-19.pth
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import open_clip
import torch
from open_clip.model import _build_vision_tower

from mgll.cli import main as mgll_main
from mgll.eval.encoders import load_encoder
from mgll.models.authors import AUTHORS_ARCH


def peak_rss_gib() -> float:
    """The process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def write_checkpoint(path: Path, optimizer: bool) -> None:
    """A random ViT-L-14 image tower saved as HUANGLIZI/MGLL's save_model does."""
    cfg = open_clip.get_model_config(AUTHORS_ARCH)
    torch.manual_seed(0)
    visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=False)
    state = {f"clip.visual.{k}": v for k, v in visual.state_dict().items()}
    moments = {}
    if optimizer:
        moments = {
            i: {
                "step": torch.tensor(1.0),
                "exp_avg": torch.zeros_like(v),
                "exp_avg_sq": torch.zeros_like(v),
            }
            for i, v in enumerate(state.values())
        }
    content = {
        "model": state,
        "optimizer": {"state": moments, "param_groups": [{"lr": 1e-4, "params": list(moments)}]},
        "epoch": 19,
        "scaler": {"scale": 65536.0},
        "args": argparse.Namespace(visual_encoder="clip_vit", input_size=224),
    }
    torch.save(content, path)


def cpu_seconds() -> float:
    """CPU time of this process so far (user + system): contention shows as wall >> CPU."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(rows: list[str], what: str, detail: str, run) -> object:
    """Run ``run()``, add a table row with its wall and CPU time."""
    start, cpu = time.perf_counter(), cpu_seconds()
    result = run()
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    rows.append(f"| {what} | {detail} | {seconds:.1f} | {cpu:.1f} | {peak_rss_gib():.1f} |")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="one of the authors' files (default: "
        "a random one in their layout, written to a temporary folder)",
    )
    parser.add_argument(
        "--optimizer",
        action="store_true",
        help="give the written checkpoint AdamW moments (3x the file size)",
    )
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--batch-size", default="1,4", help="comma-separated batch sizes")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = folder / "checkpoint-19.pth"
            timed(
                rows,
                "write a checkpoint in their layout",
                "random ViT-L-14",
                lambda: write_checkpoint(checkpoint, args.optimizer),
            )
        size = checkpoint.stat().st_size / 2**30
        encoder = timed(
            rows,
            "load_encoder(FILE.pth)",
            f"{size:.2f} GiB file",
            lambda: load_encoder(str(checkpoint)),
        )
        images = torch.randn(args.images, 3, 224, 224)
        with torch.no_grad():
            encoder.encode(images[:1])  # first call allocates; not what a user pays per image
            for batch in (int(b) for b in args.batch_size.split(",")):
                start, cpu = time.perf_counter(), cpu_seconds()
                for first in range(0, args.images, batch):
                    encoder.encode(images[first : first + batch])
                seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
                rows.append(
                    f"| encode {args.images} images, batch {batch} | "
                    f"{seconds / args.images:.2f} s/image | {seconds:.1f} | {cpu:.1f} | "
                    f"{peak_rss_gib():.1f} |"
                )
        del encoder
        out = folder / "authors.safetensors"
        timed(
            rows,
            "mgll export FILE.pth --output X.safetensors",
            "",
            lambda: mgll_main(["export", str(checkpoint), "--output", str(out)]),
        )
        timed(
            rows,
            "mgll export FILE.pth --format hf-clip-vision",
            "",
            lambda: mgll_main(
                [
                    "export",
                    str(checkpoint),
                    "--format",
                    "hf-clip-vision",
                    "--output-dir",
                    str(folder / "hf"),
                ]
            ),
        )

    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU\n")
    print("| step | detail | wall (s) | CPU (s) | peak RSS (GiB) |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
