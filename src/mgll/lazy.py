"""Package names that load on first use: a package's ``__init__`` lists where each public
name lives, and only ``from package import X`` (or ``package.X``) imports ``X``'s module. The
command layer (``mgll COMMAND --help``) and ``from package.module import Y`` then load no torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_names(package: str, homes: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that imports ``homes[name]`` when ``name`` is
    first asked for, and raises the usual AttributeError for any other name."""

    def __getattr__(name: str) -> Any:
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(homes[name]), name)

    return __getattr__
