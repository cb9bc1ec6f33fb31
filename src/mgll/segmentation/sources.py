"""Segmentation sources: a registry of mask formats, each a ``detect`` and a ``load``.

Like the pretraining adapters (:data:`mgll.data.adapters.ADAPTERS`), every format is one
:class:`MaskFormat` entry in :data:`MASK_FORMATS`; detection tries them in order, and a path no
entry recognises is one error naming it and listing the formats. Adding a format means writing
its two functions and adding one entry.

- ``covid-cxr-seg``: the COVID chest X-ray segmentations (``structure.csv`` + ``metadata.csv``);
  classes are groups of its annotation templates (:data:`COVID_SEG_CLASSES`);
- ``mask-folder``: ``images/NAME.*`` with ``masks/NAME.*`` (binary, or label values 1..K =
  class k);
- ``mask-table``: a CSV with columns ``image``, ``mask`` and optionally ``class`` and
  ``patient_id``, one row per mask file (paths relative to the CSV's folder).
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mgll.segmentation.samples import MaskRef, SegDataError, SegSample, SegSource

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# covid-cxr-seg: class name -> annotation templates ("Template Name" in structure.csv) joined.
COVID_SEG_CLASSES: dict[str, tuple[str, ...]] = {
    "lungs": ("Left Lung", "Right Lung"),
    "ground_glass_opacity": ("Ground Glass Opacities",),
    "consolidation": ("Consolidation",),
    "cardiomediastinum": ("Cardiomediastinum",),
    "airways": ("Airways",),
    "pleural_effusion": ("Pleural Effusion",),
    "pneumothorax": ("Pneumothorax",),
    "tubes_and_lines": (
        "Tubings",
        "Endotracheal Tube",
        "Central Venous Line",
        "Nosogastric Tube",
    ),
}
# The anatomy that frames the disease plus the two COVID findings the paper's masks are about;
# the rarer ones (2 effusions, 1 pneumothorax) cannot be learnt or measured from 100 images.
DEFAULT_COVID_SEG_CLASSES = ("lungs", "ground_glass_opacity", "consolidation")


# ---------------------------------------------------------------------------------------------
# Loaders


def load_covid_cxr_seg(folder: Path, classes: Sequence[str] | None = None) -> SegSource:
    """The covid-cxr-seg dataset: structure.csv masks grouped into ``classes``."""
    classes = list(classes or DEFAULT_COVID_SEG_CLASSES)
    unknown = [c for c in classes if c not in COVID_SEG_CLASSES]
    if unknown:
        raise SegDataError(
            f"--classes: {unknown} are not covid-cxr-seg classes; choose from "
            f"{sorted(COVID_SEG_CLASSES)}"
        )
    structure_file, metadata_file = folder / "structure.csv", folder / "metadata.csv"
    for needed in (structure_file, metadata_file):
        if not needed.is_file():
            raise SegDataError(f"{needed}: missing; is {folder} the covid-cxr-seg folder?")
    structure = pd.read_csv(structure_file, dtype=str, keep_default_na=False)
    metadata = pd.read_csv(metadata_file, dtype=str, keep_default_na=False)
    for frame, path, columns in (
        (structure, structure_file, ("Filename", "Mask", "Template Name")),
        (metadata, metadata_file, ("filename", "patientid")),
    ):
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise SegDataError(f"{path}: missing column(s) {missing}")
    patients = dict(zip(metadata["filename"], metadata["patientid"], strict=True))
    class_of = {t: k for k, c in enumerate(classes) for t in COVID_SEG_CLASSES[c]}
    samples: dict[str, SegSample] = {}
    for filename in dict.fromkeys(structure["Filename"]):
        patient = patients.get(filename) or f"image:{filename}"
        samples[filename] = SegSample(folder / "images" / filename, patient, [[] for _ in classes])
    for row in structure.to_dict("records"):
        mask = row["Mask"].strip()
        k = class_of.get(row["Template Name"].strip())
        if mask and k is not None:  # an empty Mask is an image-level tag (Monitoring Probes)
            samples[row["Filename"]].masks[k].append(MaskRef(folder / mask))
    return SegSource(list(samples.values()), classes, folder)


def _find_image(folder: Path, stem: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        for candidate in (folder / f"{stem}{suffix}", folder / f"{stem}{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def load_mask_folder(folder: Path, classes: Sequence[str] | None = None) -> SegSource:
    """``images/`` and ``masks/`` with matching names; mask value k (1..K) is class k.

    One class (the default, ``foreground``): any non-zero pixel. K classes: label values 1..K.
    """
    classes = list(classes or ["foreground"])
    images_dir, masks_dir = folder / "images", folder / "masks"
    for needed in (images_dir, masks_dir):
        if not needed.is_dir():
            raise SegDataError(
                f"{needed}: missing; the folder form needs images/ and masks/ with the same "
                "file names (stems)"
            )
    samples = []
    no_mask = []
    for image in sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        mask = _find_image(masks_dir, image.stem)
        if mask is None:
            no_mask.append(image.name)
            continue
        values = [None] if len(classes) == 1 else list(range(1, len(classes) + 1))
        masks = [[MaskRef(mask, v)] for v in values]
        samples.append(SegSample(image, f"image:{image.name}", masks))
    if no_mask:
        warnings.warn(
            f"{len(no_mask)} image(s) in {images_dir} have no mask in {masks_dir} (skipped): "
            f"{no_mask[:5]}",
            stacklevel=2,
        )
    return SegSource(samples, classes, folder)


def load_mask_table(table: Path, classes: Sequence[str] | None = None) -> SegSource:
    """A CSV with ``image``, ``mask`` and optional ``class``, ``patient_id`` (one row per mask)."""
    if not table.is_file():
        raise SegDataError(f"{table}: the mask-table form needs a CSV file")
    try:
        frame = pd.read_csv(table, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise SegDataError(f"{table}: not a readable CSV ({str(err).splitlines()[0]})") from None
    missing = [c for c in ("image", "mask") if c not in frame.columns]
    if missing:
        raise SegDataError(f"{table}: missing column(s) {missing}; needs image and mask")
    has_class = "class" in frame.columns
    found = list(dict.fromkeys(frame["class"])) if has_class else ["foreground"]
    classes = list(classes or found)
    base = table.parent
    samples: dict[str, SegSample] = {}
    for row_number, row in enumerate(frame.to_dict("records"), start=2):
        name = str(row["class"]) if has_class else "foreground"
        if name not in classes:
            if name not in found:
                raise SegDataError(f"{table} row {row_number}: class {name!r} unknown")
            continue
        if not row["image"] or not row["mask"]:
            raise SegDataError(f"{table} row {row_number}: empty image or mask path")
        image = base / row["image"]
        patient = str(row.get("patient_id") or "") or f"image:{row['image']}"
        sample = samples.setdefault(str(image), SegSample(image, patient, [[] for _ in classes]))
        sample.masks[classes.index(name)].append(MaskRef(base / row["mask"]))
    unknown = [c for c in classes if c not in found]
    if unknown:
        raise SegDataError(f"--classes: {unknown} not in {table} (classes there: {found})")
    return SegSource(list(samples.values()), classes, base)


# ---------------------------------------------------------------------------------------------
# Detectors


def detect_covid_cxr_seg(path: Path) -> bool:
    """A folder with covid-cxr-seg's two tables."""
    return (path / "structure.csv").is_file() and (path / "metadata.csv").is_file()


def detect_mask_folder(path: Path) -> bool:
    """A folder with ``images/`` and ``masks/``."""
    return (path / "images").is_dir() and (path / "masks").is_dir()


def detect_mask_table(path: Path) -> bool:
    """A CSV file whose header has ``image`` and ``mask``."""
    if not path.is_file() or path.suffix.lower() != ".csv":
        return False
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            header = next(csv.reader(handle), [])
    except (OSError, UnicodeDecodeError):
        return False
    return {"image", "mask"} <= {c.strip() for c in header}


# ---------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class MaskFormat:
    """A named mask format: the functions that detect and load it."""

    name: str
    loader: Callable[[Path, Sequence[str] | None], SegSource]  # load(path, classes)
    detector: Callable[[Path], bool]  # detect(path)
    aliases: tuple[str, ...] = ()

    def detect(self, path: str | Path) -> bool:
        """Whether ``path`` looks like a dataset in this format."""
        return bool(self.detector(Path(path)))

    def load(self, path: str | Path, classes: Sequence[str] | None = None) -> SegSource:
        """The samples at ``path`` in this format, stamped with the format's name."""
        source = self.loader(Path(path), classes)
        source.format = self.name
        return source


# Detection tries these in order; the specific format comes before the generic ones.
MASK_FORMATS: tuple[MaskFormat, ...] = (
    MaskFormat("covid-cxr-seg", load_covid_cxr_seg, detect_covid_cxr_seg),
    MaskFormat("mask-folder", load_mask_folder, detect_mask_folder, aliases=("folder",)),
    MaskFormat("mask-table", load_mask_table, detect_mask_table, aliases=("table",)),
)


def format_names() -> list[str]:
    """Names accepted as ``--source``."""
    return [f.name for f in MASK_FORMATS]


def get_format(name: str) -> MaskFormat:
    """The format called ``name`` (or one of its aliases)."""
    for entry in MASK_FORMATS:
        if name == entry.name or name in entry.aliases:
            return entry
    raise SegDataError(f"--source: unknown mask format {name!r}; known formats: {format_names()}")


def detect_format(path: str | Path) -> MaskFormat:
    """The first format recognising ``path`` (an error naming it and the formats otherwise)."""
    path = Path(path)
    if not path.exists():
        raise SegDataError(f"--data: {path} does not exist")
    for entry in MASK_FORMATS:
        if entry.detect(path):
            return entry
    raise SegDataError(
        f"--data: {path} is not a segmentation dataset in a known format ({format_names()}): "
        "expected structure.csv + metadata.csv, images/ + masks/, or a CSV with image and mask "
        "columns; name the format with --source"
    )


def load_source(
    path: str | Path, name: str | None = None, classes: Sequence[str] | None = None
) -> SegSource:
    """The samples at ``path`` in the format ``name`` (None: detected)."""
    path = Path(path)
    if not path.exists():
        raise SegDataError(f"--data: {path} does not exist")
    entry = detect_format(path) if name is None else get_format(name)
    return entry.load(path, classes)
