"""Dataset specs: tables to the multi-granular model, and errors naming key, file and row."""

from __future__ import annotations

import json

import pytest
import torch

from data_fixtures import write_png
from mgll.data import MultiGranularDataset, SpecError, collate_samples, records_from_spec


def _folder(tmp_path, rows, header="path,patient,finding,report"):
    (tmp_path / "images").mkdir()
    lines = [header]
    for row in rows:
        write_png(tmp_path / "images" / row[0])
        lines.append(",".join(row))
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp_path


SPEC = """
table: labels.csv
image: {column: path, root: images}
patient: patient
levels:
  - name: finding
    label: finding
    separator: "|"
    prompt: "A chest X-ray showing {label}."
  - name: report
    text: report
"""


def test_spec_builds_levels_texts_and_multi_label_rows(tmp_path):
    folder = _folder(
        tmp_path,
        [
            ("a.png", "p1", "Effusion|Mass", "big effusion"),
            ("b.png", "p1", "Mass", "small mass"),
            ("c.png", "p2", "", "clear lungs"),
        ],
    )
    (folder / "spec.yaml").write_text(SPEC, encoding="utf-8")
    records = records_from_spec(folder / "spec.yaml")
    finding, report = records.levels
    assert finding.multi_label and finding.vocabulary == ["Effusion", "Mass"]
    assert not report.multi_label and report.vocabulary == [
        "big effusion",
        "clear lungs",
        "small mass",
    ]
    first = records.records[0]
    assert first.image == folder / "images" / "a.png" and first.patient_id == "p1"
    assert first.labels == [["Effusion", "Mass"], ["big effusion"]]
    assert first.texts[0] == ["A chest X-ray showing Effusion, Mass."]
    assert records.records[2].labels[0] == []  # blank cell = missing at that level

    ds = MultiGranularDataset(records, image_size=8)
    batch = collate_samples([ds[i] for i in range(3)])
    assert torch.equal(batch["labels"][0], torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]))
    assert batch["labels"][1].tolist() == [0, 2, 1]
    assert batch["texts"][1] == ["big effusion", "small mass", "clear lungs"]


def test_wrong_column_names_the_column_the_file_and_the_key(tmp_path):
    folder = _folder(tmp_path, [("a.png", "p1", "Mass", "r")])
    (folder / "spec.yaml").write_text(
        SPEC.replace("label: finding", "label: findng"), encoding="utf-8"
    )
    with pytest.raises(SpecError) as info:
        records_from_spec(folder / "spec.yaml")
    message = str(info.value)
    assert "levels[0].label" in message
    assert "'findng'" in message
    assert str(folder / "labels.csv") in message
    assert str(folder / "spec.yaml") in message
    assert "finding" in message  # lists the real columns so the fix is obvious


def test_label_outside_vocabulary_names_the_row(tmp_path):
    folder = _folder(tmp_path, [("a.png", "p1", "Mass", "r"), ("b.png", "p2", "Nodule", "r")])
    spec = SPEC.replace('separator: "|"', 'separator: "|"\n    vocabulary: [Mass, Effusion]')
    (folder / "spec.yaml").write_text(spec, encoding="utf-8")
    with pytest.raises(SpecError, match=r"levels\[0\]\.vocabulary.*row 2.*'Nodule'"):
        records_from_spec(folder / "spec.yaml")


def test_empty_image_cell_names_the_row(tmp_path):
    folder = _folder(tmp_path, [("a.png", "p1", "Mass", "r")])
    with (folder / "labels.csv").open("a", encoding="utf-8") as handle:
        handle.write(",p2,Mass,r\n")
    (folder / "spec.yaml").write_text(SPEC, encoding="utf-8")
    with pytest.raises(SpecError, match=r"image\.column.*row 2"):
        records_from_spec(folder / "spec.yaml")


def test_several_classes_at_a_single_label_level_name_the_row(tmp_path):
    folder = _folder(tmp_path, [("a.png", "p1", "1", "0"), ("b.png", "p2", "1", "1")],
                     header="path,patient,Effusion,Mass")  # fmt: skip
    spec = {"table": "labels.csv", "image": {"column": "path", "root": "images"},
            "levels": [{"columns": ["Effusion", "Mass"], "multi_label": False}]}  # fmt: skip
    with pytest.raises(SpecError, match=r"levels\[0\]\.multi_label: .*labels\.csv row 2"):
        records_from_spec(spec, base_dir=folder)
    spec["image"] = ["path"]  # neither a column name nor a mapping
    with pytest.raises(SpecError, match="image: must be a column name"):
        records_from_spec(spec, base_dir=folder)


def test_unknown_keys_and_missing_levels_are_named(tmp_path):
    folder = _folder(tmp_path, [("a.png", "p1", "Mass", "r")])
    (folder / "s1.yaml").write_text(SPEC + "lables: x\n", encoding="utf-8")
    with pytest.raises(SpecError, match="lables"):
        records_from_spec(folder / "s1.yaml")
    (folder / "s2.yaml").write_text("table: labels.csv\nimage: path\n", encoding="utf-8")
    with pytest.raises(SpecError, match="levels: is required"):
        records_from_spec(folder / "s2.yaml")
    (folder / "s3.yaml").write_text(SPEC.replace("{label}", "{labl}"), encoding="utf-8")
    with pytest.raises(SpecError, match=r"levels\[0\]\.prompt\[0\]"):
        records_from_spec(folder / "s3.yaml")


def test_one_hot_columns_exclusions_and_metadata(tmp_path):
    folder = _folder(
        tmp_path,
        [("a.png", "p1", "1", "0"), ("b.png", "p2", "0", "0"), ("c.png", "p3", "1", "1")],
        header="path,patient,Effusion,Mass",
    )
    spec = {
        "table": "labels.csv",
        "image": {"column": "path", "root": "images"},
        "patient": "patient",
        "metadata": ["patient"],
        "exclude": {"patient": ["p3"]},
        "levels": [
            {
                "name": "findings",
                "columns": ["Effusion", "Mass"],
                "prompt": "X-ray: {label}",
                "missing_text": "X-ray: no finding",
            }
        ],
    }
    (folder / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
    records = records_from_spec(folder / "spec.json")
    assert records.levels[0].multi_label and records.levels[0].vocabulary == ["Effusion", "Mass"]
    assert [r.labels[0] for r in records.records] == [["Effusion"], []]
    assert [r.texts[0] for r in records.records] == [["X-ray: Effusion"], ["X-ray: no finding"]]
    assert records.excluded == {"patient = 'p3' (exclude)": 1}
    assert records.records[1].metadata == {"patient": "p2", "row": 2}


def test_jsonl_and_parquet_tables(tmp_path):
    (tmp_path / "images").mkdir()
    rows = [
        {"file": "a.png", "findings": ["Mass", "Nodule"], "note": "two"},
        {"file": "b.png", "findings": [], "note": None},
    ]
    for row in rows:
        write_png(tmp_path / "images" / row["file"])
    (tmp_path / "t.jsonl").write_text(
        "\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8"
    )
    spec = {
        "table": "t.jsonl",
        "image": {"column": "file", "root": "images"},
        "levels": [
            {"name": "f", "label": "findings", "separator": "|"},
            {"name": "n", "text": "note", "missing_text": "no note"},
        ],
    }
    records = records_from_spec(spec, base_dir=tmp_path)
    assert [r.labels[0] for r in records.records] == [["Mass", "Nodule"], []]
    assert [r.texts[1] for r in records.records] == [["two"], ["no note"]]
    pytest.importorskip("pyarrow", reason="pyarrow (the mgll[parquet] extra) not installed")
    import pandas as pd

    # List cells come back from Parquet as arrays, missing strings as pd.NA.
    frame = pd.DataFrame({"file": ["a.png", "b.png"], "findings": [["Mass", "Nodule"], []]})
    frame["note"] = pd.array(["x", None], dtype="string")
    frame.to_parquet(tmp_path / "t.parquet")
    spec["table"] = "t.parquet"
    records = records_from_spec(spec, base_dir=tmp_path)
    assert [r.labels for r in records.records] == [[["Mass", "Nodule"], ["x"]], [[], []]]
    assert records.records[1].texts[1] == ["no note"]


def test_table_that_is_not_utf8_says_so(tmp_path):
    (tmp_path / "t.csv").write_bytes("path,finding\na.png,caf\xe9\n".encode("latin-1"))
    spec = {"table": "t.csv", "image": "path", "levels": [{"label": "finding"}]}
    with pytest.raises(SpecError, match=r"table: .*t\.csv: not UTF-8 .*save it as UTF-8"):
        records_from_spec(spec, base_dir=tmp_path)


def test_several_texts_are_drawn_reproducibly_per_epoch(tmp_path):
    folder = _folder(tmp_path, [(f"{i}.png", f"p{i}", "Mass", "r") for i in range(6)])
    spec = {
        "table": "labels.csv",
        "image": {"column": "path", "root": "images"},
        "levels": [
            {
                "name": "f",
                "label": "finding",
                "prompt": [f"template {k} {{label}}" for k in range(5)],
            }
        ],
    }
    records = records_from_spec(spec, base_dir=folder)
    assert len(records.records[0].texts[0]) == 5

    def draws(epoch, seed=0):
        ds = MultiGranularDataset(records, image_size=8, seed=seed)
        ds.set_epoch(epoch)
        return [ds.texts(i)[0] for i in range(len(ds))]

    assert draws(0) == draws(0)  # reproducible
    assert draws(0) != draws(1) or draws(0) != draws(2)  # epochs draw afresh
    assert len({t for e in range(4) for t in draws(e)}) > 1
    assert all(t.endswith(" Mass") for t in draws(3))


def test_missing_spellings_in_jsonl_strings_are_missing_too(tmp_path):
    (tmp_path / "t.jsonl").write_text(
        '{"file": "a.png", "finding": "N/A", "patient": "null"}\n'
        '{"file": "b.png", "finding": "Mass", "patient": "p2"}\n',
        encoding="utf-8",
    )
    spec = {"table": "t.jsonl", "image": "file", "patient": "patient",
            "levels": [{"label": "finding"}]}  # fmt: skip
    records = records_from_spec(spec, base_dir=tmp_path)
    assert [r.labels[0] for r in records.records] == [[], ["Mass"]]
    assert [r.patient_id for r in records.records] == [None, "p2"]
    assert records.missing_cells == {("finding", "N/A"): 1, ("patient", "null"): 1}
    with pytest.raises(ValueError, match="base_dir applies to a spec mapping"):
        records_from_spec(tmp_path / "spec.yaml", base_dir=tmp_path)


def test_a_parquet_table_without_rows_reads_as_empty(tmp_path):
    pytest.importorskip("pyarrow", reason="pyarrow (the mgll[parquet] extra) not installed")
    import pandas as pd

    pd.DataFrame({"file": pd.Series([], dtype=float), "finding": []}).to_parquet(tmp_path / "t.pq")
    spec = {"table": "t.pq", "image": "file", "levels": [{"label": "finding"}]}
    assert records_from_spec(spec, base_dir=tmp_path).records == []
