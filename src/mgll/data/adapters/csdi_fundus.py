"""CSDI cataract-severity fundus photos (``CSDI_annotations.csv`` + ``images/``).

Two levels, coarse to fine:

- ``severity``: the score binned as the dataset README suggests: Normal [0,1),
  Acceptable [1,3), Mild [3,5), Moderate [5,7), Severe [7,10];
- ``description``: the expert diagnosis (English by default; identical texts are positives).

Patients: files named by initials (``HJX1``/``HJX2``, ``LZ-OD``/``LZ-OS``) are the two eyes of
one person and share a patient id; ``cataract_*`` and ``NL_*`` files carry no patient
information, so each is its own patient.
"""

from __future__ import annotations

import re
from pathlib import Path

from mgll.data.records import Record, RecordSet, build_levels
from mgll.data.tables import read_table
from mgll.errors import DataError

ANNOTATIONS = "CSDI_annotations.csv"
# (name, lower bound inclusive, upper bound exclusive; the last bin includes 10)
SEVERITY_BINS = (
    ("Normal", 0.0, 1.0),
    ("Acceptable", 1.0, 3.0),
    ("Mild", 3.0, 5.0),
    ("Moderate", 5.0, 7.0),
    ("Severe", 7.0, 10.0),
)
SEVERITY_PROMPTS = {
    "Normal": "A fundus photograph with no cataract.",
    "Acceptable": "A fundus photograph with an acceptable, barely visible cataract.",
    "Mild": "A fundus photograph with a mild cataract.",
    "Moderate": "A fundus photograph with a moderate cataract.",
    "Severe": "A fundus photograph with a severe cataract.",
}
_ANONYMOUS = re.compile(r"^(cataract|NL)_\d+$")
_EYE_SUFFIX = re.compile(r"(?:[-_]?(?:OD|OS)|[-_]?\d+)$")


def detect(path: Path) -> bool:
    """A folder holding CSDI_annotations.csv."""
    return (path / ANNOTATIONS).is_file()


def severity_bin(score: float) -> str:
    """The README's severity bin of a 0-10 score (ValueError outside that range)."""
    for name, low, high in SEVERITY_BINS:
        if low <= score < high or (name == "Severe" and score == high):
            return name
    raise DataError(f"cataract score {score} is outside 0-10")


def patient_of(filename: str) -> str:
    """Patient id from a CSDI file name (see the module docstring)."""
    stem = Path(filename).stem
    if _ANONYMOUS.match(stem):
        return stem
    return _EYE_SUFFIX.sub("", stem) or stem


def load(path: str | Path, *, language: str = "en") -> RecordSet:
    """Records of a CSDI folder. Options: ``language`` ("en", default, or "zh")."""
    path = Path(path)
    column = {"en": "English_diagnosis", "zh": "Chinese_diagnosis"}.get(language)
    if column is None:
        raise DataError(f"csdi-fundus adapter: language must be 'en' or 'zh', got {language!r}")
    table = path / ANNOTATIONS
    frame = read_table(table)
    for needed in ("id", "score", column):
        if needed not in frame.columns:
            raise DataError(
                f"{table}: column {needed!r} not found; is this the CSDI annotation file?"
            )
    result = RecordSet(levels=[], records=[], source=str(path))
    for number, row in enumerate(frame.to_dict("records"), start=1):
        try:
            score = float(row["score"])
            severity = severity_bin(score)
        except ValueError:
            result.exclude("score is blank or outside 0-10", f"row {number} ({row['id']})")
            continue
        description = row[column].strip()
        result.records.append(
            Record(
                image=path / "images" / row["id"].strip(),
                texts=[[SEVERITY_PROMPTS[severity]], [description or SEVERITY_PROMPTS[severity]]],
                labels=[[severity], [description] if description else []],
                patient_id=patient_of(row["id"].strip()),
                metadata={
                    "score": score,
                    "optic_disc": row.get("optic_disc_clear", ""),
                    "row": number,
                },
            )
        )
    result.levels = build_levels(
        ["severity", "description"],
        result.records,
        multi_label=[False, False],
        vocabularies=[[name for name, _, _ in SEVERITY_BINS], None],
    )
    return result
