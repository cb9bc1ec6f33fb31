"""IDRiD disease grading (Porwal et al., Data 2018; ISBI 2018): DR grade and DME risk.

Reads the official layout of part B, from the folder that holds ``B. Disease Grading`` or from
that folder itself::

    B. Disease Grading/1. Original Images/{a. Training Set, b. Testing Set}/IDRiD_NNN.jpg
    B. Disease Grading/2. Groundtruths/{a. ..._Training Labels.csv, b. ..._Testing Labels.csv}

The label files are read as released: a header with a trailing space (``Risk of macular edema
``), empty trailing columns, CRLF line ends. Every photo carries both label axes, so each is a
multi-label, multi-granular sample. Five levels, coarse to fine:

- ``finding`` (multi-label): ``diabetic retinopathy`` (grade >= 1) and/or ``diabetic macular
  edema`` (risk >= 1), or ``no diabetic eye disease``;
- ``referable_dr``: ``referable diabetic retinopathy`` (grade >= 2, moderate NPDR or worse, the
  usual screening threshold) / ``no referable diabetic retinopathy``;
- ``dr_grade``: the 0-4 grade by name (no DR, mild / moderate / severe non-proliferative,
  proliferative);
- ``dme_risk``: the 0-2 macular edema risk (no exudates; hard exudates farther than one disc
  diameter from the macula's centre; within one disc diameter);
- ``grading``: both grades in one phrase (``moderate non-proliferative diabetic retinopathy and
  hard exudates near the macula``), the photo's whole report; what a pool's finest level takes.

The official split is carried as each record's ``split`` (``split: {mode: source}``): the
training set -> ``train`` and ``val`` (a seeded ``val_fraction`` of its eyes), the testing set
-> ``test``. Patients are not given: each photo is its own eye (``train/IDRiD_NNN`` or
``test/IDRiD_NNN``: both sets number their photos from 001), byte-identical photos within a
set share one, and a test photo identical to a training photo is dropped from the test set
(:mod:`mgll.data.adapters.official_split`). On the shipped copy: ``IDRiD_021 = 391``, ``028 =
327``, ``045 = 333``, ``073 = 375``, ``079 = 279`` (linked, training) and test ``IDRiD_064``
(= training ``IDRiD_118``, dropped).
"""

from __future__ import annotations

from pathlib import Path

from mgll.data.adapters.official_split import hold_out_val, link_identical
from mgll.data.records import Record, RecordSet, build_levels
from mgll.data.tables import read_table
from mgll.errors import DataError

GRADING = "B. Disease Grading"
SETS = {"train": ("Training Set", "Training Labels"), "test": ("Testing Set", "Testing Labels")}
IMAGE_COLUMN, GRADE_COLUMN, RISK_COLUMN = "Image name", "Retinopathy grade", "Risk of macular edema"
LEVEL_NAMES = ["finding", "referable_dr", "dr_grade", "dme_risk", "grading"]

DR_GRADES = [
    "no diabetic retinopathy",
    "mild non-proliferative diabetic retinopathy",
    "moderate non-proliferative diabetic retinopathy",
    "severe non-proliferative diabetic retinopathy",
    "proliferative diabetic retinopathy",
]
DME_RISKS = [
    "no diabetic macular edema risk",
    "hard exudates away from the macula",
    "hard exudates near the macula",
]
NO_FINDING, DR, DME = "no diabetic eye disease", "diabetic retinopathy", "diabetic macular edema"
FINDINGS = [NO_FINDING, DR, DME]
REFERABLE = ["no referable diabetic retinopathy", "referable diabetic retinopathy"]
# The finest level: the whole grading of a photo in one phrase (both axes; 15 combinations).
GRADINGS = [f"{grade} and {risk}" for grade in DR_GRADES for risk in DME_RISKS]
PROMPTS = {
    NO_FINDING: "A fundus photograph without diabetic eye disease.",
    REFERABLE[0]: "A fundus photograph without referable diabetic retinopathy.",
    REFERABLE[1]: "A fundus photograph with referable diabetic retinopathy.",
    **{grade: f"A fundus photograph with {grade}." for grade in DR_GRADES[1:]},
    DR_GRADES[0]: "A fundus photograph without diabetic retinopathy.",
    DME_RISKS[0]: "A fundus photograph without hard exudates: no risk of macular edema.",
    DME_RISKS[1]: "A fundus photograph with hard exudates farther than one disc diameter from "
    "the macula.",
    DME_RISKS[2]: "A fundus photograph with hard exudates within one disc diameter of the "
    "macula: diabetic macular edema.",
}


def _grading_folder(path: Path) -> Path | None:
    """``path`` itself or its ``B. Disease Grading`` folder, if it holds the official layout."""
    for folder in (path, path / GRADING):
        if folder.is_dir() and any(folder.glob(f"*/*{SETS['train'][1]}*.csv")):
            return folder
    return None


def detect(path: Path) -> bool:
    """A folder holding (or being) ``B. Disease Grading`` with the training label file."""
    return path.is_dir() and _grading_folder(path) is not None


def _one(folder: Path, pattern: str, what: str) -> Path:
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        raise DataError(
            f"{folder}: expected one {what} ({pattern}), found {len(found)}; is this IDRiD's "
            f"official '{GRADING}' layout?"
        )
    return found[0]


def _grade(value: str, top: int, file: Path, row: int, column: str) -> int:
    text = value.strip()
    if not text.isdigit() or int(text) > top:
        raise DataError(
            f"{file}: row {row}, column {column!r}: {value!r} is not a grade 0-{top}; fix the "
            "row or restore the released label file"
        )
    return int(text)


def _records(folder: Path, split: str, result: RecordSet) -> None:
    """Append the records of one official set (``train`` or ``test``)."""
    images_name, labels_name = SETS[split]
    if split == "test" and not any(folder.glob(f"*/*{labels_name}*.csv")):
        return  # a copy without the testing set: training records only
    table_file = _one(folder, f"*/*{labels_name}*.csv", f"'{labels_name}' file")
    images = _one(folder, f"*/*{images_name}", f"'{images_name}' folder")
    table = read_table(table_file)
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in (IMAGE_COLUMN, GRADE_COLUMN, RISK_COLUMN) if c not in table.columns]
    if missing:
        raise DataError(f"{table_file}: column(s) {missing} not found; is this IDRiD's label file?")
    on_disk = {p.stem: p for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")}
    for row, values in enumerate(table.to_dict("records"), start=2):
        name = str(values[IMAGE_COLUMN]).strip()
        if not name:
            continue  # a blank line
        image = on_disk.get(name)
        if image is None:
            result.exclude(f"listed in {table_file.name} but no image file", name)
            continue
        grade = _grade(values[GRADE_COLUMN], 4, table_file, row, GRADE_COLUMN)
        risk = _grade(values[RISK_COLUMN], 2, table_file, row, RISK_COLUMN)
        labels = _labels(grade, risk)
        texts = [_finding_text(labels[0])] + [PROMPTS[level[0]] for level in labels[1:4]]
        texts.append(f"A fundus photograph with {labels[4][0]}.")
        result.records.append(
            Record(
                image=image,
                texts=[[text] for text in texts],
                labels=labels,
                # Both sets number their photos from IDRiD_001: the set keeps the ids apart.
                patient_id=f"{split}/{image.stem}",
                metadata={"split": split, "set": images_name},
            )
        )


def _finding_text(findings: list[str]) -> str:
    """One sentence naming every finding of a photo (the multi-label level's text)."""
    if findings == [NO_FINDING]:
        return PROMPTS[NO_FINDING]
    return f"A fundus photograph with {' and '.join(findings)}."


def _labels(grade: int, risk: int) -> list[list[str]]:
    """The four levels' labels of a photo with DR ``grade`` and DME ``risk``."""
    finding = [name for name, present in ((DR, grade >= 1), (DME, risk >= 1)) if present]
    return [
        finding or [NO_FINDING],
        [REFERABLE[int(grade >= 2)]],
        [DR_GRADES[grade]],
        [DME_RISKS[risk]],
        [GRADINGS[3 * grade + risk]],
    ]


def load(path: str | Path, *, val_fraction: float = 0.1, seed: int = 0) -> RecordSet:
    """Records of an IDRiD disease-grading folder. Options: ``val_fraction`` (share of the
    training eyes held out as ``val``, default 0.1) and ``seed`` (of that draw, default 0)."""
    path = Path(path)
    if not 0.0 <= float(val_fraction) < 1.0:
        raise DataError(f"idrid adapter: val_fraction must be in [0, 1), got {val_fraction}")
    folder = _grading_folder(path)
    if folder is None:
        raise DataError(
            f"{path}: no IDRiD '{GRADING}' layout found (a '2. Groundtruths' folder with the "
            "Training Labels .csv); point data.path at the folder holding it"
        )
    result = RecordSet(levels=[], records=[], source=str(path))
    _records(folder, "train", result)
    _records(folder, "test", result)
    link_identical(result, SETS["train"][0])
    hold_out_val(result, float(val_fraction), int(seed))
    result.levels = build_levels(
        LEVEL_NAMES,
        result.records,
        multi_label=[True, False, False, False, False],
        vocabularies=[FINDINGS, REFERABLE, DR_GRADES, DME_RISKS, GRADINGS],
    )
    return result
