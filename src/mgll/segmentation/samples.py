"""What a segmentation dataset is: samples (an image, its patient, its mask files per class),
class names and the error of a source that cannot be read.

Plain records without torch, so the mask-format registry (:mod:`~mgll.segmentation.sources`)
and ``mgll segment --help`` load none; :mod:`~mgll.segmentation.data` reads the masks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mgll.errors import UserError


class SegDataError(UserError, ValueError):
    """A segmentation source cannot be read; the message names the file/row and the fix."""


@dataclass
class MaskRef:
    """One mask file and the pixel value that marks the class (None = any non-black pixel)."""

    path: Path
    value: int | None = None


@dataclass
class SegSample:
    """An image, its patient, and per class the masks whose union is that class."""

    image: Path
    patient_id: str
    masks: list[list[MaskRef]] = field(default_factory=list)


@dataclass
class SegSource:
    """Samples and class names of a segmentation dataset."""

    samples: list[SegSample]
    classes: list[str]
    folder: Path
    format: str = ""  # the registry entry that read it (mgll.segmentation.sources)
