"""NIH ChestX-ray14 (``Data_Entry_2017.csv`` + images).

Two levels, coarse to fine:

- ``abnormality``: Normal ("No Finding") or Abnormal;
- ``findings``: multi-hot over the 14 findings ("A|B" rows carry both) plus a 15th class,
  "No Finding" (last, id 14). An all-zero row means *missing* to the loss (the sample leaves
  that level and the smooth-KL term), so normal images get a class of their own: they stay in
  the findings level as positives of each other and negatives of every finding. The first 14
  columns are the usual 14-way multi-hot.

Texts are prompts built from the finding names. Images are looked up by file name anywhere
under the folder (the official release spreads them over ``images_001/images`` ...
``images_012/images``). The table may be gzipped (torchxrayvision ships it so).
"""

from __future__ import annotations

import os
from pathlib import Path

from mgll.data.records import LevelInfo, Record, RecordSet
from mgll.data.tables import read_table
from mgll.errors import DataError

FINDINGS = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NO_FINDING = "No Finding"
TABLE_NAMES = (
    "Data_Entry_2017.csv",
    "Data_Entry_2017_v2020.csv",
    "Data_Entry_2017.csv.gz",
    "Data_Entry_2017_v2020.csv.gz",
)


def detect(path: Path) -> bool:
    """A folder holding Data_Entry_2017*.csv."""
    return _table(path) is not None


def _table(path: Path) -> Path | None:
    if path.is_file():
        return path
    return next((path / n for n in TABLE_NAMES if (path / n).is_file()), None)


def finding_text(name: str) -> str:
    """Readable form of a finding name ("Pleural_Thickening" -> "pleural thickening")."""
    return name.replace("_", " ").lower()


def load(path: str | Path, *, images: str | None = None) -> RecordSet:
    """Records of a ChestX-ray14 folder (or of the table file itself, images then looked up
    next to it). Options: ``images`` (folder to search for images, default the folder)."""
    path = Path(path)
    image_dir = images
    table = _table(path)
    if table is None:
        raise DataError(f"{path}: no {TABLE_NAMES[0]} found; pass the table or its folder")
    root = Path(image_dir) if image_dir else (path if path.is_dir() else path.parent)
    frame = read_table(table, "csv")
    for needed in ("Image Index", "Finding Labels", "Patient ID"):
        if needed not in frame.columns:
            raise DataError(f"{table}: column {needed!r} not found; is this Data_Entry_2017.csv?")
    # One walk of the folder instead of one stat per image (the set has 112,120 images).
    located: dict[str, Path] = {}
    for folder, _, files in os.walk(root):
        for f in files:
            if f.lower().endswith(".png"):
                located.setdefault(f, Path(folder) / f)
    result = RecordSet(levels=[], records=[], source=str(table))
    known = set(FINDINGS)
    images_dir = root / "images"
    # Plain column lists: per-row dicts from pandas cost seconds on the 112,120 rows.
    wanted = ("Image Index", "Finding Labels", "Patient ID", "View Position", "Patient Gender",
              "Patient Age", "Follow-up #")  # fmt: skip
    columns = [frame[c].tolist() if c in frame.columns else [""] * len(frame) for c in wanted]
    rows = (dict(zip(wanted, values, strict=True)) for values in zip(*columns, strict=True))
    for number, row in enumerate(rows, start=1):
        names = [n.strip() for n in row["Finding Labels"].split("|") if n.strip()]
        unknown = [n for n in names if n not in known and n != NO_FINDING]
        if not names or unknown:
            result.exclude(f"finding(s) {unknown or '(blank)'} not among the 14", f"row {number}")
            continue
        findings = [n for n in FINDINGS if n in names]  # canonical order
        if findings:
            listed = ", ".join(finding_text(n) for n in findings)
            texts = [["An abnormal chest X-ray."], [f"A chest X-ray showing {listed}."]]
            labels = [["Abnormal"], findings]
        else:
            texts = [["A normal chest X-ray."], ["A chest X-ray with no finding."]]
            labels = [["Normal"], [NO_FINDING]]
        image = row["Image Index"].strip()
        result.records.append(
            Record(
                image=located.get(image) or images_dir / image,
                texts=texts,
                labels=labels,
                patient_id=row["Patient ID"].strip() or None,
                metadata={
                    "view": row["View Position"],
                    "sex": row["Patient Gender"],
                    "age": row["Patient Age"],
                    "follow_up": row["Follow-up #"],
                    "row": number,
                },
            )
        )
    result.levels = [
        LevelInfo("abnormality", ["Normal", "Abnormal"], multi_label=False),
        LevelInfo("findings", [*FINDINGS, NO_FINDING], multi_label=True),
    ]
    return result
