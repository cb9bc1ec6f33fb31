"""`mgll data check` / `mgll data split` and `build_datasets` on tiny datasets made here."""

from __future__ import annotations

import csv
import warnings

import pytest

from data_fixtures import write_jpeg, write_png
from mgll.cli import main
from mgll.data import LevelInfo, Record, RecordSet, build_datasets, collate_samples
from mgll.data.check import check_records

SPEC = """
table: labels.csv
image: {column: path, root: images}
patient: patient
metadata: [view]
levels:
  - name: finding
    label: finding
    separator: "|"
    prompt: "A chest X-ray showing {label}."
  - name: report
    text: report
"""


def _dataset(tmp_path, n=10):
    (tmp_path / "images").mkdir()
    lines = ["path,patient,view,finding,report"]
    for i in range(n):
        # Odd rows PNG, even rows JPEG named .png: the format comes from the content.
        writer = write_png if i % 2 else write_jpeg
        writer(tmp_path / "images" / f"{i}.png")
        finding = ["Mass", "Effusion|Mass", "", "Nodule"][i % 4]
        lines.append(f"{i}.png,p{i // 2},PA,{finding},report {i % 3}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "spec.yaml").write_text(SPEC, encoding="utf-8")
    return tmp_path / "spec.yaml"


def test_check_clean_dataset_exits_zero(tmp_path, capsys):
    spec = _dataset(tmp_path)
    assert main(["data", "check", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "samples: 10" in out and "result: OK" in out
    assert "level 0 'finding' (multi-label, 3 classes, 2 missing)" in out
    assert "       6  Mass" in out and "       3  Effusion" in out  # "A|B" counts for both
    assert "identical image files (warning): 2" in out  # the PNG ramps, the JPEG ramps
    assert "empty texts where the label is missing (warning): 2" in out


def test_check_names_missing_corrupt_and_empty(tmp_path, capsys):
    spec = _dataset(tmp_path)
    (tmp_path / "images" / "3.png").unlink()
    (tmp_path / "images" / "4.png").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with (tmp_path / "labels.csv").open("a", encoding="utf-8") as handle:
        handle.write("1.png,p9,PA,Mass,\n")  # the same image again, with an empty report
    assert main(["data", "check", str(spec)]) == 1
    out = capsys.readouterr().out
    assert "missing image files (error): 1" in out and "3.png" in out
    assert "corrupt image files (error): 1" in out and "4.png" in out
    # Blank findings (rows 2, 6) and the blank report: no label there, so only a warning.
    assert "empty texts where the label is missing (warning): 3" in out
    assert "(level report)" in out and "(level finding)" in out
    assert "image files used by several records (warning): 1" in out
    assert "result: 2 error(s)" in out
    # --no-decode only checks existence: the truncated JPEG passes.
    assert main(["data", "check", str(spec), "--no-decode"]) == 1
    assert "result: 1 error(s)" in capsys.readouterr().out


def test_empty_text_with_a_label_is_an_error(tmp_path):
    image = write_png(tmp_path / "a.png")
    records = RecordSet(
        levels=[LevelInfo("finding", ["Mass"])],
        records=[Record(image=image, texts=[[" "]], labels=[["Mass"]], patient_id="p")],
    )
    report = check_records(records)
    assert report.empty_texts == [(str(image), "finding")] and report.errors == 1


def test_an_image_path_that_cannot_be_opened_is_an_error(tmp_path):
    folder = tmp_path / "looks-like.png"
    folder.mkdir()  # exists, but open() fails (root ignores file permissions)
    records = RecordSet(
        levels=[LevelInfo("finding", ["Mass"])],
        records=[Record(image=folder, texts=[["t"]], labels=[["Mass"]], patient_id="p")],
    )
    report = check_records(records)
    assert report.corrupt == [(str(folder), "cannot be opened or read (check its permissions)")]
    assert report.errors == 1


def test_check_unreadable_inputs_exit_two(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "absent")]) == 2
    assert "no such file or folder" in capsys.readouterr().out
    spec = _dataset(tmp_path)
    spec.write_text(SPEC.replace("label: finding", "label: findng"), encoding="utf-8")
    assert main(["data", "check", str(spec)]) == 2
    out = capsys.readouterr().out
    assert "levels[0].label" in out and "'findng'" in out and "labels.csv" in out
    assert main(["data", "check", str(tmp_path), "--format", "csdi"]) == 2  # wrong format named
    assert "CSDI_annotations.csv" in capsys.readouterr().out
    spec.write_text(SPEC, encoding="utf-8")
    assert main(["data", "check", str(spec), "--train", "0.9"]) == 2  # 0.9 + 0.1 + 0.1 != 1
    assert "sum to 1" in capsys.readouterr().out
    assert main(["data"]) == 2  # no action: the help, not a traceback
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # An output that cannot be written is a one-line error, not a traceback.
    assert main(["data", "split", str(spec), "--out", str(blocker / "split.csv")]) == 2
    assert main(["data", "check", str(spec), "--json", str(blocker / "r.json")]) == 2
    assert "error: --json: cannot write" in capsys.readouterr().out


def test_split_command_and_build_datasets(tmp_path, capsys):
    spec = _dataset(tmp_path, n=20)
    out = tmp_path / "split.csv"
    assert main(["data", "split", str(spec), "--out", str(out), "--train", "0.6", "--val", "0.2",
                 "--test", "0.2"]) == 0  # fmt: skip
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 20 and {r["split"] for r in rows} == {"train", "val", "test"}
    assert rows[0]["image"] == "images/0.png"  # relative: the split survives moving the data
    owners = {}
    for r in rows:
        assert owners.setdefault(r["patient_id"], r["split"]) == r["split"]

    cfg = {"source": "spec.yaml", "split": {"file": "split.csv"}, "cache_dir": "cache",
           "levels": [1], "augmentation": {"rotation": 0, "hflip": 0.0}}  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        datasets = build_datasets(
            cfg, tmp_path, image_size=16, mean=(0.5,) * 3, std=(0.5,) * 3, seed=0
        )
    assert {k: len(v) for k, v in datasets.items()} == {
        name: sum(r["split"] == name for r in rows) for name in ("train", "val", "test")
    }
    train = datasets["train"]
    assert [lv.name for lv in train.levels] == ["report"]
    batch = collate_samples([train[i] for i in range(len(train))])
    assert batch["images"].shape == (len(train), 3, 16, 16)
    assert len(batch["texts"]) == 1 and batch["labels"][0].dtype.is_floating_point is False
    assert train.metadata(0)["view"] == "PA"
    assert any((tmp_path / "cache").rglob("*.npy"))  # the cache folder is used


def test_build_datasets_config_errors(tmp_path):
    _dataset(tmp_path)
    base = {"source": "spec.yaml"}
    kwargs = {"image_size": 8, "mean": (0,) * 3, "std": (1,) * 3, "seed": 0}
    with pytest.raises(ValueError, match=r"data\.levels: index 5"):
        build_datasets({**base, "levels": [5]}, tmp_path, **kwargs)
    with pytest.raises(ValueError, match=r"data\.split"):
        build_datasets(
            {**base, "split": {"train": 0.5, "val": 0.1, "test": 0.1}}, tmp_path, **kwargs
        )
    with pytest.raises(ValueError, match=r"data\.augmentation.*rotaton"):
        build_datasets({**base, "augmentation": {"rotaton": 5}}, tmp_path, **kwargs)
    with pytest.raises(ValueError, match=r"data\.resize"):
        build_datasets({**base, "resize": "zoom"}, tmp_path, **kwargs)
    with pytest.raises(ValueError, match=r"data\.split\.mode: 'random'"):  # not a silent default
        build_datasets({**base, "split": {"mode": "random"}}, tmp_path, **kwargs)
    with pytest.raises(ValueError, match=r"unknown config key 'data\.batch_size'"):
        build_datasets({**base, "batch_size": 4}, tmp_path, **kwargs)


def test_source_split_from_a_spec_column(tmp_path, capsys):
    spec = _dataset(tmp_path, n=8)
    table = tmp_path / "labels.csv"
    lines = table.read_text().splitlines()

    def write(names):
        rows = [f"{row},{s}" for row, s in zip(lines[1:], names, strict=True)]
        table.write_text("\n".join([lines[0] + ",split", *rows]) + "\n")

    names = ["train", "train", "train", "train", "val", "val", "test", "test"]  # patient pairs
    write(names)
    spec.write_text(SPEC + "split: split\n")
    cfg = {"source": "spec.yaml", "split": {"mode": "source"}}
    kwargs = {"image_size": 8, "mean": (0,) * 3, "std": (1,) * 3, "seed": 0}
    datasets = build_datasets(cfg, tmp_path, **kwargs)
    assert {k: len(v) for k, v in datasets.items()} == {"train": 4, "val": 2, "test": 2}
    assert datasets["val"].metadata(0)["image"].endswith("4.png")
    names[4] = "train"  # patient p2 now spans the source's train and val
    write(names)
    with pytest.raises(ValueError, match="patient:p2"):
        build_datasets(cfg, tmp_path, **kwargs)
    # `data check` reports the shipped split and the leak as an error.
    assert main(["data", "check", str(spec), "--no-decode"]) == 1
    out = capsys.readouterr().out
    assert "split shipped by the source:\n  train       5 images       3 patients" in out
    assert "patients in several source splits (error): 1\n  patient:p2 (train and val)" in out
