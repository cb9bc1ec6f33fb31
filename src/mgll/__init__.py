"""mgll: Multi-Granular Language Learning for medical image-text pretraining.

Label-aware contrastive learning where each image carries several labels, each described at
several granularities (METHOD.md). The loss lives in :mod:`mgll.losses`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mgll")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__", "from_pretrained"]


def __getattr__(name: str) -> object:
    if name == "from_pretrained":
        from mgll.models.factory import from_pretrained

        return from_pretrained
    raise AttributeError(f"module 'mgll' has no attribute {name!r}")
