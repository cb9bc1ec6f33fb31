"""PALM pathologic-myopia fundus photos (iChallenge-PM, ISBI 2019; Fang et al. 2024).

Reads the shipped copy (``PALM-Training400/``, ``PALM-Validation400/`` and ``labels.csv``)
and the official release, whose zips unpack one folder deeper
(``PALM-Training400/PALM-Training400/*.jpg``) and keep the validation labels in
``PALM-Validation-GT/PM_Label_and_Fovea_Location.xlsx`` (any ``.csv``/``.xlsx`` with the
columns ``imgName`` and ``Label`` is read; ``.xlsx`` needs ``openpyxl``).

Two levels, coarse to fine:

- ``myopia``: ``pathologic myopia`` / ``none`` (class id 1 = pathologic myopia, so a binary AUC
  scores the class-1 column as the challenge does);
- ``diagnosis``: ``pathologic myopia`` / ``high myopia`` / ``normal`` from the training file
  name's first letter (P/H/N); missing for the validation set, whose labels are PM / not only.

The official split is carried as each record's ``split``: Training400 -> ``train`` and ``val``
(a fixed, seeded ``val_fraction`` of it), Validation400 -> ``test``; ``split: {mode: source}``
uses it. Patients are not given, so each photo is its own eye, except byte-identical files:
copies inside one set share one patient id (one eye), and a validation photo identical to a
training photo is dropped from the test set (counted in ``excluded``), keeping the training set
whole, so no test photo the model has trained on is scored as unseen. On the shipped data these
are ``P0014 = P0072``, ``V0107 = V0160``, ``V0268 = V0320`` (linked) and ``V0163`` (= P0056),
``V0252`` (= P0057) (dropped).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mgll.data.adapters.official_split import hold_out_val, link_identical
from mgll.data.records import Record, RecordSet, build_levels
from mgll.data.tables import TableError, read_table
from mgll.errors import DataError

TRAINING = "Training400"
VALIDATION = "Validation400"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
DIAGNOSIS = {"P": "pathologic myopia", "H": "high myopia", "N": "normal"}
MYOPIA_VOCABULARY = ["none", "pathologic myopia"]
DIAGNOSIS_VOCABULARY = ["normal", "high myopia", "pathologic myopia"]
PROMPTS = {
    "pathologic myopia": "A fundus photograph with pathologic myopia.",
    "none": "A fundus photograph without pathologic myopia.",
    "high myopia": "A fundus photograph of high myopia without pathologic changes.",
    "normal": "A fundus photograph of a normal eye.",
}


def _image_folder(path: Path, marker: str) -> Path | None:
    """The folder holding the images of one set: ``*<marker>*`` at the top or one level down,
    or the same-named folder inside it (the official zips nest one)."""
    candidates = sorted(p for p in path.glob(f"*{marker}*") if p.is_dir())
    candidates += sorted(p for p in path.glob(f"*/*{marker}*") if p.is_dir())
    for folder in candidates:
        for inner in (folder, *sorted(p for p in folder.iterdir() if p.is_dir())):
            if any(f.suffix.lower() in IMAGE_SUFFIXES for f in inner.iterdir()):
                return inner
    return None


def _images(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)


def detect(path: Path) -> bool:
    """A folder with a ``*Training400*`` image folder."""
    return path.is_dir() and _image_folder(path, TRAINING) is not None


def _label_table(path: Path, labels: str | None) -> tuple[Path, pd.DataFrame]:
    """The validation label table: ``labels`` when given, else the first table found with the
    columns imgName and Label."""
    if labels is not None:
        candidates = [Path(labels) if Path(labels).is_absolute() else path / labels]
    else:
        candidates = sorted(
            p for pattern in ("*.csv", "*/*.csv", "*.xlsx", "*/*.xlsx") for p in path.glob(pattern)
        )
    for file in candidates:
        if file.suffix.lower() == ".xlsx":
            try:
                frame = pd.read_excel(file, dtype=str).fillna("")
            except ImportError:
                raise DataError(
                    f"{file}: reading .xlsx needs openpyxl; pip install openpyxl, or save the "
                    "sheet as labels.csv next to it"
                ) from None
        else:
            try:
                frame = read_table(file)
            except TableError:
                if labels is not None:
                    raise
                continue
        frame.columns = [str(c).strip() for c in frame.columns]
        if {"imgName", "Label"} <= set(frame.columns):
            return file, frame
        if labels is not None:
            raise DataError(
                f"{file}: columns imgName and Label not found (has {list(frame.columns)}); "
                "is this the PALM validation label file?"
            )
    raise DataError(
        f"{path}: no PALM validation label table (a .csv or .xlsx with columns imgName, Label) "
        "found; give its path with the option labels"
    )


def load(
    path: str | Path, *, val_fraction: float = 0.1, seed: int = 0, labels: str | None = None
) -> RecordSet:
    """Records of a PALM folder. Options: ``val_fraction`` (share of Training400 held out as
    ``val``, default 0.1), ``seed`` (of that draw, default 0), ``labels`` (the validation label
    table, default found by its columns)."""
    path = Path(path)
    if not 0.0 <= float(val_fraction) < 1.0:
        raise DataError(f"palm adapter: val_fraction must be in [0, 1), got {val_fraction}")
    training = _image_folder(path, TRAINING)
    if training is None:
        raise DataError(f"{path}: no PALM-{TRAINING} image folder found; is this PALM?")
    result = RecordSet(levels=[], records=[], source=str(path))
    for image in _images(training):
        letter = image.name[:1].upper()
        if letter not in DIAGNOSIS:
            result.exclude("training file name does not start with P, H or N", image.name)
            continue
        diagnosis = DIAGNOSIS[letter]
        myopia = "pathologic myopia" if letter == "P" else "none"
        result.records.append(
            Record(
                image=image,
                texts=[[PROMPTS[myopia]], [PROMPTS[diagnosis]]],
                labels=[[myopia], [diagnosis]],
                patient_id=image.stem,
                metadata={"split": "train", "set": TRAINING},
            )
        )
    validation = _image_folder(path, VALIDATION)
    if validation is not None:
        table_file, table = _label_table(path, labels)
        by_name = {str(row["imgName"]).strip(): row for row in table.to_dict("records")}
        for image in _images(validation):
            row = by_name.get(image.name)
            value = str(row["Label"]).strip() if row is not None else ""
            if value not in ("0", "1", "0.0", "1.0"):
                result.exclude(f"no 0/1 Label in {table_file.name}", image.name)
                continue
            myopia = "pathologic myopia" if value.startswith("1") else "none"
            result.records.append(
                Record(
                    image=image,
                    texts=[[PROMPTS[myopia]], [PROMPTS[myopia]]],
                    labels=[[myopia], []],
                    patient_id=image.stem,
                    metadata={"split": "test", "set": VALIDATION},
                )
            )
    link_identical(result, TRAINING)
    hold_out_val(result, float(val_fraction), int(seed))
    result.levels = build_levels(
        ["myopia", "diagnosis"],
        result.records,
        multi_label=[False, False],
        vocabularies=[MYOPIA_VOCABULARY, DIAGNOSIS_VOCABULARY],
    )
    return result
