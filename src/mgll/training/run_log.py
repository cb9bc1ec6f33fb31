"""Where a run reports: ``OUT/metrics.jsonl`` (one JSON object per line) and TensorBoard."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mgll.io import atomic_write
from mgll.schema import flatten
from mgll.training.checkpoint import CheckpointError

__all__ = ["METRICS_FILE", "MetricsLog", "flatten", "read_metrics", "truncate_after"]

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Appends rows to ``metrics.jsonl``; mirrors numbers to TensorBoard when asked.

    Training rows carry ``kind: "train"``; validation rows ``kind: "val"`` and ``split``.
    """

    def __init__(self, output_dir: Path, tensorboard: bool = False) -> None:
        self.path = output_dir / METRICS_FILE
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError(
                    "log.tensorboard is true but TensorBoard is not installed: "
                    "pip install 'mgll[tensorboard]' or set log.tensorboard=false"
                ) from err
            self._tb = SummaryWriter(log_dir=str(output_dir / "tensorboard"))

    def write(self, row: Mapping[str, Any]) -> None:
        """Append ``row`` as one JSON line (flushed at once) and mirror its numbers."""
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        if self._tb is not None:
            prefix = row.get("kind", "train")
            for key, value in flatten(row, sep="/").items():
                if key not in ("step", "epoch", "kind", "split") and isinstance(
                    value, (int, float)
                ):
                    self._tb.add_scalar(f"{prefix}/{key}", value, row["step"])

    def close(self) -> None:
        """Close the metrics file and the TensorBoard writer."""
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def truncate_after(output_dir: Path, step: int) -> None:
    """Drop rows logged after ``step`` (a resumed run rewrites them), atomically.

    A last line cut short by a killed process is dropped too; a broken line before it is an
    error naming the file and line.
    """
    path = output_dir / METRICS_FILE
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # torn by a crash mid-write
                break
            raise CheckpointError(
                f"{path}, line {number}: not a JSON row ({err}); repair or delete that line "
                "to resume"
            ) from err
        if row.get("step", 0) <= step:
            kept.append(line + "\n")
    atomic_write(path, lambda tmp: tmp.write_text("".join(kept), encoding="utf-8"))


def read_metrics(output_dir: Path) -> list[dict[str, Any]]:
    """All rows of a run's ``metrics.jsonl``."""
    path = output_dir / METRICS_FILE
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
