"""Throughput and peak memory of one MGLL training step next to an open_clip CLIP step.

All variants use the same towers (the ``cpu-demo`` config unless ``--config`` says otherwise),
the same batch of real chest X-rays (``--data-root``), the same precision and the same AdamW
update; they run alternately, one step each per round, in one process, so drifting machine
load hits them alike. Variants:

* ``clip``: open_clip's ``ClipLoss`` on the finest level's texts (one caption per image);
* ``mgll-2``: ``MGLLLoss`` on the coarsest and finest levels (the trainer's own step code);
* ``mgll-3``: three levels (coarsest, middle, finest);
* ``mgll-2, no dedup``: ``mgll-2`` with the model's text de-duplication switched off.

Peak memory: ``torch.cuda.max_memory_allocated`` on GPU; on CPU each variant runs again in a
fresh subprocess that samples its resident memory during two steps (after a first one has
allocated the optimizer state) and reports the peak growth.

    python benchmarks/train_step.py --data-root ../shared/data
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

VARIANTS = ("clip", "mgll-2", "mgll-3", "mgll-2, no dedup")


def _levels(variant: str, num_levels: int) -> list[int]:
    if variant == "clip":
        return [num_levels - 1]
    if variant.startswith("mgll-3"):
        return [0, num_levels // 2, num_levels - 1]
    return [0, num_levels - 1]


def build(args: argparse.Namespace) -> tuple[Any, dict[str, Any], Any]:
    """Model, one fixed training batch, and the resolved config."""
    from mgll.data import build_datasets, collate_samples
    from mgll.models import create_model
    from mgll.training.config import load_config
    from mgll.training.sampling import GlobalBatchSampler, SeededSamples

    cfg = load_config(args.config, args.overrides)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = create_model(cfg.model.resolved()).to(device)
    data = build_datasets(
        cfg.data,
        args.data_root,
        image_size=model.image_size,
        mean=model.image_mean,
        std=model.image_std,
        seed=0,
    )["train"]
    sampler = GlobalBatchSampler(len(data), args.batch_size, seed=0)
    keys = next(iter(sampler))
    wrapped = SeededSamples(data)
    batch = collate_samples([wrapped[k] for k in keys])
    return model, batch, cfg


def make_step(
    variant: str,
    model: Any,
    batch: dict[str, Any],
    cfg: Any,
    args: argparse.Namespace,
) -> Callable[[], None]:
    """A closure running one full training step (forward, loss, backward, AdamW update)."""
    from open_clip.loss import ClipLoss

    from mgll.losses import MGLLLoss
    from mgll.training.optim import build_optimizer
    from mgll.training.step import Precision, forward_backward, optimizer_step

    device = torch.device(args.device)
    precision = Precision(args.precision, device)
    optimizer = build_optimizer(model, cfg.train)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    levels = _levels(variant, len(batch["texts"]))
    images = batch["images"].to(device)
    texts = [batch["texts"][g] for g in levels]
    labels = [batch["labels"][g].to(device) for g in levels]
    dedup = "no dedup" not in variant

    if variant == "clip":
        clip_loss = ClipLoss()

        def step() -> None:
            model.dedup_texts = dedup
            with precision.autocast():
                out = model(images, texts)
            loss = clip_loss(
                F.normalize(out["image_emb"].float(), dim=-1),
                F.normalize(out["text_embs"][0].float(), dim=-1),
                out["logit_scale"].exp(),
            )
            precision.scaler.scale(loss).backward()
            optimizer_step(optimizer, precision, params, cfg.train.grad_clip)

        return step

    loss_fn = MGLLLoss()

    def step() -> None:
        model.dedup_texts = dedup
        forward_backward(model, loss_fn, images, texts, labels, precision, accum_steps=1, step=0)
        optimizer_step(optimizer, precision, params, cfg.train.grad_clip)

    return step


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_speed(args: argparse.Namespace) -> dict[str, list[float]]:
    model, batch, cfg = build(args)
    # Each variant keeps its own optimizer state but shares the towers, as in one process.
    steps = {v: make_step(v, model, batch, cfg, args) for v in args.variants}
    for v in args.variants:
        for _ in range(args.warmup):
            steps[v]()
    times: dict[str, list[float]] = {v: [] for v in args.variants}
    for _ in range(args.rounds):
        for v in args.variants:
            _sync(args.device)
            start = time.perf_counter()
            steps[v]()
            _sync(args.device)
            times[v].append(time.perf_counter() - start)
    return times


def measure_memory(variant: str, args: argparse.Namespace) -> float:
    """Peak memory (MiB) of a few steps of ``variant``."""
    model, batch, cfg = build(args)
    step = make_step(variant, model, batch, cfg, args)
    if args.device.startswith("cuda"):
        step()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(2):
            step()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    cmd = [sys.executable, __file__, "--memory-child", variant, *_forward_args(args)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"])


def _forward_args(args: argparse.Namespace) -> list[str]:
    out = [
        "--config",
        args.config,
        "--data-root",
        args.data_root,
        "--batch-size",
        str(args.batch_size),
        "--precision",
        args.precision,
        "--device",
        args.device,
    ]
    return out + list(args.overrides)


def _memory_child(variant: str, args: argparse.Namespace) -> None:
    model, batch, cfg = build(args)
    step = make_step(variant, model, batch, cfg, args)
    step()  # optimizer state and allocator pools exist from here on
    base = _current_rss_mib()
    peak = [base]
    done = threading.Event()

    def sample() -> None:  # CPU tensors have no allocator statistics: sample the RSS
        while not done.is_set():
            peak[0] = max(peak[0], _current_rss_mib())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for _ in range(2):
        step()
    done.set()
    sampler.join()
    print(json.dumps({"peak_mib": peak[0] - base}))


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="cpu-demo")
    parser.add_argument("--data-root", default=os.path.join("..", "shared", "data"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory runs")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_intermixed_args()
    if args.memory_child:
        _memory_child(args.memory_child, args)
        return

    times = measure_speed(args)
    memory = {v: None for v in args.variants}
    if not args.no_memory:
        memory = {v: measure_memory(v, args) for v in args.variants}
    threads = torch.get_num_threads()
    print(
        f"config {args.config}, batch {args.batch_size}, {args.precision}, {args.device} "
        f"({threads} threads), {args.rounds} alternating rounds after {args.warmup} warm-up\n"
    )
    print("| step | levels | median s/step | samples/s | vs CLIP (paired) | peak memory (MiB) |")
    print("|---|---|---|---|---|---|")
    for v in args.variants:
        med = statistics.median(times[v])
        # Per-round ratios pair each step with the CLIP step run just before it, so machine
        # load that drifts between rounds cancels out.
        ratio = "-"
        if "clip" in times:
            paired = [c / t for c, t in zip(times["clip"], times[v], strict=True)]
            ratio = f"{statistics.median(paired):.2f}x"
        mem = f"{memory[v]:.0f}" if memory[v] is not None else "-"
        levels = 1 if v == "clip" else int(v.split("-")[1][0])
        print(f"| {v} | {levels} | {med:.3f} | {args.batch_size / med:.1f} | {ratio} | {mem} |")


if __name__ == "__main__":
    main()
