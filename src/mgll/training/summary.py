"""The end of a pretraining run: ``summary.json`` (steps, speed, last rows, samples per source,
unreadable images, checkpoint) and the report ``mgll pretrain`` prints."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from typing import Any

import torch.distributed as dist

from mgll.distributed import is_distributed
from mgll.io import atomic_write
from mgll.training.state import Run, TrainState

SUMMARY_FILE = "summary.json"


def _gather_skipped(paths: set[str]) -> list[str]:
    """Every rank's replaced (unreadable) image paths, once each."""
    if not is_distributed():
        return sorted(paths)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sorted(paths))
    return sorted({p for rank_paths in everyone for p in rank_paths})


def summarize(
    run: Run,
    state: TrainState,
    start: tuple[float, int],
    last_train: Mapping[str, Any],
    last_val: Mapping[str, Any],
) -> dict[str, Any]:
    """The run summary; rank 0 writes ``summary.json`` and prints it."""
    elapsed = time.perf_counter() - start[0]
    steps_this_run = state.step - start[1]
    skipped_all = _gather_skipped(run.skipped)
    summary = {
        "steps": state.step,
        "epochs_completed": state.epoch,
        "steps_this_run": steps_this_run,
        "seconds": elapsed,
        "samples_per_s": steps_this_run * run.cfg.train.batch_size / max(elapsed, 1e-9),
        "world_size": run.info.world_size,
        "device": str(run.device),
        "train": dict(last_train),
        "val": dict(last_val),
        "samples": {
            "train": len(run.train_set),  # type: ignore[arg-type]
            "val": len(run.val_set) if run.val_set is not None else 0,  # type: ignore[arg-type]
        },
        "sources": run.sources,
        # where the image tower's pretrained start came from (source, file, sha256), if any
        "image_weights": run.model.build_facts().get("image.weights"),
        "skipped_images": len(skipped_all),
        "skipped_image_paths": skipped_all,
        "checkpoint": str(run.last_checkpoint) if run.last_checkpoint else None,
    }
    if run.validated_at_end:
        summary["validation"] = (
            "once, at the end: the run stopped (--max-steps) before its first epoch ended"
        )
    if run.main:
        text = json.dumps(summary, indent=2)
        atomic_write(run.output_dir / SUMMARY_FILE, lambda tmp: tmp.write_text(text, "utf-8"))
        print(format_summary(summary))
    return summary


def format_summary(summary: Mapping[str, Any]) -> str:
    """The end-of-run report printed by ``mgll pretrain``."""
    lines = [
        f"done: {summary['steps']} steps ({summary['steps_this_run']} in this run, "
        f"{summary['epochs_completed']} epochs completed) in {summary['seconds']:.1f} s, "
        f"{summary['samples_per_s']:.1f} samples/s on {summary['world_size']} x "
        f"{summary['device']}",
    ]
    if summary["train"]:
        terms = {
            k: v
            for k, v in summary["train"].items()
            if k not in ("kind", "step", "epoch", "samples_per_s")
        }
        lines.append("last train step: " + ", ".join(f"{k} {v:.4g}" for k, v in terms.items()))
    if summary["val"]:  # its full block was printed when it ran
        val = summary["val"]
        loss = val.get("loss", math.nan)
        lines.append(f"last validation: epoch {val['epoch']} step {val['step']}, loss {loss:.4f}")
    if "validation" in summary:
        lines.append(f"validation: {summary['validation']}")
    lines.append(
        f"samples: {summary['samples']['train']} train, {summary['samples']['val']} val; "
        f"skipped (unreadable) images: {summary['skipped_images']}"
    )
    lines.extend(f"  {p}" for p in summary["skipped_image_paths"][:10])
    for name, counts in summary.get("sources", {}).items():
        shown = ", ".join(f"{n} {split}" for split, n in counts.items())
        lines.append(f"source {name}: {shown}")
    lines.append(f"checkpoint: {summary['checkpoint']}")
    return "\n".join(lines)
