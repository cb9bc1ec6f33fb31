"""Helpers shared by the tests/test_data_*.py files: the shared data folder and tiny images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def shared_data_dir() -> Path:
    """../shared/data next to the repository (or $MGLL_SHARED_DATA)."""
    override = os.environ.get("MGLL_SHARED_DATA")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def require_shared(name: str) -> Path:
    """The shared dataset folder ``name``, or skip the test saying where it was looked for."""
    folder = shared_data_dir() / name
    if not folder.is_dir():
        pytest.skip(
            f"shared data {folder} is absent (set MGLL_SHARED_DATA to the folder holding "
            f"covid-cxr/ and csdi-fundus/ to run this test)"
        )
    return folder


def gradient(height: int = 24, width: int = 32) -> np.ndarray:
    """A uint8 grayscale ramp with distinct values, so resizes and inversions are visible."""
    row = np.linspace(0, 255, width).astype(np.uint8)
    return np.repeat(row[None, :], height, axis=0)


def write_png(path: Path, array: np.ndarray | None = None) -> Path:
    """Write an 8-bit grayscale PNG (a ramp by default)."""
    Image.fromarray(gradient() if array is None else array).save(path, format="PNG")
    return path


def write_jpeg(path: Path, array: np.ndarray | None = None) -> Path:
    """Write an RGB JPEG."""
    rgb = np.stack([gradient()] * 3, axis=-1) if array is None else array
    Image.fromarray(rgb).save(path, format="JPEG", quality=95)
    return path
