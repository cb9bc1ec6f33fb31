"""Adapters: one module per real-world dataset format, all producing a RecordSet.

Each adapter module has ``detect(path) -> bool`` and ``load(path, *, options) -> RecordSet``.
Adding a format means adding a module, importing it here and one entry in :data:`ADAPTERS`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mgll.data.adapters import (
    chestxray14,
    covid_cxr,
    csdi_fundus,
    idrid,
    mgll_release,
    midrc,
    palm,
)
from mgll.data.records import RecordSet
from mgll.errors import DataError


@dataclass(frozen=True)
class Adapter:
    """A named format: the functions that detect and load it."""

    name: str
    loader: Callable[..., RecordSet]  # load(path, *, options...) -> RecordSet
    detector: Callable[[Path], bool]  # detect(path) -> bool
    aliases: tuple[str, ...] = ()

    def options(self) -> list[str]:
        """The options this format's loader takes (its keyword-only parameters)."""
        parameters = inspect.signature(self.loader).parameters.values()
        return [p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]

    def load(self, path: str | Path, **options: Any) -> RecordSet:
        """Records of the dataset at ``path`` in this format (options checked by name)."""
        unknown = sorted(set(options) - set(self.options()))
        if unknown:
            raise DataError(
                f"{self.name} adapter: unknown option(s) {unknown}; known: {self.options()}"
            )
        return self.loader(Path(path), **options)

    def detect(self, path: str | Path) -> bool:
        """Whether ``path`` looks like a dataset in this format."""
        return bool(self.detector(Path(path)))


# Detection tries these in order; specific formats come before the generic ones.
ADAPTERS: tuple[Adapter, ...] = (
    Adapter("covid-cxr", covid_cxr.load, covid_cxr.detect, aliases=("ieee8023", "covid-chestxray")),
    Adapter("csdi-fundus", csdi_fundus.load, csdi_fundus.detect, aliases=("csdi",)),
    Adapter("palm", palm.load, palm.detect, aliases=("ichallenge-pm",)),
    Adapter("idrid", idrid.load, idrid.detect, aliases=("idrid-grading",)),
    Adapter(
        "chestxray14",
        chestxray14.load,
        chestxray14.detect,
        aliases=("nih-chestxray14", "nih"),
    ),
    Adapter("mgll-release", mgll_release.load, mgll_release.detect, aliases=("mgll",)),
    Adapter("mgll-downstream", mgll_release.load_downstream, mgll_release.detect_downstream),
    Adapter("midrc", midrc.load, midrc.detect, aliases=("midrc-xr",)),
)


def adapter_names() -> list[str]:
    """Names accepted as a ``source`` / ``--format``."""
    return [a.name for a in ADAPTERS]


def get_adapter(name: str) -> Adapter:
    """The adapter called ``name`` (or one of its aliases)."""
    for adapter in ADAPTERS:
        if name == adapter.name or name in adapter.aliases:
            return adapter
    raise DataError(
        f"unknown dataset format {name!r}; known formats: {adapter_names()} (or give a spec file)"
    )


def detect_adapter(path: str | Path) -> Adapter:
    """The first adapter recognising the folder ``path`` (ValueError listing the formats)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such dataset folder")
    for adapter in ADAPTERS:
        if adapter.detect(path):
            return adapter
    raise DataError(
        f"{path}: not a dataset folder in a known format ({adapter_names()}); name the format "
        "with --source / data.source, or describe the table in a dataset spec (docs/data.md)"
    )
