"""The run options every evaluation command shares, as one frozen object.

``mgll probe``, ``finetune``, ``zeroshot`` and ``retrieve`` (and the demo, the benchmark and the
feature helpers) take an :class:`EvalOptions` instead of the same seven keyword arguments each;
:func:`mgll.eval.cli.add_run_arguments` builds their command-line flags with the defaults of
this dataclass and :func:`mgll.eval.cli.eval_options` fills one from the parsed arguments.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mgll.errors import OptionError
from mgll.metrics import DEFAULT_RESAMPLES

# Loader workers pay off only when cores are left over for them (measured: on 2 cores, 2
# workers make extraction 0.79x the bare forward, none 0.95x; benchmarks/eval.py).
DEFAULT_WORKERS = 0 if (os.cpu_count() or 1) <= 2 else 2


@dataclass(frozen=True)
class EvalOptions:
    """How an evaluation runs, not what it measures.

    ``cache_dir``: the feature cache folder (None = ``<user cache>/features``, False = none);
    ``n_resamples``: patient-bootstrap resamples of every CI; ``seed``: label-fraction draws,
    classifier initialisation and bootstrap; ``quiet``: no progress bars.
    """

    device: str = "auto"
    batch_size: int = 64
    num_workers: int = DEFAULT_WORKERS
    seed: int = 0
    n_resamples: int = DEFAULT_RESAMPLES
    cache_dir: str | Path | bool | None = None
    precision: str = "fp32"
    quiet: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise OptionError(f"--batch-size: {self.batch_size} must be at least 1")
        if self.num_workers < 0:
            raise OptionError(f"--num-workers: {self.num_workers} must be 0 or more")
        if self.n_resamples < 1:
            raise OptionError(f"--bootstrap: {self.n_resamples} must be at least 1")
        if self.cache_dir is True:
            raise OptionError("cache_dir: True is not a folder; give a folder, None or False")

    @property
    def progress(self) -> bool:
        """Whether to show progress bars."""
        return not self.quiet


DEFAULT_OPTIONS = EvalOptions()  # the default of every protocol function (frozen, so shared)


def resolve_device(name: str) -> str:
    """``auto`` -> cuda when available, else cpu."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
