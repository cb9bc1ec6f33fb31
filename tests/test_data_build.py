"""From a table to the batch: what build_datasets makes of blank cells, split options and
unreadable images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_fixtures import write_png
from mgll.data import build_datasets, collate_samples

SPEC = """
table: labels.csv
image: {column: path, root: images}
patient: patient
levels:
  - name: finding
    label: finding
    prompt: "A chest X-ray showing {label}."
"""


def _table(folder, rows):
    """rows: (file, patient, finding, pixel value); equal values give identical files."""
    (folder / "images").mkdir()
    lines = ["path,patient,finding"]
    for name, patient, finding, value in rows:
        write_png(folder / "images" / name, np.full((8, 8), value, dtype=np.uint8))
        lines.append(f"{name},{patient},{finding}")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "spec.yaml").write_text(SPEC, encoding="utf-8")
    return folder


def _build(folder, **data):
    cfg = {"source": "spec.yaml", "cache_dir": False, **data}
    return build_datasets(cfg, folder, image_size=8, mean=(0.5,) * 3, std=(0.5,) * 3, seed=0)


def test_a_blank_single_label_cell_is_missing_in_the_batch_not_class_0(tmp_path):
    folder = _table(tmp_path, [("a.png", "p1", "Mass", 10), ("b.png", "p2", "", 20)])
    data = _build(folder, split={"train": 1.0, "val": 0.0, "test": 0.0})["train"]
    assert not data.levels[0].multi_label and data.levels[0].vocabulary == ["Mass"]
    batch = collate_samples([data[i] for i in range(len(data))])
    pairs = zip(batch["indices"].tolist(), batch["labels"][0].tolist(), strict=True)
    by_file = {data.records[i].image.name: v for i, v in pairs}
    assert by_file == {"a.png": 0, "b.png": -1}
    assert batch["labels"][0].dtype == torch.long


def test_split_link_identical_from_the_config_reaches_the_split(tmp_path):
    # 12 patients; patients 2k and 2k+1 hold byte-identical images (the same scan twice).
    rows = [(f"{p}.png", f"p{p}", "Mass", 10 * (p // 2)) for p in range(12)]
    folder = _table(tmp_path, rows)
    fractions = {"train": 0.5, "val": 0.25, "test": 0.25, "seed": 1}

    def split_of(**extra):
        datasets = _build(folder, split={**fractions, **extra})
        return {r.patient_id: name for name, d in datasets.items() for r in d.records}

    linked = split_of(link_identical=True)
    assert all(linked[f"p{2 * k}"] == linked[f"p{2 * k + 1}"] for k in range(6))
    plain = split_of()  # without linking, some identical pair is split apart
    assert any(plain[f"p{2 * k}"] != plain[f"p{2 * k + 1}"] for k in range(6))


def test_the_image_replacement_limit_is_honoured(tmp_path):
    folder = _table(tmp_path, [(f"{i}.png", f"p{i}", "Mass", 10) for i in range(5)])
    data = _build(folder, split={"train": 1.0, "val": 0.0, "test": 0.0})["train"]
    order = sorted(range(5), key=lambda i: data.records[i].image.name)
    for i in order[:3]:
        data.records[i].image.write_bytes(b"not an image")
    data.max_replacements = 1
    with (
        pytest.warns(UserWarning, match="unreadable"),
        pytest.raises(RuntimeError, match="2 consecutive images"),
    ):
        data[order[0]]
    data.max_replacements = 3  # three broken, the fourth reads
    with pytest.warns(UserWarning, match="unreadable"):
        assert data[order[0]]["index"] == order[3]
