"""The downstream task: level selection, --classes, task types and label fractions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mgll.data.records import LevelInfo, Record, RecordSet
from mgll.eval.task import EvalData, TaskError, build_task, label_fraction_rows


def _records() -> RecordSet:
    grades = ["0", "1", "2", "3", "0", "2"]
    findings = [["a"], ["a", "b"], [], ["c"], ["b"], ["a"]]
    records = [
        Record(Path(f"/x/{i}.png"), [["t"], ["t"]], [[g], f], patient_id=f"p{i // 2}")
        for i, (g, f) in enumerate(zip(grades, findings, strict=True))
    ]
    levels = [LevelInfo("grade", ["0", "1", "2", "3"]), LevelInfo("finding", ["a", "b", "c"], True)]
    return RecordSet(levels=levels, records=records, source="/x")


def test_levels_become_typed_tasks():
    task, y, usable = build_task(_records(), "grade")
    assert task.type == "multiclass" and task.ordinal and task.classes == ["0", "1", "2", "3"]
    assert y.argmax(1).tolist() == [0, 1, 2, 3, 0, 2] and usable.all()
    task, y, usable = build_task(_records(), "finding")
    assert task.type == "multilabel" and not task.ordinal
    assert y.tolist()[1] == [1, 1, 0] and usable.tolist() == [True, True, False, True, True, True]


def test_classes_restrict_and_merge():
    task, y, usable = build_task(_records(), "grade", classes="0,1+2+3=sick")
    assert task.type == "binary" and task.classes == ["0", "sick"]
    assert task.merged == {"sick": ["1", "2", "3"]}
    assert y[:, 1].tolist() == [0, 1, 1, 1, 0, 1]
    task, y, usable = build_task(_records(), "grade", classes="0,3")
    assert usable.tolist() == [True, False, False, True, True, False]  # grades 1, 2 left out
    with pytest.raises(TaskError, match=r"'9' is not a class of level 'grade'"):
        build_task(_records(), "grade", classes="0,9")
    with pytest.raises(TaskError, match=r"level 'stage' does not exist in /x; .*grade, finding"):
        build_task(_records(), "stage")


def test_label_fractions_draw_whole_patients_and_nest():
    records = RecordSet(
        levels=[LevelInfo("g", ["0", "1"])],
        records=[
            Record(Path(f"/x/{i}.png"), [["t"]], [[str(i % 2)]], f"p{i // 3}") for i in range(60)
        ],
        source="/x",
    )
    task, y, _ = build_task(records, "g")
    rows = {"train": np.arange(60), "val": np.arange(0), "test": np.arange(0)}
    data = EvalData(records, Path("/x"), task, y, rows, {}, "x")
    small = label_fraction_rows(data, 0.1, seed=3)
    large = label_fraction_rows(data, 0.5, seed=3)
    assert len(small) == 6 and len(large) == 30  # 2 and 10 of the 20 patients, 3 images each
    assert set(small) <= set(large)
    patients = data.patients(small)
    assert all(patients.count(p) == 3 for p in patients)
    assert label_fraction_rows(data, 0.1, seed=4).tolist() != small.tolist()
    with pytest.raises(TaskError, match="not in"):
        label_fraction_rows(data, 0.0, seed=0)
