"""The PALM adapter: both layouts on tiny synthetic folders, and the real shipped folder."""

from __future__ import annotations

import csv
import hashlib
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_fixtures import require_shared, write_jpeg
from mgll.data import detect_adapter, get_adapter, prepare_data


def _photo(path: Path, k: int) -> Path:
    """A distinct 16 px RGB JPEG per k."""
    rng = np.random.default_rng(k)
    return write_jpeg(path, rng.integers(0, 255, size=(16, 16, 3), dtype=np.uint8))


def _palm(root: Path, *, official: bool = False) -> Path:
    """A PALM folder: 4 P, 2 H, 3 N training photos (P2 = P1 byte for byte), 5 validation photos
    (V2 = V1, V3 = the training photo P3)."""
    train = root / "PALM-Training400"
    val = root / "PALM-Validation400"
    if official:  # the official zips unpack one folder deeper
        train = train / "PALM-Training400"
    train.mkdir(parents=True)
    val.mkdir(parents=True)
    names = ["P0001", "P0002", "P0003", "P0004", "H0001", "H0002", "N0001", "N0002", "N0003"]
    for k, name in enumerate(names):
        _photo(train / f"{name}.jpg", k)
    shutil.copyfile(train / "P0001.jpg", train / "P0002.jpg")
    for k in range(1, 6):
        _photo(val / f"V000{k}.jpg", 100 + k)
    shutil.copyfile(val / "V0001.jpg", val / "V0002.jpg")
    shutil.copyfile(train / "P0003.jpg", val / "V0003.jpg")
    labels = {"V0001.jpg": 1, "V0002.jpg": 1, "V0003.jpg": 1, "V0004.jpg": 0, "V0005.jpg": 0}
    table = root / ("PALM-Validation-GT" if official else ".") / "labels.csv"
    table.parent.mkdir(exist_ok=True)
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ID", "imgName", "Label", "Fovea_X", "Fovea_Y"])
        for i, (name, label) in enumerate(labels.items(), start=1):
            writer.writerow([i, name, label, 10.0, 12.0])
    return root


@pytest.mark.parametrize("official", [False, True])
def test_palm_levels_split_and_identical_photos(tmp_path, official):
    folder = _palm(tmp_path / "palm", official=official)
    assert detect_adapter(folder).name == "palm"
    records = get_adapter("palm").load(folder, val_fraction=0.25)
    assert [lv.name for lv in records.levels] == ["myopia", "diagnosis"]
    assert records.levels[0].vocabulary[1] == "pathologic myopia"  # class 1 is scored
    by_name = {r.image.name: r for r in records.records}
    # The test copy of a training photo is dropped and said so; the training copy stays.
    assert "V0003.jpg" not in by_name and "P0003.jpg" in by_name
    assert sum(records.excluded.values()) == 1
    assert records.excluded_examples[next(iter(records.excluded))] == ["V0003.jpg = P0003.jpg"]
    # Identical photos within a set are one eye.
    assert by_name["P0002.jpg"].patient_id == by_name["P0001.jpg"].patient_id
    assert by_name["V0002.jpg"].patient_id == by_name["V0001.jpg"].patient_id
    # Labels: first letter for training, labels.csv for validation (diagnosis missing there).
    assert by_name["H0001.jpg"].labels == [["none"], ["high myopia"]]
    assert by_name["N0003.jpg"].labels == [["none"], ["normal"]]
    assert by_name["P0004.jpg"].labels == [["pathologic myopia"], ["pathologic myopia"]]
    assert by_name["V0001.jpg"].labels == [["pathologic myopia"], []]
    assert by_name["V0005.jpg"].labels == [["none"], []]
    # Official split: Training400 -> train + val (8 eyes, 2 held out), Validation400 -> test.
    training = [r for r in records.records if r.image.name[0] != "V"]
    assert len(training) == 9 and {r.metadata["split"] for r in training} == {"train", "val"}
    assert len({r.patient_id for r in training if r.metadata["split"] == "val"}) == 2
    assert {r.metadata["split"] for r in records.records if r.image.name[0] == "V"} == {"test"}
    eye_splits = {r.patient_id: set() for r in records.records}
    for r in records.records:
        eye_splits[r.patient_id].add(r.metadata["split"])
    assert all(len(s) == 1 for s in eye_splits.values())


def test_palm_source_split_through_prepare_data(tmp_path):
    folder = _palm(tmp_path / "palm")
    with pytest.warns(UserWarning, match="test copy dropped"):
        data = prepare_data(
            {
                "source": "palm",
                "path": str(folder),
                "split": {"mode": "source"},
                "cache_dir": False,
            },
            None,
            seed=0,
        )
    records = data.records.records
    names = {s: sorted(records[i].image.name for i in idx) for s, idx in data.indices.items()}
    assert names["test"] == ["V0001.jpg", "V0002.jpg", "V0004.jpg", "V0005.jpg"]
    assert len(names["train"]) + len(names["val"]) == 9 and len(names["val"]) == 1


def test_palm_bad_input_is_named(tmp_path):
    folder = _palm(tmp_path / "palm")
    (folder / "labels.csv").write_text("imgName,Grade\nV0001.jpg,1\n")
    with pytest.raises(ValueError, match="no PALM validation label table"):
        get_adapter("palm").load(folder)
    with pytest.raises(ValueError, match="val_fraction"):
        get_adapter("palm").load(folder, val_fraction=1.5)
    with pytest.raises(ValueError, match="no PALM-Training400"):
        get_adapter("palm").load((tmp_path / "empty").mkdir() or tmp_path / "empty")


@pytest.mark.shared_data
def test_palm_real_folder_counts_and_duplicates():
    folder = require_shared("palm")
    train_letters = Counter(p.name[0] for p in (folder / "PALM-Training400").glob("*.jpg"))
    assert train_letters == {"P": 213, "H": 26, "N": 161}  # ../shared/data/README.md
    with open(folder / "labels.csv", newline="") as handle:
        val_labels = {r["imgName"]: r["Label"] for r in csv.DictReader(handle)}
    assert Counter(val_labels.values()) == {"1": 211, "0": 189}
    digests: dict[str, list[str]] = {}
    for p in sorted(folder.glob("PALM-*/*.jpg")):
        digests.setdefault(hashlib.md5(p.read_bytes()).hexdigest(), []).append(p.stem)
    cross = {n[1] for n in digests.values() if len(n) == 2 and n[0][0] != n[1][0]}
    assert cross == {"V0163", "V0252"}

    records = get_adapter("palm").load(folder)
    by_split = Counter(r.metadata["split"] for r in records.records)
    assert by_split["train"] + by_split["val"] == 400 and by_split["val"] == 40
    test = [r for r in records.records if r.metadata["split"] == "test"]
    assert len(test) == 398 and not cross & {r.image.stem for r in test}
    test_pm = Counter(r.labels[0][0] for r in test)
    assert test_pm == {"pathologic myopia": 211 - 2, "none": 189}  # both dropped copies are PM
    assert all(val_labels[n] == "1" for n in ("V0163.jpg", "V0252.jpg"))
    training = [r for r in records.records if r.metadata["set"] == "Training400"]
    assert all(r.labels[1] for r in training)
    diagnosis = Counter(r.labels[1][0] for r in training)
    assert diagnosis == {"pathologic myopia": 213, "high myopia": 26, "normal": 161}
    ids = {r.image.stem: r.patient_id for r in records.records}
    assert ids["P0072"] == ids["P0014"] and ids["V0160"] == ids["V0107"]
    assert ids["V0320"] == ids["V0268"]
