"""The demo's recipes: which dataset, pretraining config and main level ``mgll demo`` runs.

Data only, without torch: ``mgll demo --help`` and ``mgll ablate --help`` list them
(:mod:`mgll.demo.cli`); :mod:`mgll.demo.settings` reads a recipe's records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mgll.data.spec import is_spec_path


@dataclass(frozen=True)
class Recipe:
    """One dataset's demo: its folder under the data root, pretraining config and main level;
    ``source`` is its ``data.source`` when the config's is not it (a user's format or spec)."""

    dataset: str
    config: str
    main_level: str
    folds: int = 5
    source: str | None = None

    def overrides(self) -> list[tuple[str, Any]]:
        """The config overrides that point the recipe's config at this dataset."""
        if self.shipped:
            return []
        path = None if self.source and is_spec_path(self.source) else self.dataset
        return [("data.source", self.source), ("data.path", path), ("data.levels", None)]

    @property
    def shipped(self) -> bool:
        """Whether this is one of :data:`RECIPES` (any main level)."""
        return self.source is None and self.dataset in RECIPES


# where every encoder starts (mgll demo --from; mgll.demo.settings.IMAGENET_START says how)
STARTS = ("scratch", "imagenet")
RECIPES = {
    "csdi-fundus": Recipe("csdi-fundus", "demo-csdi-fundus", "severity"),
    "covid-cxr": Recipe("covid-cxr", "demo-covid-cxr", "organism"),
}
# Any other dataset (`mgll demo --data X --level L`) gets the fundus recipe's small CPU tower.
DEFAULT_CONFIG = "demo-csdi-fundus"
DEFAULT_SEEDS = 3  # 3 x the single seed's 5 min 12 s measured on 2 cores (docs/demo.md)
