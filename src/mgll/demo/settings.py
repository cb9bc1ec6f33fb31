"""What one demo run is: its recipe, options, output paths and pretraining configs.

A :class:`Demo` holds a run's settings (recipe, data root, output folder, --quick, seed) and
derives from them the fold count, bootstrap size, run folders and each fold's pretraining
config; :func:`check_settings` records the settings in ``OUT/demo.json`` and refuses a folder
holding another run's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mgll.data.adapters import adapter_names
from mgll.data.build import drop_missing_images, load_records
from mgll.data.spec import is_spec_path
from mgll.data.splits import linked_patient_keys
from mgll.demo.recipes import DEFAULT_CONFIG, RECIPES, Recipe
from mgll.demo.recipes import DEFAULT_SEEDS as DEFAULT_SEEDS  # re-exported
from mgll.errors import UserError
from mgll.io import atomic_write
from mgll.metrics import DEFAULT_RESAMPLES
from mgll.training.config import load_config

PRETRAINED = ("clip", "mgll")  # the encoders pretrained per fold (Demo.encoders: all of them)
# --from: where every encoder starts. "scratch": the recipe's own small tower at random (the
# demo's default; the first encoder, "random", is that seeded initial model). "imagenet":
# EfficientNet-Lite0 with its ImageNet weights (offline, mgll[weights]), 160 px, its last three
# layer groups and the new projections trained for a few epochs at a lower rate (docs/demo.md
# "From ImageNet"); the first encoder, "imagenet", is that tower as it is.
START_ENCODER = {"scratch": "random", "imagenet": "imagenet"}
IMAGENET_START: tuple[tuple[str, Any], ...] = (
    ("model.image.arch", "timm:tf_efficientnet_lite0"),
    ("model.image.pretrained", "imagenet"),
    ("model.image.image_size", 160),
    ("model.image.unlocked_groups", 3),
    ("model.embed_dim", 256),
    ("train.epochs", 5),
    ("train.lr", 3.0e-4),
)
SETTINGS_FILE = "demo.json"
REPORT_FILE = "report.html"
SUMMARY_FILE = "summary.json"
C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)  # the probe's C, chosen by inner patient CV per fold
RESAMPLES = DEFAULT_RESAMPLES
QUICK_RESAMPLES = 200
# --quick: the same recipe with fewer folds and epochs (a smoke run, not a measurement).
QUICK_FOLDS = 2
QUICK_OVERRIDES: tuple[tuple[str, Any], ...] = (("train.epochs", 1),)


class DemoError(UserError, ValueError):
    """The demo cannot run as asked (the message says what to change)."""


def load_demo_records(folder: Path, source: str | None = None) -> Any:
    """The dataset's records (``source``: its format or spec; None detects the format of
    ``folder``) with every patient id replaced by its patient *group*: patients joined across
    byte-identical image files, so that no photo is on both sides of a split and the bootstrap
    resamples the groups."""
    spec = source is not None and is_spec_path(source)
    records, _ = load_records(source, None if spec else folder)
    records, _missing = drop_missing_images(records)
    if not records.records:
        raise DemoError(f"{folder}: no image file of the dataset exists")
    for record, group in zip(records.records, linked_patient_keys(records.records), strict=True):
        record.patient_id = group
    return records


def recipe_records(recipe: Recipe, data_root: Path) -> Any:
    """The recipe's records, read as pretraining reads them (see :mod:`mgll.demo.folds`)."""
    return load_demo_records(data_root / recipe.dataset, recipe.source)


def recipe_for(data: str | None, level: str | None, data_root: Path) -> Recipe:
    """The recipe of ``--data``/``--level``: a shipped recipe by name (``--level`` may change
    its main level), else a dataset folder (format detected), a format name (the folder of
    that name under the data root) or a spec file, with the default config."""
    name = data or "csdi-fundus"
    if name in RECIPES:
        recipe = RECIPES[name]
        return recipe if level is None else replace(recipe, main_level=level)
    if level is None:
        raise DemoError(f"--data {name}: give --level, the level to probe and fold on")
    if is_spec_path(name):
        spec = Path(name) if Path(name).is_absolute() else (data_root / name)
        spec = spec if spec.is_file() else Path(name)
        if not spec.is_file():
            raise DemoError(f"--data {name}: no such spec file (under --data-root or as given)")
        return Recipe(str(spec.parent.resolve()), DEFAULT_CONFIG, level, source=str(spec.resolve()))
    folder = Path(name) if Path(name).is_absolute() else data_root / name
    if not folder.is_dir() and Path(name).is_dir():
        folder = Path(name)
    if not folder.is_dir():
        raise DemoError(
            f"--data {name}: neither a shipped recipe ({', '.join(RECIPES)}), a dataset folder "
            "under --data-root nor a spec file (.yaml/.json)"
        )
    source = name if name in adapter_names() else None
    return Recipe(str(folder.resolve()), DEFAULT_CONFIG, level, source=source)


def fold_count(recipe: Recipe, quick: bool) -> int:
    """The cross-validation folds of a run: the recipe's, or :data:`QUICK_FOLDS` with --quick."""
    return QUICK_FOLDS if quick else recipe.folds


@dataclass
class Demo:
    """Settings and paths of one demo run (one seed: its folds, pretraining and evaluation)."""

    recipe: Recipe
    data_root: Path
    out: Path
    quick: bool
    seed: int
    start: str = "scratch"

    @property
    def encoders(self) -> tuple[str, ...]:
        """The start (``random`` or ``imagenet``: the initial model), then CLIP and MGLL."""
        return (START_ENCODER[self.start], *PRETRAINED)

    @property
    def comparisons(self) -> tuple[tuple[str, str], ...]:
        """MGLL - CLIP and MGLL - the start."""
        return (("mgll", "clip"), ("mgll", START_ENCODER[self.start]))

    @property
    def folds(self) -> int:
        return fold_count(self.recipe, self.quick)

    @property
    def resamples(self) -> int:
        return QUICK_RESAMPLES if self.quick else RESAMPLES

    @property
    def folder(self) -> Path:
        return self.data_root / self.recipe.dataset

    def settings(self) -> dict[str, Any]:
        """What ``OUT/demo.json`` records (a re-run must match it)."""
        out = {
            "dataset": self.recipe.dataset,
            "config": self.recipe.config,
            "quick": self.quick,
            "seed": self.seed,
            "folds": self.folds,
            "data": str(self.folder.resolve()),
        }
        if self.start != "scratch":  # a demo from scratch records what it always recorded
            out["start"] = self.start
        recipe = self.recipe
        if not recipe.shipped or recipe.main_level != RECIPES[recipe.dataset].main_level:
            out.update(source=recipe.source, main_level=recipe.main_level)
        return out

    def config(self, loss: str, fold: int, extra: Sequence[tuple[str, Any]] = ()) -> Any:
        """The pretraining config of one encoder and fold (``extra``: more overrides): the
        same seed for every encoder, the fold's split file."""
        overrides: list[tuple[str, Any]] = [
            *self.recipe.overrides(),
            *(IMAGENET_START if self.start == "imagenet" else ()),
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


def check_settings(
    demo: Demo, out: Path | None = None, wanted: dict[str, Any] | None = None
) -> None:
    """Record the run's settings (``wanted``, default ``demo.settings()``) in its folder
    (``out``, default ``demo.out``); a folder holding other settings is refused."""
    out = out or demo.out
    path = out / SETTINGS_FILE
    wanted = wanted or demo.settings()
    if path.is_file():
        held = json.loads(path.read_text(encoding="utf-8"))
        if held != wanted:
            changed = sorted(k for k in wanted if held.get(k) != wanted[k])
            raise DemoError(
                f"{out} holds a demo run with other settings ({', '.join(changed)}: "
                f"{[held.get(k) for k in changed]} there); use a new --output-dir or the same "
                "options"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(wanted, indent=2) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
