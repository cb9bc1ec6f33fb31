"""MIDRC-style chest X-ray metadata: modality / study description / series description.

The three DICOM descriptors are the three levels of MGLL-Xray (METHOD.md section 2):

- ``modality``: "This is a CR image." (CR, DX, ...);
- ``study``: the study description as written ("CHEST PA AND LATERAL");
- ``series``: the series description as written ("PA", "AP PORTABLE").

Labels are the descriptions upper-cased with spaces collapsed, so "Chest PA" and "CHEST  PA"
are positives of each other. The source is either a metadata table in the folder (CSV/TSV/
Parquet whose columns include modality, study description and series description under the
usual MIDRC or DICOM spellings) or, when there is none, the DICOM headers of every ``.dcm``
file under the folder (read without pixels; needs pydicom).
"""

from __future__ import annotations

import re
from pathlib import Path

from mgll.data.records import Record, RecordSet, build_levels
from mgll.data.tables import read_table
from mgll.errors import DataError

LEVEL_NAMES = ("modality", "study", "series")
# normalised column name candidates (lower case, letters and digits only)
COLUMNS = {
    "modality": ("modality",),
    "study": ("studydescription", "study", "studydesc"),
    "series": ("seriesdescription", "series", "seriesdesc"),
    "image": ("filepath", "path", "file", "filename", "image", "imagepath", "objectid"),
    "patient": ("patientid", "caseids", "caseid", "submitterid", "patient", "case"),
    "view": ("viewposition", "view"),
}
_TABLE_SUFFIXES = (".csv", ".tsv", ".parquet")


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _find_table(path: Path) -> Path | None:
    if path.is_file():
        return path
    for candidate in sorted(path.iterdir()) if path.is_dir() else []:
        if candidate.suffix.lower() in _TABLE_SUFFIXES and candidate.is_file():
            try:
                columns = {_norm(c) for c in read_table(candidate).columns}
            except ValueError:
                continue
            if (
                "modality" in columns
                and columns & set(COLUMNS["study"])
                and columns & set(COLUMNS["series"])
            ):
                return candidate
    return None


def detect(path: Path) -> bool:
    """A folder with a modality/study/series table, or with DICOM files."""
    if not path.is_dir():
        return False
    return _find_table(path) is not None or next(path.rglob("*.dcm"), None) is not None


def describe(value: str) -> str:
    """Label key of a description: upper case, single spaces."""
    return " ".join(value.upper().split())


def _rows_from_table(table: Path) -> list[dict[str, str]]:
    frame = read_table(table)
    by_norm = {_norm(c): c for c in frame.columns}
    found: dict[str, str] = {}
    for role, candidates in COLUMNS.items():
        match = next((by_norm[c] for c in candidates if c in by_norm), None)
        if match is not None:
            found[role] = match
    for role in ("modality", "study", "series", "image"):
        if role not in found:
            raise DataError(
                f"{table}: no {role} column (looked for {COLUMNS[role]}, ignoring case, spaces "
                f"and underscores; columns are {list(frame.columns)}); rename it or write a "
                "dataset spec (docs/data.md)"
            )
    return [{role: row[col] for role, col in found.items()} for row in frame.to_dict("records")]


def _rows_from_dicom(path: Path) -> list[dict[str, str]]:
    try:
        import pydicom
    except ImportError as exc:
        raise ImportError(
            f"{path}: reading DICOM headers needs pydicom; run pip install 'mgll[dicom]'"
        ) from exc
    rows = []
    for file in sorted(path.rglob("*.dcm")):
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=True)
        except Exception as exc:  # pydicom raises several types for a damaged header
            rows.append({"image": str(file.relative_to(path)), "error": type(exc).__name__})
            continue
        rows.append(
            {
                "image": str(file.relative_to(path)),
                "modality": str(ds.get("Modality", "")),
                "study": str(ds.get("StudyDescription", "")),
                "series": str(ds.get("SeriesDescription", "")),
                "patient": str(ds.get("PatientID", "")),
                "view": str(ds.get("ViewPosition", "")),
            }
        )
    return rows


def load(path: str | Path, *, table: str | None = None) -> RecordSet:
    """Records of a MIDRC-style folder (see the module docstring). Options: ``table`` (path of
    the metadata table, relative to the folder; default: the first table in the folder with
    the three columns)."""
    path = Path(path)
    root = path if path.is_dir() else path.parent
    table_path = root / Path(table) if table else _find_table(path)  # relative: to the folder
    rows = _rows_from_table(table_path) if table_path is not None else _rows_from_dicom(path)
    result = RecordSet(levels=[], records=[], source=str(table_path or path))
    for number, row in enumerate(rows, start=1):
        if "error" in row:
            result.exclude("unreadable DICOM header", row["image"])
            continue
        modality = describe(row["modality"])
        if not modality or not row["image"].strip():
            result.exclude("blank modality or image path", f"row {number}")
            continue
        study, series = row["study"].strip(), row["series"].strip()
        base = f"This is a {modality} image."
        result.records.append(
            Record(
                image=root / row["image"].strip(),
                texts=[[base], [study or base], [series or study or base]],
                labels=[
                    [modality],
                    [describe(study)] if study else [],
                    [describe(series)] if series else [],
                ],
                patient_id=row.get("patient", "").strip() or None,
                metadata={"view": row.get("view", ""), "row": number},
            )
        )
    result.levels = build_levels(LEVEL_NAMES, result.records, multi_label=[False, False, False])
    return result
