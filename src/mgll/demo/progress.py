"""The demo's progress lines: each step with the elapsed time and the time left, estimated only
from steps already timed (never a guess)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np


class Progress:
    """Prints each step with the elapsed time and the time left.

    The time left counts the pretraining runs left at their measured mean and the evaluation
    steps left at the measured mean of their kind (e.g. one level's probe, timed on an earlier
    encoder), or of every timed evaluation step while that kind has none yet. Before a run and
    an evaluation step have been timed it says what it waits for instead of a number.
    ``evaluations``: the kinds of the evaluation steps to come, in order (a count: that many
    steps of one kind).
    """

    def __init__(
        self, runs: int, evaluations: int | Sequence[str], echo: Callable, start: float
    ) -> None:
        self.start = start
        self.runs_left = runs
        kinds = ["eval"] * evaluations if isinstance(evaluations, int) else list(evaluations)
        self.evals_left = kinds
        self.run_times: list[float] = []
        self.eval_times: dict[str, list[float]] = {}
        self.echo = echo

    def left_s(self) -> float | None:
        """Seconds left, or None while some work left is of a sort never timed."""
        if self.runs_left and not self.run_times:
            return None
        timed = [t for times in self.eval_times.values() for t in times]
        if self.evals_left and not timed:
            return None
        run = float(np.mean(self.run_times)) if self.run_times else 0.0
        evals = sum(float(np.mean(self.eval_times.get(k) or timed)) for k in self.evals_left)
        return self.runs_left * run + evals

    def _estimate(self) -> str:
        left = self.left_s()
        if left is not None:
            return f"about {duration(left)} left"
        waiting = []
        if self.runs_left and not self.run_times:
            waiting.append("the first pretraining run")
        if self.evals_left and not self.eval_times:
            waiting.append("the first evaluation step")
        return f"time left known once {' and '.join(waiting)} end{'' if len(waiting) > 1 else 's'}"

    def say(self, phase: str, what: str) -> None:
        elapsed = duration(time.perf_counter() - self.start)
        self.echo(f"[{phase}] {what} | elapsed {elapsed}, {self._estimate()}")

    def done(self, kind: str, seconds: float | None, step: str = "eval") -> None:
        """A run (``kind`` "run") or evaluation step (``step``: its kind) ended; ``seconds``
        None when it was read back rather than done now."""
        if kind == "run":
            self.runs_left -= 1
            if seconds is not None:
                self.run_times.append(seconds)
            return
        if step in self.evals_left:
            self.evals_left.remove(step)
        if seconds is not None:
            self.eval_times.setdefault(step, []).append(seconds)

    @contextlib.contextmanager
    def step(self, kind: str, what: str) -> Iterator[None]:
        """One evaluation step of ``kind``: said when it starts, timed when it ends."""
        self.say("evaluate", what)
        started = time.perf_counter()
        yield
        self.done("eval", time.perf_counter() - started, kind)


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
