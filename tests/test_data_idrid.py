"""The IDRiD adapter: the official layout on a tiny synthetic folder, and the real shipped copy."""

from __future__ import annotations

import hashlib
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_fixtures import require_shared, write_jpeg
from mgll.data import detect_adapter, get_adapter, prepare_data
from mgll.errors import DataError

GRADING = "B. Disease Grading"
HEADER = "Image name,Retinopathy grade,Risk of macular edema ,,,,,,,,,"


def _labels_csv(path: Path, rows: list[tuple[str, int, int]]) -> None:
    """The released format: trailing-space header, empty trailing columns, CRLF."""
    lines = [HEADER] + [f"{name},{grade},{risk},,,,,,,,," for name, grade, risk in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode())


def _idrid(root: Path) -> Path:
    """6 training photos (IDRiD_005 = IDRiD_002 byte for byte), 3 testing photos named like
    training ones, as in the release (testing IDRiD_003 = training IDRiD_004); grades and risks
    chosen to hit every level's classes."""
    images = root / GRADING / "1. Original Images"
    truths = root / GRADING / "2. Groundtruths"
    train = [("IDRiD_001", 0, 0), ("IDRiD_002", 1, 0), ("IDRiD_003", 2, 1)]
    train += [("IDRiD_004", 3, 2), ("IDRiD_005", 1, 0), ("IDRiD_006", 4, 0)]
    test = [("IDRiD_001", 0, 2), ("IDRiD_002", 2, 0), ("IDRiD_003", 3, 2)]
    for k, (name, _, _) in enumerate(train + test):
        folder = images / ("a. Training Set" if k < len(train) else "b. Testing Set")
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(k)
        write_jpeg(folder / f"{name}.jpg", rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    shutil.copyfile(
        images / "a. Training Set/IDRiD_002.jpg", images / "a. Training Set/IDRiD_005.jpg"
    )
    shutil.copyfile(
        images / "a. Training Set/IDRiD_004.jpg", images / "b. Testing Set/IDRiD_003.jpg"
    )
    _labels_csv(truths / "a. IDRiD_Disease Grading_Training Labels.csv", train)
    _labels_csv(truths / "b. IDRiD_Disease Grading_Testing Labels.csv", test)
    return root


def test_idrid_levels_labels_split_and_copies(tmp_path):
    folder = _idrid(tmp_path / "idrid")
    assert detect_adapter(folder).name == "idrid"
    assert detect_adapter(folder / GRADING).name == "idrid"  # the grading folder itself
    records = get_adapter("idrid").load(folder, val_fraction=0.25, seed=0)
    names = ["finding", "referable_dr", "dr_grade", "dme_risk", "grading"]
    assert [lv.name for lv in records.levels] == names
    assert [lv.multi_label for lv in records.levels] == [True, False, False, False, False]
    assert [len(lv.vocabulary) for lv in records.levels] == [3, 2, 5, 3, 15]
    by_name = {
        ("test:" if r.metadata["split"] == "test" else "") + r.image.stem: r
        for r in records.records
    }
    # The test copy of a training photo is dropped, naming both; the training photo stays.
    assert "test:IDRiD_003" not in by_name and "IDRiD_004" in by_name
    assert records.excluded_examples[next(iter(records.excluded))] == [
        "IDRiD_003.jpg = IDRiD_004.jpg"
    ]
    # Same-named photos of the two sets are different eyes; copies within training are one.
    assert by_name["test:IDRiD_001"].patient_id != by_name["IDRiD_001"].patient_id
    assert by_name["IDRiD_005"].patient_id == by_name["IDRiD_002"].patient_id
    # Labels by hand: grade 3 risk 2 -> both findings, referable, severe NPDR, near the macula.
    assert by_name["IDRiD_004"].labels == [
        ["diabetic retinopathy", "diabetic macular edema"],
        ["referable diabetic retinopathy"],
        ["severe non-proliferative diabetic retinopathy"],
        ["hard exudates near the macula"],
        ["severe non-proliferative diabetic retinopathy and hard exudates near the macula"],
    ]
    assert by_name["IDRiD_001"].labels[:2] == [
        ["no diabetic eye disease"],
        ["no referable diabetic retinopathy"],
    ]
    # Grade 1 is DR but not referable; risk 2 without DR is macular edema only.
    assert by_name["IDRiD_002"].labels[:2] == [
        ["diabetic retinopathy"],
        ["no referable diabetic retinopathy"],
    ]
    assert by_name["test:IDRiD_001"].labels[0] == ["diabetic macular edema"]
    assert by_name["IDRiD_003"].labels[3] == ["hard exudates away from the macula"]
    assert by_name["IDRiD_001"].texts[4] == [
        "A fundus photograph with no diabetic retinopathy and no diabetic macular edema risk."
    ]
    # One text per level; the multi-label level names every finding in one sentence.
    assert by_name["IDRiD_004"].texts[0] == [
        "A fundus photograph with diabetic retinopathy and diabetic macular edema."
    ]
    assert all(len(t) == 1 for r in records.records for t in r.texts)
    # Official split: training -> train + val (whole eyes), testing -> test.
    splits = {n: r.metadata["split"] for n, r in by_name.items()}
    assert {splits["test:IDRiD_001"], splits["test:IDRiD_002"]} == {"test"}
    training = [n for n in splits if not n.startswith("test:")]
    assert {splits[n] for n in training} == {"train", "val"}
    assert splits["IDRiD_005"] == splits["IDRiD_002"]
    val_eyes = {by_name[n].patient_id for n in training if splits[n] == "val"}
    assert len(val_eyes) == round(0.25 * 5)  # 5 training eyes (6 photos, one copy)


def test_idrid_source_split_through_prepare_data(tmp_path):
    folder = _idrid(tmp_path / "idrid")
    with pytest.warns(UserWarning, match="test copy dropped"):
        data = prepare_data(
            {
                "source": "idrid",
                "path": str(folder),
                "split": {"mode": "source"},
                "cache_dir": False,
            },
            None,
            seed=0,
        )
    records = data.records.records
    names = {s: sorted(records[i].image.stem for i in idx) for s, idx in data.indices.items()}
    assert names["test"] == ["IDRiD_001", "IDRiD_002"]
    assert len(names["train"]) + len(names["val"]) == 6


def test_idrid_bad_input_is_named(tmp_path):
    folder = _idrid(tmp_path / "idrid")
    table = folder / GRADING / "2. Groundtruths" / "a. IDRiD_Disease Grading_Training Labels.csv"
    _labels_csv(table, [("IDRiD_001", 0, 0), ("IDRiD_002", 7, 0)])
    with pytest.raises(DataError, match=r"Training Labels\.csv: row 3, column 'Retinopathy grade'"):
        get_adapter("idrid").load(folder)
    table.write_text("Image,Grade\nIDRiD_001,0\n")
    with pytest.raises(DataError, match=r"column\(s\) \['Image name'"):
        get_adapter("idrid").load(folder)
    with pytest.raises(DataError, match="val_fraction"):
        get_adapter("idrid").load(folder, val_fraction=1.0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no IDRiD 'B\. Disease Grading' layout"):
        get_adapter("idrid").load(tmp_path / "empty")


@pytest.mark.shared_data
def test_idrid_real_copy_counts_and_the_test_copy():
    folder = require_shared("idrid")
    digests: dict[str, list[str]] = {}
    for p in sorted((folder / GRADING / "1. Original Images").glob("*/*.jpg")):
        digests.setdefault(hashlib.md5(p.read_bytes()).hexdigest(), []).append(p.stem)
    pairs = [set(names) for names in digests.values() if len(names) == 2]
    assert len(pairs) == 6 and {"IDRiD_064", "IDRiD_118"} in pairs  # 064 is a test photo

    records = get_adapter("idrid").load(folder)
    by_split = Counter(r.metadata["split"] for r in records.records)
    assert by_split["train"] + by_split["val"] == 413 and by_split["test"] == 102
    test = {r.image.stem: r for r in records.records if r.metadata["split"] == "test"}
    assert "IDRiD_064" not in test
    # ../shared/data/README.md: testing DR 0:34, 1:5, 2:32, 3:19, 4:13; DME 0:45, 1:10, 2:48,
    # less the dropped copy (read from the released label file).
    table = (folder / GRADING / "2. Groundtruths").glob("b.*Testing Labels.csv")
    rows = next(table).read_text().splitlines()[1:]
    dropped = next(r.split(",") for r in rows if r.startswith("IDRiD_064"))
    dr = Counter({0: 34, 1: 5, 2: 32, 3: 19, 4: 13})
    dme = Counter({0: 45, 1: 10, 2: 48})
    dr[int(dropped[1])] -= 1
    dme[int(dropped[2])] -= 1
    grades = records.levels[2].vocabulary
    risks = records.levels[3].vocabulary
    assert Counter(grades.index(r.labels[2][0]) for r in test.values()) == dr
    assert Counter(risks.index(r.labels[3][0]) for r in test.values()) == dme
