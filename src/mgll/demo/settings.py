"""What one demo run is: its recipe, options, output paths and pretraining configs.

A :class:`Demo` holds a run's settings (recipe, data root, output folder, --quick, seed) and
derives from them the fold count, bootstrap size, run folders and each fold's pretraining
config; :func:`check_settings` records the settings in ``OUT/demo.json`` and refuses a folder
holding another run's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENCODERS = ("random", "clip", "mgll")
PRETRAINED = ("clip", "mgll")
COMPARISONS = (("mgll", "clip"), ("mgll", "random"))
SETTINGS_FILE = "demo.json"
REPORT_FILE = "report.html"
SUMMARY_FILE = "summary.json"
C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)  # the probe's C, chosen by inner patient CV per fold
RESAMPLES = 1000
QUICK_RESAMPLES = 200
# --quick: the same recipe with fewer folds and epochs (a smoke run, not a measurement).
QUICK_FOLDS = 2
QUICK_OVERRIDES: tuple[tuple[str, Any], ...] = (("train.epochs", 1),)


class DemoError(ValueError):
    """The demo cannot run as asked (the message says what to change)."""


@dataclass(frozen=True)
class Recipe:
    """One dataset's demo: its folder under the data root, pretraining config and main level."""

    dataset: str
    config: str
    main_level: str
    folds: int = 5


RECIPES = {
    "csdi-fundus": Recipe("csdi-fundus", "demo-csdi-fundus", "severity"),
    "covid-cxr": Recipe("covid-cxr", "demo-covid-cxr", "organism"),
}


@dataclass
class Demo:
    """Settings and paths of one demo run (one seed: its folds, pretraining and evaluation)."""

    recipe: Recipe
    data_root: Path
    out: Path
    quick: bool
    seed: int

    @property
    def folds(self) -> int:
        return QUICK_FOLDS if self.quick else self.recipe.folds

    @property
    def resamples(self) -> int:
        return QUICK_RESAMPLES if self.quick else RESAMPLES

    @property
    def folder(self) -> Path:
        return self.data_root / self.recipe.dataset

    def settings(self) -> dict[str, Any]:
        return {
            "dataset": self.recipe.dataset,
            "config": self.recipe.config,
            "quick": self.quick,
            "seed": self.seed,
            "folds": self.folds,
            "data": str(self.folder.resolve()),
        }

    def config(self, loss: str, fold: int, extra: Sequence[tuple[str, Any]] = ()) -> Any:
        """The pretraining config of one encoder and fold (``extra``: more overrides): the
        same seed for every encoder, the fold's split file."""
        from mgll.training.config import load_config

        overrides: list[tuple[str, Any]] = [
            ("data.split", {"file": str(self.split_file(fold).resolve())}),
            ("train.seed", self.seed),
            ("loss.name", loss),
            # CLIP's one caption per image: all of its level texts joined, coarse to fine
            *([("loss.clip_level", "joined")] if loss == "clip" else []),
            ("eval.every_epochs", 0),
            ("log.progress_bar", False),
        ]
        if self.quick:
            overrides.extend(QUICK_OVERRIDES)
        return load_config(self.recipe.config, [*overrides, *extra])

    def split_file(self, fold: int) -> Path:
        return self.out / "folds" / f"fold{fold}.csv"

    def run_dir(self, encoder: str, fold: int) -> Path:
        return self.out / encoder / f"fold{fold}"


def check_settings(demo: Demo) -> None:
    """Record the run's settings in its folder; a folder holding other settings is refused."""
    from mgll.io import atomic_write

    path = demo.out / SETTINGS_FILE
    wanted = demo.settings()
    if path.is_file():
        held = json.loads(path.read_text(encoding="utf-8"))
        if held != wanted:
            changed = sorted(k for k in wanted if held.get(k) != wanted[k])
            raise DemoError(
                f"{demo.out} holds a demo run with other settings ({', '.join(changed)}: "
                f"{[held.get(k) for k in changed]} there); use a new --output-dir or the same "
                "options"
            )
        return
    demo.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(wanted, indent=2) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
