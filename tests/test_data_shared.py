"""The adapters on the real shared data (../shared/data, or $MGLL_SHARED_DATA).

Expected numbers are derived here from the source files with the csv module, independently of
the adapters, and checked against the tables in ../shared/data/README.md.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import warnings
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from data_fixtures import require_shared
from mgll.cli import main
from mgll.data import build_datasets, collate_samples, get_adapter, patient_split

pytestmark = pytest.mark.shared_data

# ../shared/data/README.md, "finding counts" for the 605 present images with a metadata row.
README_FINDINGS = {
    "COVID-19": 411, "todo": 84, "SARS": 16, "Pneumocystis": 13, "No Finding": 13,
    "COVID-19, ARDS": 12, "Streptococcus": 12, "Pneumonia": 10, "Klebsiella": 7,
    "Mycoplasma Bacterial Pneumonia": 4, "Varicella": 4, "ARDS": 4, "E.Coli": 4, "Lipoid": 3,
    "Legionella": 3, "Bacterial": 2, "Influenza": 1, "Chlamydophila": 1, "Unknown": 1,
}  # fmt: skip
# The hierarchy written out by hand for this test: finding -> (categories, type, organism).
HIERARCHY = {
    "COVID-19": ({"Pneumonia"}, "Viral", "COVID-19"),
    "COVID-19, ARDS": ({"Pneumonia", "ARDS"}, "Viral", "COVID-19"),
    "SARS": ({"Pneumonia"}, "Viral", "SARS"),
    "Varicella": ({"Pneumonia"}, "Viral", "Varicella"),
    "Influenza": ({"Pneumonia"}, "Viral", "Influenza"),
    "Streptococcus": ({"Pneumonia"}, "Bacterial", "Streptococcus"),
    "Klebsiella": ({"Pneumonia"}, "Bacterial", "Klebsiella"),
    "Mycoplasma Bacterial Pneumonia": ({"Pneumonia"}, "Bacterial", "Mycoplasma"),
    "E.Coli": ({"Pneumonia"}, "Bacterial", "E.Coli"),
    "Legionella": ({"Pneumonia"}, "Bacterial", "Legionella"),
    "Chlamydophila": ({"Pneumonia"}, "Bacterial", "Chlamydophila"),
    "Bacterial": ({"Pneumonia"}, "Bacterial", None),
    "Pneumocystis": ({"Pneumonia"}, "Fungal", "Pneumocystis"),
    "Lipoid": ({"Pneumonia"}, "Lipoid", None),
    "Pneumonia": ({"Pneumonia"}, None, None),
    "ARDS": ({"ARDS"}, None, None),
    "No Finding": ({"No Finding"}, "No Finding", "No Finding"),
}


def _covid_rows(folder):
    with open(folder / "metadata.csv", newline="", encoding="utf-8") as handle:
        rows = {r["filename"]: r for r in csv.DictReader(handle) if r["modality"] == "X-ray"}
    present = set(os.listdir(folder / "images"))
    return {name: rows[name] for name in present if name in rows}, present


def test_covid_cxr_counts_per_level_match_metadata_and_readme():
    folder = require_shared("covid-cxr")
    rows, present = _covid_rows(folder)
    findings = Counter(r["finding"] for r in rows.values())
    assert len(rows) == 605 and findings == README_FINDINGS
    assert len({r["patientid"] for r in rows.values()}) == 360

    usable = {n: r for n, r in rows.items() if r["finding"] not in ("todo", "Unknown")}
    expected = [Counter(), Counter(), Counter(), Counter()]
    for r in usable.values():
        categories, kind, organism = HIERARCHY[r["finding"]]
        expected[0].update(categories)
        expected[1][kind or ""] += 1
        expected[2][organism or ""] += 1
        expected[3]["" if not r["clinical_notes"].strip() else "notes"] += 1

    records = get_adapter("covid-cxr").load(folder)
    assert [lv.name for lv in records.levels] == ["category", "type", "organism", "notes"]
    assert [lv.multi_label for lv in records.levels] == [True, False, False, False]
    on_disk = records.subset([i for i, r in enumerate(records.records) if r.image.name in present])
    assert len(on_disk.records) == len(usable) == 520
    counts = on_disk.label_counts()
    assert counts[0] == expected[0] == Counter(Pneumonia=503, ARDS=16, **{"No Finding": 13})
    assert counts[1] == expected[1]
    assert counts[1]["Viral"] == 444 and counts[1][""] == 14
    assert counts[2] == expected[2]
    assert counts[2]["COVID-19"] == 423 and counts[2][""] == 19
    assert counts[3][""] == expected[3][""] == 100  # docs/data.md: 368 distinct notes, 100 missing
    assert len([k for k in counts[3] if k]) == 368
    assert sum(n for k, n in counts[3].items() if k) == expected[3]["notes"]
    # Exclusions are counted by reason; the 7 missing files stay as records for `data check`.
    assert records.excluded == {
        "finding 'todo' is not a usable label": 84,
        "finding 'Unknown' is not a usable label": 1,
        "no X-ray row in metadata.csv": 4,
    }
    assert len(records.records) - len(on_disk.records) == 7
    both = next(r for r in on_disk.records if r.metadata["finding"] == "COVID-19, ARDS")
    assert both.labels[:3] == [["Pneumonia", "ARDS"], ["Viral"], ["COVID-19"]]


def test_csdi_bins_match_the_readme():
    folder = require_shared("csdi-fundus")
    with open(folder / "CSDI_annotations.csv", newline="", encoding="utf-8") as handle:
        scores = [float(r["score"]) for r in csv.DictReader(handle)]
    edges = [(0, 1), (1, 3), (3, 5), (5, 7), (7, 10.01)]
    derived = [sum(lo <= s < hi for s in scores) for lo, hi in edges]
    assert derived == [9, 30, 39, 48, 61]  # the README's table
    records = get_adapter("csdi").load(folder)
    severity = records.levels[0]
    assert severity.vocabulary == ["Normal", "Acceptable", "Mild", "Moderate", "Severe"]
    counts = records.label_counts()[0]
    assert [counts[name] for name in severity.vocabulary] == [9, 30, 39, 48, 61]
    assert records.levels[1].name == "description"
    assert all(r.texts[1][0] and len(r.texts[1][0].split()) >= 18 for r in records.records)
    pairs = {r.image.name: r.patient_id for r in records.records}
    assert pairs["HJX1.jpg"] == pairs["HJX2.jpg"] and pairs["LZ-OD.jpg"] == pairs["LZ-OS.jpg"]
    assert pairs["cataract_001.png"] != pairs["cataract_002.png"]


@pytest.mark.parametrize("name", ["covid-cxr", "csdi-fundus"])
def test_splits_share_no_patient_and_batches_follow_the_contract(name):
    root = require_shared(name).parent
    cfg = {
        "source": name,
        "path": name,
        "split": {"train": 0.7, "val": 0.15, "test": 0.15, "seed": 1},
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        datasets = build_datasets(cfg, root, image_size=32, mean=(0.5,) * 3, std=(0.2,) * 3, seed=0)
    messages = [str(w.message) for w in caught]
    if name == "covid-cxr":
        assert any("7 image file(s) do not exist" in m for m in messages), messages
        assert any("left out 89 row(s)" in m for m in messages), messages
    else:
        assert messages == []
    patients = {split: set(ds.patient_ids) for split, ds in datasets.items()}
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    total = sum(len(ds) for ds in datasets.values())
    assert total == {"covid-cxr": 520, "csdi-fundus": 187}[name]
    assert abs(len(datasets["train"]) - 0.7 * total) < 0.1 * total

    train = datasets["train"]
    loader = DataLoader(train, batch_size=8, num_workers=2, collate_fn=collate_samples)
    batch = next(iter(loader))
    assert batch["images"].shape == (8, 3, 32, 32) and batch["images"].dtype == torch.float32
    assert len(batch["texts"]) == len(train.levels) and all(len(t) == 8 for t in batch["texts"])
    for level, labels in zip(train.levels, batch["labels"], strict=True):
        if level.multi_label:
            assert labels.shape == (8, len(level.vocabulary)) and labels.dtype == torch.float32
        else:
            assert labels.shape == (8,) and labels.dtype == torch.long
            assert int(labels.max()) < len(level.vocabulary)
    assert batch["indices"].tolist() == list(range(8)) and batch["skipped"] == []
    meta = train.metadata(0)
    assert meta["patient_id"] and os.path.exists(meta["image"])


def test_data_check_reports_the_real_sets(tmp_path, capsys):
    covid = require_shared("covid-cxr")
    out = tmp_path / "report.json"
    assert main(["data", "check", str(covid), "--no-decode", "--output", str(out)]) == 1
    text = capsys.readouterr().out
    assert "missing image files (error): 7" in text
    assert "case_71_figura1.png" in text and "covid-19-caso-86-RX-Torace-2.jpg" in text
    # Rows left out are named, not only counted (the README's 4 images without a metadata row).
    assert "no X-ray row in metadata.csv (e.g. 4-x-day1.jpg, 4-x-day4.jpg" in text
    report = json.loads(out.read_text())
    assert report["num_records"] == 527 and len(report["missing"]) == 7 and report["errors"] == 7
    assert report["levels"][0]["counts"] == {"Pneumonia": 510, "ARDS": 16, "No Finding": 13}
    assert sorted(report["excluded_examples"]["no X-ray row in metadata.csv"]) == [
        "4-x-day1.jpg", "4-x-day13.jpg", "4-x-day4.jpg", "4-x-day8.jpg"
    ]  # fmt: skip
    split = report["splits"]
    assert sum(s["images"] for s in split.values()) == 527

    csdi = require_shared("csdi-fundus")
    assert main(["data", "check", str(csdi)]) == 0  # decodes all 187 images
    text = capsys.readouterr().out
    assert "result: OK" in text and "corrupt image files (error): 0" in text
    assert "identical image files (warning)" in text


def test_data_split_writes_a_patient_level_file(tmp_path, capsys):
    covid = require_shared("covid-cxr")
    out = tmp_path / "split.csv"
    assert main(["data", "split", str(covid), "--output", str(out), "--split-seed", "3"]) == 0
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 527
    owner = {}
    for row in rows:
        assert owner.setdefault(row["patient_id"], row["split"]) == row["split"]
    # build_datasets reads it back: same assignment, missing files dropped.
    cfg = {
        "source": "covid-cxr",
        "path": str(covid),
        "split": {"file": str(out)},
        "cache_dir": False,
    }
    with pytest.warns(UserWarning):
        datasets = build_datasets(cfg, None, image_size=16, mean=(0,) * 3, std=(1,) * 3, seed=0)
    by_image = {row["image"]: row["split"] for row in rows}
    for split, ds in datasets.items():
        for i in range(len(ds)):
            assert by_image["images/" + os.path.basename(ds.metadata(i)["image"])] == split


def test_csdi_identical_photos_stay_in_one_split_when_linked():
    folder = require_shared("csdi-fundus")
    records = get_adapter("csdi-fundus").load(folder)
    by_digest = {}
    for i, r in enumerate(records.records):
        by_digest.setdefault(hashlib.sha1(r.image.read_bytes()).hexdigest(), []).append(i)
    groups = [g for g in by_digest.values() if len(g) > 1]
    assert len(groups) == 7  # LSQ1 = LSY1 = LXW1 = LZQ1 = YZL1, ... (different initials)
    split = patient_split(records.records, seed=0, link_identical=True)
    which = {i: name for name, idx in split.items() for i in idx}
    for group in groups:
        assert len({which[i] for i in group}) == 1


def test_the_demo_recipe_leaves_a_copy_of_covid_cxr_as_it_was(tmp_path, monkeypatch):
    """The cpu-demo's data section on a writable copy of covid-cxr: loading (which fills the
    cache) and `mgll data check` leave the folder holding exactly the files it held."""
    import shutil
    from importlib import resources

    import yaml

    copy = shutil.copytree(require_shared("covid-cxr"), tmp_path / "covid-cxr")
    before = sorted((str(p.relative_to(copy)), p.stat().st_size) for p in copy.rglob("*"))
    monkeypatch.setenv("MGLL_CACHE", str(tmp_path / "user-cache"))
    recipe = yaml.safe_load(resources.files("mgll.configs").joinpath("cpu-demo.yaml").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the rows covid-cxr leaves out, the 7 missing images
        datasets = build_datasets(
            recipe["data"], tmp_path, image_size=64, mean=(0.5,) * 3, std=(0.5,) * 3, seed=0
        )
    for name in ("train", "val"):
        for i in range(8):
            datasets[name][i]
    assert main(["data", "check", str(copy), "--no-decode"]) == 1  # the 7 missing images
    after = sorted((str(p.relative_to(copy)), p.stat().st_size) for p in copy.rglob("*"))
    assert after == before
    assert len(list((tmp_path / "user-cache").rglob("*.npy"))) == 16
