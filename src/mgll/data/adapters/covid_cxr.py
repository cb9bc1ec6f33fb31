"""ieee8023 COVID-19 chest X-ray collection (``metadata.csv`` + ``images/``).

Four levels, coarse to fine:

- ``category``: Pneumonia / ARDS / No Finding (multi-label: "COVID-19, ARDS" has two);
- ``type``: Viral / Bacterial / Fungal / Lipoid / No Finding;
- ``organism``: COVID-19, SARS, Streptococcus, Pneumocystis, ...;
- ``notes``: the free-text ``clinical_notes`` (identical notes are positives).

A finding may list several comma-separated terms ("COVID-19, ARDS"); each term contributes
its classes. Later releases write paths ("Pneumonia/Viral/COVID-19"), used as given. A level
a finding does not determine (the organism of "Bacterial") is missing there. Normal images
("No Finding") carry "No Finding" at the first three levels so they form their own
positives. Unusable rows (finding "todo", "Unknown", blank, a term outside the hierarchy, or
an image without a metadata row) are excluded and counted by reason. Only X-ray rows are used.

The image list is ``annotations/annotations.json`` when present (so images it names but the
folder lacks are reported missing), else the files in ``images/``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mgll.data.records import Record, RecordSet, build_levels
from mgll.data.tables import read_table
from mgll.errors import DataError

LEVEL_NAMES = ("category", "type", "organism", "notes")

# term -> (category, type, organism); None = not determined by this term.
FINDING_HIERARCHY: dict[str, tuple[str, str | None, str | None]] = {
    "COVID-19": ("Pneumonia", "Viral", "COVID-19"),
    "SARS": ("Pneumonia", "Viral", "SARS"),
    "MERS": ("Pneumonia", "Viral", "MERS"),
    "Influenza": ("Pneumonia", "Viral", "Influenza"),
    "Varicella": ("Pneumonia", "Viral", "Varicella"),
    "Herpes": ("Pneumonia", "Viral", "Herpes"),
    "Streptococcus": ("Pneumonia", "Bacterial", "Streptococcus"),
    "Klebsiella": ("Pneumonia", "Bacterial", "Klebsiella"),
    "E.Coli": ("Pneumonia", "Bacterial", "E.Coli"),
    "Legionella": ("Pneumonia", "Bacterial", "Legionella"),
    "Chlamydophila": ("Pneumonia", "Bacterial", "Chlamydophila"),
    "Mycoplasma Bacterial Pneumonia": ("Pneumonia", "Bacterial", "Mycoplasma"),
    "Mycoplasma": ("Pneumonia", "Bacterial", "Mycoplasma"),
    "Staphylococcus": ("Pneumonia", "Bacterial", "Staphylococcus"),
    "Nocardia": ("Pneumonia", "Bacterial", "Nocardia"),
    "Bacterial": ("Pneumonia", "Bacterial", None),
    "Pneumocystis": ("Pneumonia", "Fungal", "Pneumocystis"),
    "Aspergillosis": ("Pneumonia", "Fungal", "Aspergillosis"),
    "Lipoid": ("Pneumonia", "Lipoid", None),
    "Pneumonia": ("Pneumonia", None, None),
    "ARDS": ("ARDS", None, None),
    "No Finding": ("No Finding", "No Finding", "No Finding"),
}
UNUSABLE = {"", "todo", "unknown"}

PROMPTS = (
    "A chest X-ray showing {}.",
    "A chest X-ray showing {} pneumonia.",
    "A chest X-ray showing pneumonia caused by {}.",
)


def detect(path: Path) -> bool:
    """A folder with an ieee8023-style metadata.csv (finding + filename columns) and images/."""
    meta = path / "metadata.csv"
    if not (meta.is_file() and (path / "images").is_dir()):
        return False
    with meta.open(encoding="utf-8", errors="replace") as handle:
        header = handle.readline()
    return "finding" in header and "filename" in header


def parse_finding(finding: str) -> tuple[list[str], list[str], list[str]] | str:
    """Class names at category/type/organism for a finding string, or the reason it is unusable.

    Terms are comma-separated. Each is a name from :data:`FINDING_HIERARCHY` or, as in later
    releases of the collection, a path such as "Pneumonia/Viral/COVID-19".
    """
    terms = [t.strip() for t in finding.split(",") if t.strip()]
    if not terms or any(t.lower() in UNUSABLE for t in terms):
        return f"finding {finding or '(blank)'!r} is not a usable label"
    levels: tuple[list[str], list[str], list[str]] = ([], [], [])
    for term in terms:
        if "/" in term:
            parts = [p.strip() or None for p in term.split("/")][:3]
            path = [*parts, None, None][:3]
        elif term in FINDING_HIERARCHY:
            path = list(FINDING_HIERARCHY[term])
        else:
            return (
                f"finding term {term!r} is not in the hierarchy (extend "
                "mgll.data.adapters.covid_cxr.FINDING_HIERARCHY to use it)"
            )
        for g, name in enumerate(path):
            if name is not None and name not in levels[g]:
                levels[g].append(name)
    return levels


def _texts(labels: list[list[str]], notes: str) -> list[list[str]]:
    if labels[0] == ["No Finding"]:
        normal = "A chest X-ray with no finding."
        return [[normal], [normal], [normal], [notes or normal]]
    category = " and ".join("pneumonia" if n == "Pneumonia" else n for n in labels[0])
    texts = [[PROMPTS[0].format(category)]]
    # Every class is named (a co-infection "COVID-19, Streptococcus" has two types, two organisms).
    if labels[1]:
        texts.append([PROMPTS[1].format(" and ".join(n.lower() for n in labels[1]))])
    else:
        texts.append([f"A chest X-ray showing {category} of unspecified type."])
    if labels[2]:
        texts.append([PROMPTS[2].format(" and ".join(labels[2]))])
    else:
        texts.append([f"A chest X-ray showing {category} with no identified organism."])
    # An image without notes reads its finest finding text at the notes level (label missing).
    texts.append([notes] if notes else texts[2])
    return texts


def load(path: str | Path, *, notes: bool = True) -> RecordSet:
    """Records of an ieee8023 covid-cxr folder (see the module docstring).

    Options: ``notes`` (bool, default True) keeps the clinical-notes level.
    """
    path = Path(path)
    keep_notes = bool(notes)
    meta_path = path / "metadata.csv"
    frame = read_table(meta_path)
    for column in ("filename", "finding", "patientid"):
        if column not in frame.columns:
            raise DataError(
                f"{meta_path}: column {column!r} not found; is this an ieee8023 metadata.csv?"
            )
    rows: dict[str, tuple[int, dict[str, str]]] = {}
    for number, row in enumerate(frame.to_dict("records"), start=1):
        if row.get("modality", "X-ray") in ("X-ray", ""):
            rows.setdefault(row["filename"], (number, row))

    annotations = path / "annotations" / "annotations.json"
    if annotations.is_file():
        try:
            with annotations.open(encoding="utf-8") as handle:
                names = [image["file_name"] for image in json.load(handle)["images"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(
                f"{annotations}: not a COCO file with images[].file_name ({exc}); fix or remove "
                "it (the images/ folder is then the image list)"
            ) from exc
    else:
        names = sorted(os.listdir(path / "images"))

    result = RecordSet(levels=[], records=[], source=str(path))
    for name in dict.fromkeys(names):
        if name not in rows:
            result.exclude("no X-ray row in metadata.csv", name)
            continue
        number, row = rows[name]
        finding = row["finding"].strip()
        parsed = parse_finding(finding)
        if isinstance(parsed, str):
            result.exclude(parsed, name)
            continue
        notes = row.get("clinical_notes", "").strip()
        labels = [*parsed, [notes] if notes else []]
        texts = _texts(labels, notes)
        if not keep_notes:
            labels, texts = labels[:3], texts[:3]
        result.records.append(
            Record(
                image=path / "images" / name,
                texts=texts,
                labels=labels,
                patient_id=row["patientid"].strip() or None,
                metadata={
                    "view": row.get("view", ""),
                    "sex": row.get("sex", ""),
                    "finding": finding,
                    "row": number,
                },
            )
        )
    names_used = LEVEL_NAMES if keep_notes else LEVEL_NAMES[:3]
    # A level is multi-label when some finding gives it several classes ("COVID-19, ARDS").
    multi = [any(len(r.labels[g]) > 1 for r in result.records) for g in range(len(names_used))]
    result.levels = build_levels(names_used, result.records, multi_label=multi)
    return result
