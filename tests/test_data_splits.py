"""Patient-level splits: no patient in two splits, requested sizes, reproducible, and split
files that round-trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_fixtures import write_png
from mgll.data import Record, patient_split, read_split_file, write_split_file


def _records(n_patients=40, seed=0):
    rng = np.random.default_rng(seed)
    records = []
    for p in range(n_patients):
        for k in range(int(rng.integers(1, 6))):  # 1-5 images per patient
            records.append(
                Record(
                    image=Path(f"/d/img/{p}_{k}.png"),
                    texts=[["t"]],
                    labels=[[]],
                    patient_id=f"P{p}",
                )
            )
    return records


def test_no_patient_in_two_splits_and_sizes_follow_fractions():
    records = _records()
    split = patient_split(records, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=3)
    owners = {}
    for name, idx in split.items():
        for i in idx:
            assert owners.setdefault(records[i].patient_id, name) == name
    assert sorted(i for idx in split.values() for i in idx) == list(range(len(records)))
    n = len(records)
    assert abs(len(split["train"]) - 0.7 * n) <= 5  # within one patient's images
    assert abs(len(split["val"]) - 0.15 * n) <= 5


def test_split_is_reproducible_and_seed_dependent():
    records = _records()
    assert patient_split(records, seed=1) == patient_split(records, seed=1)
    assert patient_split(records, seed=1) != patient_split(records, seed=2)
    # Row order does not matter: the same patients land in the same splits.
    shuffled = list(reversed(records))
    a = {records[i].patient_id for i in patient_split(records, seed=1)["test"]}
    b = {shuffled[i].patient_id for i in patient_split(shuffled, seed=1)["test"]}
    assert a == b


def test_zero_fraction_and_bad_fractions():
    records = _records()
    split = patient_split(records, {"train": 0.9, "val": 0.1, "test": 0.0})
    assert split["test"] == [] and split["val"]
    with pytest.raises(ValueError, match="sum to 1"):
        patient_split(records, {"train": 0.9, "val": 0.2, "test": 0.1})


def test_records_without_patient_are_split_by_image():
    records = [Record(image=Path(f"/d/{i}.png"), texts=[["t"]], labels=[[]]) for i in range(50)]
    split = patient_split(records, seed=0)
    assert len(split["train"]) == 40 and len(split["val"]) == 5 and len(split["test"]) == 5


def test_split_file_round_trip_and_stale_file(tmp_path):
    records = _records()
    split = patient_split(records, seed=0)
    write_split_file(tmp_path / "split.csv", records, split, root="/d")
    text = (tmp_path / "split.csv").read_text().splitlines()
    assert text[0] == "image,patient_id,split" and text[1].startswith("img/")
    assert read_split_file(tmp_path / "split.csv", records, root="/d") == split
    extra = [*records, Record(image=Path("/d/img/new.png"), texts=[["t"]], labels=[[]])]
    with pytest.raises(ValueError, match="not in the split file"):
        read_split_file(tmp_path / "split.csv", extra, root="/d")
    lines = text[:]
    lines.append("img/0_0.png,P0,test")  # the same patient in a second split
    (tmp_path / "bad.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="patient:P0"):
        read_split_file(tmp_path / "bad.csv", records, root="/d")


def test_a_pool_split_file_is_read_for_one_source_opened_under_another_spelling(tmp_path):
    # A pool run names images by absolute path as its data root was spelled (repo/../data/...);
    # evaluating one source opened as tmp/data must still find every image, and the pool's other
    # sources' rows are ignored.
    (tmp_path / "repo").mkdir()
    spelled = tmp_path / "repo" / ".." / "data"
    pooled = [Record(image=spelled / f"csdi/{k}.png", texts=[["t"]], labels=[[]]) for k in range(6)]
    pooled.append(Record(image=spelled / "palm/V1.png", texts=[["t"]], labels=[[]]))
    split = {"train": [0, 1, 2, 3], "val": [4], "test": [5, 6]}
    write_split_file(tmp_path / "split.csv", pooled, split)  # a pool's: absolute paths
    assert f"{tmp_path}/repo/../data/csdi/0.png" in (tmp_path / "split.csv").read_text()
    folder = tmp_path / "data" / "csdi"
    csdi = [Record(image=folder / f"{k}.png", texts=[["t"]], labels=[[]]) for k in range(6)]
    got = read_split_file(tmp_path / "split.csv", csdi, root=folder)
    assert got == {"train": [0, 1, 2, 3], "val": [4], "test": [5]}
    stale = [*csdi, Record(image=folder / "new.png", texts=[["t"]], labels=[[]])]
    with pytest.raises(ValueError, match=r"1 image.*not in the split file"):
        read_split_file(tmp_path / "split.csv", stale, root=folder)


def test_link_identical_keeps_identical_files_together(tmp_path):
    # Patients A and B share a byte-identical image (the same photo filed under two names).
    write_png(tmp_path / "a.png")
    write_png(tmp_path / "b.png")
    records = [
        Record(image=tmp_path / "a.png", texts=[["t"]], labels=[[]], patient_id="A"),
        Record(image=tmp_path / "b.png", texts=[["t"]], labels=[[]], patient_id="B"),
    ]
    for i in range(30):
        image = tmp_path / f"u{i}.png"
        write_png(image, np.full((4, 4), i, np.uint8))
        records.append(Record(image=image, texts=[["t"]], labels=[[]], patient_id=f"U{i}"))

    def splits_holding_a_and_b(split):
        return {name for name, idx in split.items() if {0, 1} & set(idx)}

    apart = [
        s for s in range(40) if len(splits_holding_a_and_b(patient_split(records, seed=s))) > 1
    ]
    assert apart, "some seed must separate A and B without linking, or the test proves nothing"
    for s in apart:
        linked = patient_split(records, seed=s, link_identical=True)
        assert len(splits_holding_a_and_b(linked)) == 1
