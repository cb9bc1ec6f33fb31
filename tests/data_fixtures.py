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


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    *,
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple[float, float] | None = None,
    **tags: object,
) -> Path:
    """Write a DICOM file (skips the test without pydicom): 12-bit grayscale in 16-bit words
    for a 2-D array, 8-bit RGB for an (H, W, 3) array; ``tags`` set header fields."""
    pytest.importorskip("pydicom", reason="pydicom (the mgll[dicom] extra) not installed")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.PhotometricInterpretation = photometric
    ds.PixelRepresentation = 0
    if pixels.ndim == 3:
        ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelData = pixels.astype(np.uint8).tobytes()
    else:
        ds.SamplesPerPixel = 1
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    if slope is not None:
        ds.RescaleSlope = slope
    if intercept is not None:
        ds.RescaleIntercept = intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    for name, value in tags.items():
        setattr(ds, name, value)
    ds.save_as(str(path), enforce_file_format=True)
    return path


SPEC = """
table: labels.csv
image: {column: path, root: images}
patient: patient
metadata: [view]
levels:
  - name: finding
    label: finding
    separator: "|"
    prompt: "A chest X-ray showing {label}."
  - name: report
    text: report
"""


def spec_dataset(tmp_path: Path, n: int = 10) -> Path:
    """A spec dataset of ``n`` tiny images in ``tmp_path`` (labels.csv, images/, spec.yaml);
    returns the spec's path. Odd rows are PNGs, even rows JPEGs named .png."""
    (tmp_path / "images").mkdir()
    lines = ["path,patient,view,finding,report"]
    for i in range(n):
        writer = write_png if i % 2 else write_jpeg
        writer(tmp_path / "images" / f"{i}.png")
        finding = ["Mass", "Effusion|Mass", "", "Nodule"][i % 4]
        lines.append(f"{i}.png,p{i // 2},PA,{finding},report {i % 3}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "spec.yaml").write_text(SPEC, encoding="utf-8")
    return tmp_path / "spec.yaml"
