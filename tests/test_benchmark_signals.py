"""mgll benchmark stops at a unit boundary on SIGINT or SIGTERM, as pretraining stops at a
step: a real process, SIGINT ignored by the shell that started it (a background job) too."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest

SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import mgll.benchmark.cli as bench
    from mgll.training.run_control import StoppedBySignal

    def unit(unit, *args):  # a unit that takes a while, then is skipped
        print("unit", unit["folder"], flush=True)
        time.sleep(0.4)
        return None, 0.4, "stub"

    bench._run_unit = unit
    plan = [{"folder": f"u{i}", "encoder": "e", "seed": 0, "task": "t", "protocol": "probe"}
            for i in range(30)]
    try:
        bench._run_plan(plan, {"e": ("random:x", "random")}, {"t": None}, Path("."), {},
                        lambda line: None)
    except StoppedBySignal as err:
        print(err, flush=True)
        sys.exit(err.exit_code)
    sys.exit(0)
    """
)


def _ignore_sigint() -> None:  # as a non-interactive shell starts a background job
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_the_benchmark_stops_at_a_unit_boundary_on_a_signal(tmp_path, sig, code):
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=_ignore_sigint,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("unit u0")  # the loop runs: now signal it
    time.sleep(0.1)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == code, out
    units = [line for line in out.splitlines() if line.startswith("unit")]
    assert len(units) <= 1  # the unit under way finished; no other started
    stopped = f"stopped by {sig.name} after {1 + len(units)} of 30 units"
    assert stopped in out and "run the same command again" in out, out
