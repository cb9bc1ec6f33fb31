"""The MGLL authors' release format and their downstream CSVs (METHOD.md section 2).

Pretraining release: ``<list>_train.txt`` and ``<list>_val.txt`` each list JSON files (one per
line, relative to the list); each JSON file is a list of records with ``ImageID``, ``Disease``
and ``Description``. Two levels: ``disease`` (prompt "This is a fundus image of {Disease}")
and ``description`` (the clinical explanation). Labels are the strings themselves, as in the
authors' code, unless ``disease_separator`` splits a Disease into several classes. Images are
files or ``.npz`` archives with the key ``image``, found relative to the JSON file, then to the
folder (or ``image_root``). The list a record came from is its split (``split: source``).

Downstream sets: ``<name>_Train.csv``, ``<name>_Val.csv``, ``<name>_Test.csv``; the first
column is the image path, the rest are labels. Several columns that are all 0/1 form one
multi-label level over the column names (RFMiD); otherwise each column is its own single-label
level (IDRiD: DR grade, DME risk).
"""

from __future__ import annotations

import json
from pathlib import Path

from mgll.data.records import Record, RecordSet, build_levels
from mgll.data.tables import read_table
from mgll.errors import DataError


def _lists(path: Path, prefix: str | None) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for split in ("train", "val", "test"):
        pattern = f"{prefix}_{split}.txt" if prefix else f"*_{split}.txt"
        match = sorted(path.glob(pattern))
        if match:
            found[split] = match[0]
    return found


def detect(path: Path) -> bool:
    """A folder with ``*_train.txt`` whose first line names a .json file."""
    lists = _lists(path, None) if path.is_dir() else {}
    if "train" not in lists:
        return False
    with lists["train"].open(encoding="utf-8") as handle:
        first = next((line.strip() for line in handle if line.strip()), "")
    return first.lower().endswith(".json")


def detect_downstream(path: Path) -> bool:
    """A folder with ``*_Train.csv``."""
    return path.is_dir() and any(path.glob("*_Train.csv"))


def _image_path(image_id: str, json_file: Path, root: Path, image_root: Path | None) -> Path:
    candidate = Path(image_id)
    if candidate.is_absolute():
        return candidate
    for base in [b for b in (image_root, json_file.parent, root) if b is not None]:
        if (base / candidate).exists():
            return base / candidate
    # Not found anywhere: keep the first location so `mgll data check` names a real place.
    return (image_root or json_file.parent) / candidate


def load(
    path: str | Path,
    *,
    list_name: str | None = None,
    disease_separator: str | None = None,
    image_root: str | None = None,
    modality: str = "fundus",
) -> RecordSet:
    """Records of an MGLL release folder. Options: ``list_name`` (the <list> prefix, default the
    first ``*_train.txt``), ``disease_separator``, ``image_root``, ``modality`` ("fundus")."""
    path = Path(path)
    prefix, separator, modality = list_name, disease_separator, str(modality)
    image_root = Path(image_root) if image_root else None
    lists = _lists(path, prefix)
    if "train" not in lists:
        raise DataError(
            f"{path}: no {prefix or '<list>'}_train.txt found; is this an MGLL release folder?"
        )
    result = RecordSet(levels=[], records=[], source=str(path))
    for split, list_file in lists.items():
        with list_file.open(encoding="utf-8") as handle:
            json_names = [line.strip() for line in handle if line.strip()]
        for line_number, name in enumerate(json_names, start=1):
            json_file = Path(name) if Path(name).is_absolute() else list_file.parent / name
            try:
                with json_file.open(encoding="utf-8") as handle:
                    items = json.load(handle)
            except OSError as exc:
                raise DataError(
                    f"{list_file} line {line_number}: cannot read {json_file} "
                    f"({exc.strerror or exc})"
                ) from exc
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{json_file}: not valid JSON ({exc}); listed at {list_file} line {line_number}"
                ) from exc
            if not isinstance(items, list):
                raise DataError(
                    f"{json_file}: expected a list of records with ImageID, Disease, Description"
                )
            for k, item in enumerate(items):
                if not isinstance(item, dict):
                    result.exclude("record is not a JSON object", f"{json_file.name}[{k}]")
                    continue
                missing = [
                    key for key in ("ImageID", "Disease") if not str(item.get(key) or "").strip()
                ]
                if missing:
                    result.exclude(f"record without {'/'.join(missing)}", f"{json_file.name}[{k}]")
                    continue
                disease = str(item["Disease"]).strip()
                classes = [d.strip() for d in disease.split(separator)] if separator else [disease]
                description = item.get("Description") or ""
                descriptions = (
                    [str(d).strip() for d in description]
                    if isinstance(description, list)
                    else [str(description).strip()]
                )
                descriptions = [d for d in descriptions if d]
                prompt = f"This is a {modality} image of {disease}"
                result.records.append(
                    Record(
                        image=_image_path(
                            str(item["ImageID"]).strip(), json_file, path, image_root
                        ),
                        texts=[[prompt], descriptions or [prompt]],
                        labels=[[c for c in classes if c], descriptions[:1]],
                        patient_id=str(item.get("PatientID") or "").strip() or None,
                        metadata={"split": split, "json": str(json_file), "item": k},
                    )
                )
    multi = any(len(r.labels[0]) > 1 for r in result.records)
    result.levels = build_levels(
        ["disease", "description"], result.records, multi_label=[multi, False]
    )
    return result


def load_downstream(
    path: str | Path,
    *,
    name: str | None = None,
    image_root: str | None = None,
    prompt: str = "This is a fundus image of {label}.",
) -> RecordSet:
    """Records of a downstream set (``<name>_Train/_Val/_Test.csv``). Options: ``name`` (the
    prefix, default the first ``*_Train.csv``), ``image_root``, ``prompt`` (template with
    {label}, default "This is a fundus image of {label}.")."""
    path = Path(path)
    image_root = Path(image_root) if image_root else path
    prompt = str(prompt)
    if name is None:
        trains = sorted(path.glob("*_Train.csv"))
        if not trains:
            raise DataError(
                f"{path}: no <name>_Train.csv found; is this an MGLL downstream folder?"
            )
        name = trains[0].name[: -len("_Train.csv")]
    frames = {}
    for split, suffix in (("train", "Train"), ("val", "Val"), ("test", "Test")):
        file = path / f"{name}_{suffix}.csv"
        if file.is_file():
            frames[split] = (file, read_table(file))
    if "train" not in frames:
        found = sorted(p.name for p in path.glob("*_Train.csv"))
        raise DataError(
            f"mgll-downstream adapter: {path / f'{name}_Train.csv'} not found; set the option "
            f"name to one of {[f[: -len('_Train.csv')] for f in found]}"
        )
    first_file, first = frames["train"]
    if first.shape[1] < 2:
        raise DataError(
            f"{first_file}: needs an image path column followed by at least one label column"
        )
    label_cols = list(first.columns[1:])
    for file, frame in frames.values():
        if list(frame.columns[1:]) != label_cols:
            raise DataError(
                f"{file}: label columns {list(frame.columns[1:])} differ from "
                f"{first_file}'s {label_cols}"
            )
    binary = len(label_cols) > 1 and all(
        set(frame[c].str.strip().unique()) <= {"0", "1", "0.0", "1.0"}
        for _, frame in frames.values()
        for c in label_cols
    )
    result = RecordSet(levels=[], records=[], source=str(first_file))
    for split, (file, frame) in frames.items():
        image_col = frame.columns[0]
        for number, row in enumerate(frame.to_dict("records"), start=1):
            if binary:
                level_labels = [[c for c in label_cols if row[c].strip() in ("1", "1.0")]]
            else:
                level_labels = [[row[c].strip()] if row[c].strip() else [] for c in label_cols]
            texts = [
                [prompt.format(label=", ".join(labels) if labels else "no finding")]
                for labels in level_labels
            ]
            result.records.append(
                Record(
                    image=image_root / row[image_col].strip(),
                    texts=texts,
                    labels=level_labels,
                    metadata={"split": split, "row": number, "table": file.name},
                )
            )
    names = ["labels"] if binary else label_cols
    # 0/1 columns keep the table's column order as class ids, as the authors' heads do.
    vocabularies = [label_cols] if binary else None
    result.levels = build_levels(
        names, result.records, multi_label=[binary] * len(names), vocabularies=vocabularies
    )
    return result
