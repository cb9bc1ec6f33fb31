"""A real Ctrl-C in the middle of an epoch-engine run (``mgll finetune`` / ``mgll segment``), for
the stop-and-resume tests: the command runs in a subprocess that sends itself SIGINT right after
optimizer step N, so the engine's signal handling, not a mock, decides what is saved."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from mgll.training import checkpoint as ckpt

SRC = Path(__file__).resolve().parents[1] / "src"
TESTS = Path(__file__).resolve().parent

_STOPPED_RUN = """
import os, signal, sys
import mgll.training.epochs as epochs
from mgll.cli import main

stop_at, real, calls = int(sys.argv[1]), epochs.optimizer_step, []

def step(*args, **kwargs):
    norm = real(*args, **kwargs)
    calls.append(1)
    if len(calls) == stop_at:
        os.kill(os.getpid(), signal.SIGINT)
    return norm

epochs.optimizer_step = step
sys.exit(main(sys.argv[2:]))
"""


def stop_after_step(argv: list[str], step: int, output_dir: Path) -> dict[str, Any]:
    """Run ``mgll ARGV`` until optimizer step ``step``, then SIGINT. Checks what every stopped
    run must show (exit 130, the message, one checkpoint at that step, the lock given back,
    no results) and returns that checkpoint's training state."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)])}
    proc = subprocess.run(
        [sys.executable, "-c", _STOPPED_RUN, str(step), *argv],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr
    assert f"stopped by SIGINT at step {step}" in proc.stderr
    saved = ckpt.list_checkpoints(output_dir / ckpt.CHECKPOINT_SUBDIR)
    assert [s for s, _ in saved] == [step]
    assert not (output_dir / "results.json").exists()
    assert not (output_dir / ".mgll-run.lock").exists()  # the lock was given back
    return ckpt.load_state(saved[0][1])
