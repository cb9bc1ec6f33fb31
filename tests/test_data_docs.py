"""The per-image-labels recipe of docs/data.md runs as printed and gives what it says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from data_fixtures import write_png
from mgll.cli import main
from mgll.data import records_from_spec

DOCS = Path(__file__).resolve().parents[1] / "docs" / "data.md"


def _recipe() -> str:
    """The python block under the "one label file each" heading of docs/data.md."""
    text = DOCS.read_text(encoding="utf-8")
    section = text[text.index("### Images with one label file each") :]
    start = section.index("```python\n") + len("```python\n")
    return section[start : section.index("```\n", start)]


def test_yolo_recipe_writes_a_table_and_spec_mgll_reads(tmp_path, capsys):
    data = tmp_path / "my_dataset"
    (data / "images").mkdir(parents=True)
    (data / "labels").mkdir()
    (data / "classes.txt").write_text("nodule\nmass\neffusion\n", encoding="utf-8")
    boxes = {
        "a": "1 0.5 0.5 0.2 0.2\n0 0.1 0.1 0.05 0.05\n1 0.7 0.7 0.1 0.1\n",  # mass twice, nodule
        "b": "2 0.5 0.5 0.3 0.3\n",
        "c": "",  # an empty label file: no box
    }
    for stem, text in boxes.items():
        (data / "labels" / f"{stem}.txt").write_text(text, encoding="utf-8")
    for stem in ("a", "b", "c", "d"):  # d has no label file at all: no box either
        write_png(data / "images" / f"{stem}.png")
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    result = subprocess.run(
        [sys.executable, "-c", _recipe()], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "4 images" in result.stdout
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before  # data untouched

    spec = tmp_path / "my_dataset_spec" / "spec.yaml"
    records = records_from_spec(spec)
    by_image = {r.image.name: r for r in records.records}
    assert by_image["a.png"].labels == [["abnormal"], ["mass", "nodule"]]
    assert by_image["b.png"].labels == [["abnormal"], ["effusion"]]
    assert by_image["c.png"].labels == by_image["d.png"].labels == [["normal"], ["no finding"]]
    assert by_image["a.png"].texts[1] == ["A chest X-ray showing mass, nodule."]
    assert by_image["d.png"].image == (data / "images" / "d.png").absolute()
    split = ["--train", "0.5", "--val", "0.25", "--test", "0.25"]
    assert main(["data", "check", str(spec), *split]) == 0
    assert "result: OK" in capsys.readouterr().out
