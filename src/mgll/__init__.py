"""mgll: Multi-Granular Language Learning for medical image-text pretraining.

Label-aware contrastive learning where each image carries several labels, each described at
several granularities (METHOD.md). The loss lives in :mod:`mgll.losses`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mgll")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
