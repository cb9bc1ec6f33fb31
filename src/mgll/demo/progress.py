"""The demo's progress lines: each step with the elapsed time and an estimate of the time left."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


class Progress:
    """Prints each step with the elapsed time and an estimate of the time left.

    The estimate counts pretraining runs (measured mean, or ``first_guess_s`` before the first
    ends) and evaluations (measured mean, or a tenth of a run).
    """

    def __init__(
        self, runs: int, evaluations: int, first_guess_s: float, echo: Callable, start: float
    ) -> None:
        self.start = start
        self.runs_left, self.evals_left = runs, evaluations
        self.run_times: list[float] = []
        self.eval_times: list[float] = []
        self.first_guess_s = first_guess_s
        self.echo = echo

    def left_s(self) -> float:
        run = float(np.mean(self.run_times)) if self.run_times else self.first_guess_s
        evaluation = float(np.mean(self.eval_times)) if self.eval_times else run / 10
        return self.runs_left * run + self.evals_left * evaluation

    def say(self, phase: str, what: str) -> None:
        elapsed = duration(time.perf_counter() - self.start)
        self.echo(f"[{phase}] {what} | elapsed {elapsed}, about {duration(self.left_s())} left")

    def done(self, kind: str, seconds: float | None) -> None:
        if kind == "run":
            self.runs_left -= 1
            if seconds is not None:
                self.run_times.append(seconds)
        else:
            self.evals_left -= 1
            if seconds is not None:
                self.eval_times.append(seconds)


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
