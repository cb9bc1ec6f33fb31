"""`mgll data check` / `mgll data split` and `build_datasets` on tiny datasets made here."""

from __future__ import annotations

import csv
import json
import re
import warnings

import pytest

from data_fixtures import SPEC, spec_dataset, write_png
from mgll.cli import main
from mgll.data import (
    LevelInfo,
    Record,
    RecordSet,
    build_datasets,
    collate_samples,
    load_records,
)
from mgll.data.check import check_records


def test_check_clean_dataset_exits_zero(tmp_path, capsys):
    spec = spec_dataset(tmp_path)
    assert main(["data", "check", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "samples: 10" in out and "result: OK" in out
    assert "level 0 'finding' (multi-label, 3 classes, 2 missing)" in out
    assert "       6  Mass" in out and "       3  Effusion" in out  # "A|B" counts for both
    assert "identical image files (warning): 2" in out  # the PNG ramps, the JPEG ramps
    assert "empty texts where the label is missing (warning): 2" in out
    # a warning is one line per folder and level, not one per image
    assert f"       2  {tmp_path / 'images'} (level finding), e.g. 2.png\nimage files" in out
    assert main(["data", "check", str(spec), "--limit", "1"]) == 0  # the option that exists
    assert "  ... 1 more (--output FILE.json lists all)" in capsys.readouterr().out


def test_check_names_missing_corrupt_and_empty(tmp_path, capsys):
    spec = spec_dataset(tmp_path)
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


def test_unreadable_inputs_are_one_line_errors_exit_one(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "absent")]) == 1
    err = capsys.readouterr().err
    assert err == f"mgll data check: error: {tmp_path / 'absent'}: no such file or folder\n"
    spec = spec_dataset(tmp_path)
    spec.write_text(SPEC.replace("label: finding", "label: findng"), encoding="utf-8")
    assert main(["data", "check", str(spec)]) == 1
    err = capsys.readouterr().err
    assert "levels[0].label" in err and "'findng'" in err and "labels.csv" in err
    assert main(["data", "check", str(tmp_path), "--source", "csdi"]) == 1  # wrong format named
    assert "CSDI_annotations.csv" in capsys.readouterr().err
    (tmp_path / "unknown").mkdir()  # no known format: the error names the option that exists
    assert main(["data", "check", str(tmp_path / "unknown")]) == 1
    err = capsys.readouterr().err
    assert (
        "not a dataset folder in a known format" in err and "name the format with --source" in err
    )
    spec.write_text(SPEC, encoding="utf-8")
    assert main(["data", "check", str(spec), "--train", "0.9"]) == 1  # 0.9 + 0.1 + 0.1 != 1
    assert "sum to 1" in capsys.readouterr().err
    assert main(["data"]) == 2  # no action: the help, not a traceback
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    capsys.readouterr()
    # An output that cannot be written is a one-line error, not a traceback.
    assert main(["data", "split", str(spec), "--output", str(blocker / "split.csv")]) == 1
    assert capsys.readouterr().err.startswith("mgll data split: error: ")
    assert main(["data", "check", str(spec), "--output", str(blocker / "r.json")]) == 1
    assert "mgll data check: error: --output: cannot write" in capsys.readouterr().err
    assert main(["data", "split", str(spec)]) == 2  # a usage error, as argparse's
    assert "--output FILE is required" in capsys.readouterr().err


def test_old_option_spellings_still_work(tmp_path, capsys):
    """--out, --json, --format and --option are hidden aliases; --seed says what it means."""
    spec = spec_dataset(tmp_path, n=20)
    new, old = tmp_path / "new.csv", tmp_path / "old.csv"
    assert main(["data", "split", str(spec), "--output", str(new), "--split-seed", "3"]) == 0
    assert capsys.readouterr().err == ""
    assert main(["data", "split", str(spec), "--out", str(old), "--seed", "3"]) == 0
    err = capsys.readouterr().err
    assert "--seed is now --split-seed" in err and "data.split.seed" in err
    assert old.read_text() == new.read_text()
    seed0 = tmp_path / "seed0.csv"
    assert main(["data", "split", str(spec), "--output", str(seed0)]) == 0
    assert seed0.read_text() != new.read_text()  # the seed does change the split
    report = tmp_path / "report.json"
    assert main(["data", "check", str(spec), "--no-decode", "--json", str(report)]) == 0
    assert json.loads(report.read_text())["num_records"] == 20
    for action in ("check", "split"):
        with pytest.raises(SystemExit):
            main(["data", action, "--help"])
        usage = capsys.readouterr().out.split("\n\n")[0]
        shown = set(re.findall(r"--[a-z-]+", usage))
        assert {"--source", "--options", "--split-seed", "--output"} <= shown
        assert not shown & {"--format", "--option", "--seed", "--json", "--out"}


def test_source_and_options_mirror_the_config_keys(tmp_path, capsys):
    """`--source NAME --options k=v` reads a folder as data.source / data.options would."""
    csdi = tmp_path / "csdi"
    (csdi / "images").mkdir(parents=True)
    write_png(csdi / "images" / "HJX1.png")
    (csdi / "CSDI_annotations.csv").write_text(
        "id,score,English_diagnosis,Chinese_diagnosis\nHJX1.png,2,mild haze,轻度混浊\n",
        encoding="utf-8",
    )
    cfg = {"source": "csdi-fundus", "path": str(csdi), "options": {"language": "zh"}}
    records, _ = load_records(cfg["source"], cfg["path"], options=cfg["options"])
    assert records.records[0].texts[-1] == ["轻度混浊"]
    args = ["data", "check", str(csdi), "--source", "csdi-fundus", "--no-decode"]
    args += ["--train", "1", "--val", "0", "--test", "0"]
    assert main([*args, "--options", "language=zh"]) == 0
    assert "1  轻度混浊" in capsys.readouterr().out
    assert main(args) == 0
    assert "1  mild haze" in capsys.readouterr().out
    assert main(["data", "check", str(csdi), "--options", "colour=red"]) == 1
    assert "colour" in capsys.readouterr().err
    assert main(["data", "check", str(csdi), "--options", "language"]) == 1
    assert "--options 'language': expected KEY=VALUE" in capsys.readouterr().err
    (tmp_path / "spec").mkdir()
    spec = spec_dataset(tmp_path / "spec", n=2)
    assert main(["data", "check", str(spec), "--source", "csdi-fundus"]) == 1
    assert "--source names the format of a dataset folder" in capsys.readouterr().err


def test_split_command_and_build_datasets(tmp_path, capsys):
    spec = spec_dataset(tmp_path, n=20)
    out = tmp_path / "split.csv"
    assert main(["data", "split", str(spec), "--output", str(out), "--train", "0.6", "--val", "0.2",
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
    spec_dataset(tmp_path)
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
    spec = spec_dataset(tmp_path, n=8)
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
    assert (
        "split shipped by the source (pretraining's with data.split: {mode: source}):\n"
        "  train       5 images       3 patients" in out
    )
    assert "patient-level split (pretraining's by default: data.split fractions):" in out
    assert "patients in several source splits (error): 1\n  patient:p2 (train and val)" in out


def test_spec_paths_are_relative_to_the_spec_in_pretrain_and_check(tmp_path, capsys):
    """With the recipe's data.path pointing at another dataset, a spec still reads its own
    table (not a same-named table under data.path), in build_datasets as in `data check`."""
    (tmp_path / "mine").mkdir()
    spec = spec_dataset(tmp_path / "mine")
    decoy = tmp_path / "covid-cxr"
    decoy.mkdir()
    (decoy / "labels.csv").write_text("path,patient,view,finding,report\n", encoding="utf-8")
    kwargs = {"image_size": 8, "mean": (0,) * 3, "std": (1,) * 3, "seed": 0}
    cfg = {"source": "mine/spec.yaml", "path": "covid-cxr"}
    with pytest.warns(UserWarning, match=r"data\.path .*covid-cxr.* is not used with a spec"):
        datasets = build_datasets(cfg, tmp_path, **kwargs)
    assert sum(len(d) for d in datasets.values()) == 10
    assert all(r.image.is_relative_to(tmp_path / "mine") for r in datasets["train"].records)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # data.path naming the spec's folder: nothing to say
        build_datasets({**cfg, "path": "mine"}, tmp_path, **kwargs)
    assert main(["data", "check", str(spec), "--no-decode"]) == 0
    assert "samples: 10" in capsys.readouterr().out
    # Errors show the absolute paths that were tried.
    (tmp_path / "mine" / "labels.csv").unlink()
    with pytest.raises(ValueError, match=rf"{tmp_path / 'mine' / 'labels.csv'}: table file not"):
        build_datasets({"source": "mine/spec.yaml"}, tmp_path, **kwargs)
    with pytest.raises(ValueError, match=rf"not found \(tried {tmp_path / 'nope.yaml'} or "):
        build_datasets({"source": "nope.yaml"}, tmp_path, **kwargs)


def test_an_empty_dataset_is_an_error_everywhere(tmp_path, capsys):
    spec = spec_dataset(tmp_path, n=0)  # a table with a header and no rows
    assert main(["data", "check", str(spec)]) == 1
    out = capsys.readouterr().out
    assert "samples: 0 (error: no usable samples" in out and "result: 1 error(s)" in out
    assert main(["data", "split", str(spec), "--output", str(tmp_path / "s.csv")]) == 1
    assert "no usable samples to split" in capsys.readouterr().err
    assert not (tmp_path / "s.csv").exists()
    kwargs = {"image_size": 8, "mean": (0,) * 3, "std": (1,) * 3, "seed": 0}
    with pytest.raises(ValueError, match="no usable samples"):
        build_datasets({"source": str(spec)}, None, **kwargs)


def test_missing_value_spellings_are_missing_and_counted(tmp_path, capsys):
    spec = spec_dataset(tmp_path, n=8)
    table = tmp_path / "labels.csv"
    rows = table.read_text(encoding="utf-8").splitlines()
    spelled = {1: "NaN", 2: " nan ", 3: "N/A", 4: "NA", 5: "null", 6: "None"}
    for row, text in spelled.items():  # the finding column of data rows 1-6
        cells = rows[row].split(",")
        cells[3] = text
        rows[row] = ",".join(cells)
    rows[7] = rows[7].replace(",report 0", ",#N/A")  # a blank report, spelled
    table.write_text("\n".join(rows) + "\n", encoding="utf-8")
    report_file = tmp_path / "r.json"
    assert main(["data", "check", str(spec), "--no-decode", "--output", str(report_file)]) == 0
    out = capsys.readouterr().out
    # "None" stays a class (often a finding: no finding); the others are missing.
    assert "level 0 'finding' (multi-label, 2 classes, 6 missing):\n       1  None\n" in out
    assert "level 1 'report' (single-label, 3 classes, 1 missing)" in out
    assert "cells read as missing: 6 (spelled as one of 'nan', 'n/a', 'na', '#n/a'" in out
    for text in ("finding: 'NaN'", "finding: 'nan'", "finding: 'N/A'", "report: '#N/A'"):
        assert f"       1  {text}" in out
    report = json.loads(report_file.read_text())
    assert {"column": "finding", "value": "null", "cells": 1} in report["missing_cells"]
    finding_counts = report["levels"][0]["counts"]
    assert not {"NaN", "nan", "N/A", "NA", "null"} & set(finding_counts)
