"""What the pretraining loop reports while it runs: ``metrics.jsonl``, the progress bar, the
samples/s window, and when it last saved a checkpoint."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from mgll.training.run_log import MetricsLog, truncate_after
from mgll.training.state import Run, TrainState


@dataclass
class Progress:
    """What the loop reports and when it last saved: metrics.jsonl, the progress bar, the
    samples/s window, the last train and val rows, the step and time of the last checkpoint."""

    log: MetricsLog | None
    bar: Any
    saved_step: int = -1
    saved_at: float = field(default_factory=time.monotonic)
    window_time: float = field(default_factory=time.perf_counter)
    window_samples: int = 0
    last_train: dict[str, Any] = field(default_factory=dict)
    last_val: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, run: Run, state: TrainState, fresh: bool) -> Progress:
        """Rank 0's log (a fresh run, e.g. after a failed start, starts a new one) and bar."""
        cfg = run.cfg
        if run.main and fresh:
            truncate_after(run.output_dir, 0)
        log = MetricsLog(run.output_dir, cfg.log.tensorboard) if run.main else None
        bar = tqdm(
            total=run.max_steps,
            initial=state.step,
            disable=not (run.main and cfg.log.progress_bar),
            dynamic_ncols=True,
            desc="pretrain",
        )
        return cls(log, bar)

    def log_step(
        self,
        run: Run,
        state: TrainState,
        values: dict[str, float],
        lr: float,
        grad_norm: torch.Tensor,
    ) -> None:
        """The bar after every step; a metrics row every ``log.every_steps`` and at the end."""
        self.window_samples += run.cfg.train.batch_size
        if not run.main:
            return
        now = time.perf_counter()
        rate = self.window_samples / max(now - self.window_time, 1e-9)
        self.bar.update(1)
        self.bar.set_postfix(
            {k: f"{v:.4f}" for k, v in values.items()}
            | {"lr": f"{lr:.2e}", "samples/s": f"{rate:.1f}"}
        )
        if state.step % run.cfg.log.every_steps == 0 or state.step == run.max_steps:
            self.last_train = {
                "kind": "train",
                "step": state.step,
                "epoch": state.epoch,
                **values,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "logit_scale": float(run.model.logit_scale.detach()),
                "samples_per_s": rate,
            }
            self.log.write(self.last_train)  # type: ignore[union-attr]
            self.window_time, self.window_samples = now, 0

    def log_val(self, row: dict[str, Any]) -> None:
        """A validation row: metrics.jsonl and its block under the bar."""
        self.last_val = row
        self.log.write(row)  # type: ignore[union-attr]
        self.bar.write(format_val(row))

    def checkpoint_overdue(self, minutes: float | None) -> bool:
        """Whether ``checkpoint.every_minutes`` have passed since the last checkpoint."""
        return minutes is not None and time.monotonic() - self.saved_at >= 60 * minutes

    def saved(self, step: int) -> None:
        """Note a checkpoint at ``step``, now."""
        self.saved_step, self.saved_at = step, time.monotonic()

    def close(self) -> None:
        """Close the bar and the log."""
        self.bar.close()
        if self.log is not None:
            self.log.close()


def format_val(row: Mapping[str, Any]) -> str:
    """A validation row as the block printed under the bar."""
    parts = [f"val epoch {row['epoch']} step {row['step']}: loss {row.get('loss', math.nan):.4f}"]
    for name, m in row.get("levels", {}).items():
        shown = " ".join(f"{k} {v:.3f}" for k, v in m.items() if "@" in k)
        if any(k.startswith("R@") for k in m) and not any(k.startswith("P@") for k in m):
            shown += " P@K n/a (no labels at this level)"  # never a P@K of 0 for no labels
        parts.append(f"  [{name}] {shown} ({m.get('texts', 0)} texts)")
    return "\n".join(parts)
