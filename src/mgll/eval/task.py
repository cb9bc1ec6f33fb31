"""The downstream task: one granularity level of a dataset, its classes and its split.

Records come from :func:`mgll.data.load_records` (any adapter or spec), missing image files are
dropped as pretraining drops them, and the split is made on the *whole* record set before the
level is selected, exactly as ``mgll pretrain`` does. So with the run's ``data.split`` settings
and seed (the default when the encoder is a run pretrained on the same data) the test patients
are the pretraining run's test patients, never seen in pretraining.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mgll.data.build import drop_missing_images, load_records, split_records
from mgll.data.config import SplitConfig
from mgll.data.records import RecordSet
from mgll.data.spec import is_spec_path
from mgll.data.splits import SPLIT_NAMES, patient_key, write_split_file
from mgll.errors import UserError
from mgll.schema import from_mapping


class TaskError(UserError, ValueError):
    """The requested task cannot be built from the data (the message says what to change)."""


@dataclass
class Task:
    """One level as a classification task: ``type`` is binary, multiclass or multilabel."""

    level: str
    type: str
    classes: list[str]
    ordinal: bool = False
    merged: dict[str, list[str]] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """The ``task`` entry of results.json."""
        return {
            "level": self.level,
            "type": self.type,
            "classes": list(self.classes),
            "ordinal": self.ordinal,
            "merged": dict(self.merged),
        }


@dataclass
class EvalData:
    """Records of the task, split, with the label matrix ``y`` (N, C) aligned to ``records``.

    ``records`` holds every record of the dataset (all splits, all levels; what features are
    extracted and cached for); ``rows[split]`` are indices into it of the records usable for
    the task (a label at the level, in the kept classes).
    """

    records: RecordSet
    folder: Path
    task: Task
    y: np.ndarray
    rows: dict[str, np.ndarray]
    split_info: dict[str, Any]
    source: str
    split_indices: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def from_rows(
        cls,
        records: RecordSet,
        folder: Path,
        task: Task,
        y: np.ndarray,
        rows: Mapping[str, Sequence[int]],
        *,
        source: str,
        split_info: Mapping[str, Any] | None = None,
        split_indices: Mapping[str, Sequence[int]] | None = None,
    ) -> EvalData:
        """The task on rows chosen by the caller (a cross-validation fold, hand-made rows): a
        split missing from ``rows`` is empty; ``split_info`` gains the image and patient counts
        of every split; ``split_indices`` (what split.csv lists) defaults to ``rows``."""
        full = {name: np.asarray(rows.get(name, ()), dtype=np.int64) for name in SPLIT_NAMES}
        info = dict(split_info or {})
        info["n_images"] = {name: len(r) for name, r in full.items()}
        info["n_patients"] = {
            name: len({patient_key(records.records[int(i)]) for i in r}) for name, r in full.items()
        }
        indices = split_indices if split_indices is not None else full
        return cls(
            records=records,
            folder=folder,
            task=task,
            y=y,
            rows=full,
            split_info=info,
            source=source,
            split_indices={name: [int(i) for i in indices.get(name, ())] for name in SPLIT_NAMES},
        )

    def image_ids(self, rows: Sequence[int]) -> list[str]:
        """Image identifiers as written in predictions.csv (relative to the dataset folder)."""
        out = []
        for i in rows:
            image = Path(self.records.records[i].image)
            out.append(
                image.relative_to(self.folder).as_posix()
                if image.is_relative_to(self.folder)
                else str(image)
            )
        return out

    def patients(self, rows: Sequence[int]) -> list[str]:
        """Patient grouping keys (records without a patient id are their own patient)."""
        return [patient_key(self.records.records[i]) for i in rows]

    def patient_ids(self, rows: Sequence[int]) -> list[str]:
        """Patient ids as written in predictions.csv ('' when the source has none)."""
        return [self.records.records[i].patient_id or "" for i in rows]

    def write_split(self, path: Path) -> None:
        """The split used (all records of the dataset) as a CSV of image, patient_id, split."""
        split = {name: [int(i) for i in self.split_indices[name]] for name in SPLIT_NAMES}
        write_split_file(path, self.records.records, split, root=self.folder)


def parse_classes(text: str | None) -> list[tuple[str, list[str]]] | None:
    """``--classes``: comma-separated names to keep; ``A+B=NAME`` merges A and B into NAME
    (``A+B`` alone is named "A+B"). None keeps every class of the level."""
    if not text:
        return None
    groups = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        members, _, name = item.partition("=")
        parts = [p.strip() for p in members.split("+") if p.strip()]
        if not parts:
            raise TaskError(f"--classes: {item!r} names no class")
        groups.append((name.strip() or "+".join(parts), parts))
    return groups


def _is_ordered_numeric(names: Sequence[str]) -> bool:
    try:
        values = [float(n) for n in names]
    except ValueError:
        return False
    return values == sorted(values)


def build_task(
    records: RecordSet,
    level: str,
    classes: str | None = None,
    ordinal: bool | None = None,
) -> tuple[Task, np.ndarray, np.ndarray]:
    """The task of ``level`` and, per record, its label row and whether it is usable.

    Returns (task, y (N, C), usable (N,) bool). A record without a label at the level, or whose
    labels all fall outside the kept classes (single-label levels), is not usable.
    """
    names = [lv.name for lv in records.levels]
    if level not in names:
        raise TaskError(
            f"level {level!r} does not exist in {records.source}; its levels are: "
            f"{', '.join(names)}"
        )
    g = names.index(level)
    info = records.levels[g]
    groups = parse_classes(classes)
    if groups is None:
        groups = [(name, [name]) for name in info.vocabulary]
    known = set(info.vocabulary)
    for _, members in groups:
        for member in members:
            if member not in known:
                shown = info.vocabulary[:20]
                raise TaskError(
                    f"--classes: {member!r} is not a class of level {level!r} (its classes: "
                    f"{shown}{' ...' if len(info.vocabulary) > 20 else ''})"
                )
    column_of = {m: k for k, (_, members) in enumerate(groups) for m in members}
    class_names = [name for name, _ in groups]
    if len(class_names) < 2 and not info.multi_label:
        raise TaskError(f"level {level!r}: a classification task needs at least 2 classes")
    n = len(records.records)
    y = np.zeros((n, len(class_names)), dtype=np.int8)
    usable = np.zeros(n, dtype=bool)
    for i, record in enumerate(records.records):
        labels = record.labels[g]
        cols = {column_of[name] for name in labels if name in column_of}
        if info.multi_label:
            usable[i] = bool(labels)  # kept: a record with other findings is a negative
        else:
            usable[i] = len(cols) == 1
        for c in cols:
            y[i, c] = 1
    if info.multi_label:
        task_type = "multilabel"
    else:
        task_type = "binary" if len(class_names) == 2 else "multiclass"
    if ordinal is None:
        ordinal = task_type == "multiclass" and _is_ordered_numeric(class_names)
    merged = {name: members for name, members in groups if members != [name]}
    task = Task(level, task_type, class_names, bool(ordinal), merged)
    return task, y, usable


def default_split(encoder_config: Mapping[str, Any] | None, folder: Path) -> dict[str, Any]:
    """The split settings evaluation uses when the user gives none.

    A run pretrained on this dataset folder: its ``data.split`` and ``train.seed`` (so its test
    patients stay unseen). Otherwise the source's own split when every record has one, else the
    default patient-level split (0.8/0.1/0.1, seed 0).
    """
    if encoder_config is not None:
        data_cfg = encoder_config.get("data", {})
        run_path = data_cfg.get("path")
        if run_path is not None and Path(run_path).name == folder.name:
            return {
                "settings": dict(data_cfg.get("split") or {}),
                "seed": int(encoder_config.get("train", {}).get("seed", 0)),
                "from": "the pretraining run's data.split",
            }
    return {"settings": None, "seed": 0, "from": "default"}


def load_eval_data(
    data: str | Path,
    level: str,
    *,
    data_root: str | Path | None = None,
    data_format: str | None = None,
    options: Mapping[str, Any] | None = None,
    classes: str | None = None,
    ordinal: bool | None = None,
    split: Mapping[str, Any] | None = None,
    split_seed: int | None = None,
    encoder_config: Mapping[str, Any] | None = None,
) -> EvalData:
    """Load ``data`` (a dataset folder or spec file; relative to ``data_root`` first), select
    ``level`` as the task and split it.

    ``split`` is a ``data.split`` mapping ({mode: source}, {file: ...} or fractions with seed);
    None takes :func:`default_split` (the run's split when ``encoder_config`` is a run
    pretrained on this folder; else ``mode: source`` when the source ships one).
    """
    source = data_format
    path: str | Path | None = data
    if is_spec_path(data):  # a spec names its own paths: no data.path to warn about
        source, path = data_format or str(data), None
    records, folder = load_records(source, path, data_root=data_root, options=options)
    records, missing = drop_missing_images(records)  # as pretraining does (counted below)
    if not records.records:
        raise TaskError(f"{records.source}: no image file of the dataset exists")
    task, y, usable = build_task(records, level, classes, ordinal)

    chosen = default_split(encoder_config, folder)
    if split is not None:
        chosen = {"settings": dict(split), "seed": 0, "from": "user"}
    elif chosen["from"] == "default" and all(
        r.metadata.get("split") in SPLIT_NAMES for r in records.records
    ):
        chosen["settings"] = {"mode": "source"}
    seed = int(split_seed if split_seed is not None else chosen["seed"])
    settings = from_mapping(SplitConfig, chosen["settings"], "data.split")
    indices = split_records(records, settings, seed, data_root, folder)
    rows = {
        name: np.asarray([i for i in indices[name] if usable[i]], dtype=np.int64)
        for name in SPLIT_NAMES
    }
    split_info = {
        "from": chosen["from"],
        "settings": chosen["settings"] or {"train": 0.8, "val": 0.1, "test": 0.1},
        "seed": seed,
        "missing_image_files": len(missing),
    }
    result = EvalData.from_rows(
        records,
        folder,
        task,
        y,
        rows,
        source=str(data),
        split_info=split_info,
        split_indices=indices,
    )
    check_split(result)
    return result


def check_split(data: EvalData) -> None:
    """TaskError when the test split cannot score the task (empty, or a single class)."""
    for name in ("train", "test"):
        if len(data.rows[name]) == 0:
            raise TaskError(
                f"the {name} split of {data.source} has no image labelled at level "
                f"{data.task.level!r}; change the split (--split-* options) or the level"
            )
    test_y = data.y[data.rows["test"]]
    if data.task.type == "multilabel":
        defined = [(0 < test_y[:, c].sum() < len(test_y)) for c in range(test_y.shape[1])]
        if not any(defined):
            raise TaskError(
                f"the test split ({len(test_y)} images) has no label with both positive and "
                "negative images: no AUC can be computed; use a larger test split"
            )
    else:
        present = [data.task.classes[c] for c in range(test_y.shape[1]) if test_y[:, c].any()]
        if len(present) < 2:
            raise TaskError(
                f"the test split ({len(test_y)} images) holds a single class "
                f"({present[0] if present else 'none'}) of level {data.task.level!r}: no "
                "metric can separate classes; use a larger test fraction or merge classes "
                "with --classes"
            )


MIN_TEST_PER_CLASS = 2
"""Held-out images a class needs on average to be a label rather than free text: a level with
more classes than ``n / 2`` of ``n`` held-out images has mostly distinct values (the demo
retrieves such a level instead of probing it)."""


def scorable_classes(n_test: int) -> int:
    """The most classes ``n_test`` held-out images score as a label (:data:`MIN_TEST_PER_CLASS`
    each on average)."""
    return n_test // MIN_TEST_PER_CLASS


def check_scorable(data: EvalData) -> None:
    """TaskError (one line) when fewer than half of the level's classes can be scored on the
    test split (a class needs a positive and a negative test image): the macro AUC would leave
    most out, and probing or fine-tuning such a level (free text) runs long for nothing."""
    test_y = data.y[data.rows["test"]]
    positives = test_y.sum(0)
    scored = int(((positives > 0) & (positives < len(test_y))).sum())
    classes, level = test_y.shape[1], data.task.level
    if 2 * scored < classes:
        raise TaskError(
            f"level {level!r}: only {scored} of its {classes} classes have a test image "
            f"({len(test_y)} test images), so a classifier's macro AUC would leave most out; a "
            "level of mostly distinct values is free text: score it with mgll retrieve --level "
            f"{level}, or merge classes with --classes"
        )


def label_fraction_rows(
    data: EvalData, fraction: float, seed: int, split: str = "train"
) -> np.ndarray:
    """A seeded draw of ``fraction`` of the ``split``'s patients (all their images), at least
    one patient; the patients are drawn in a shuffled order, so smaller fractions are subsets
    of larger ones for the same seed."""
    if not 0 < fraction <= 1:
        raise TaskError(f"--label-fraction: {fraction} is not in (0, 1]")
    rows = data.rows[split]
    if fraction == 1:
        return rows
    keys = data.patients(rows)
    patients = sorted(set(keys))
    order = np.random.default_rng(seed).permutation(len(patients))
    take = {patients[p] for p in order[: max(1, math.ceil(fraction * len(patients)))]}
    return np.asarray([r for r, k in zip(rows, keys, strict=True) if k in take], dtype=np.int64)
