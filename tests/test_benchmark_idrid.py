"""The benchmark's IDRiD rows on the shipped copy: the official split, the paper's numbers
beside, and the test copy of a training photo never scored as unseen."""

from __future__ import annotations

from collections import Counter

import pytest

from data_fixtures import require_shared
from mgll.benchmark.protocols import load_task_data
from mgll.benchmark.tasks import PAPER_TASKS


@pytest.mark.parametrize(
    ("name", "level", "classes", "paper"),
    [("idrid-dr", "dr_grade", 5, (76.74, 82.57)), ("idrid-dme", "dme_risk", 3, (73.34, 86.17))],
)
def test_idrid_rows_read_the_adapter_with_the_papers_fine_tune_numbers(name, level, classes, paper):
    task = PAPER_TASKS[name]
    assert (task.source, task.data, task.level, task.split) == (
        "idrid",
        "idrid",
        level,
        {"mode": "source"},
    )
    # METHOD.md section 6: fine-tuned AUC, CLIP and MGLL (no probe numbers for IDRiD)
    assert task.paper_value("finetune", "CLIP") == pytest.approx(paper[0] / 100)
    assert task.paper_value("finetune") == pytest.approx(paper[1] / 100)
    assert task.paper_value("probe") is None


@pytest.mark.shared_data
@pytest.mark.parametrize(("name", "classes"), [("idrid-dr", 5), ("idrid-dme", 3)])
def test_idrid_rows_on_the_shipped_copy(name, classes):
    root = require_shared("idrid").parent
    data = load_task_data(PAPER_TASKS[name], root)
    assert data.task.type == "multiclass" and len(data.task.classes) == classes
    records = data.records.records
    test = [records[int(i)] for i in data.rows["test"]]
    training = [records[int(i)] for s in ("train", "val") for i in data.rows[s]]
    assert len(test) == 102 and len(training) == 413
    assert {r.metadata["set"] for r in test} == {"Testing Set"}
    assert {r.metadata["set"] for r in training} == {"Training Set"}
    assert "IDRiD_064" not in {r.image.stem for r in test}  # = training IDRiD_118
    # no eye on both sides
    assert not {r.patient_id for r in test} & {r.patient_id for r in training}
    # the test labels are the released file's (../shared/data/README.md counts), less IDRiD_064
    released = {"idrid-dr": [34, 5, 32, 19, 13], "idrid-dme": [45, 10, 48]}[name]
    table = root / "idrid/B. Disease Grading/2. Groundtruths"
    rows = next(table.glob("b.*Testing Labels.csv")).read_text().splitlines()
    dropped = next(r.split(",") for r in rows if r.startswith("IDRiD_064"))
    released[int(dropped[1 if name == "idrid-dr" else 2])] -= 1
    counts = Counter(data.y[data.rows["test"]].argmax(1).tolist())
    assert [counts[k] for k in range(classes)] == released


def test_a_benchmark_where_no_task_has_data_fails_and_writes_nothing(tmp_path, capsys):
    from mgll.cli import main

    out = tmp_path / "bench"
    argv = ["benchmark", "--encoder", "random:mgll-rn-tiny-64", "--tasks", "idrid-dr,palm"]
    argv += ["--data-root", str(tmp_path / "empty"), "--output-dir", str(out)]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out.count("missing: ") == 2  # each task says where it was looked for
    err = captured.err.strip()
    assert "\n" not in err and "no task has its data under --data-root" in err
    assert not out.exists()
