"""`mgll ablate`: its variants, the label dropping, and a quick run on the real fundus photos."""

from __future__ import annotations

import json

import pytest

from data_fixtures import require_shared, spec_dataset
from goldens import ablation_view, matches_golden
from mgll.cli import main
from mgll.demo.ablate import label_dropping_builder, variants


def test_variants_cover_the_loss_terms_the_levels_and_missing_labels():
    rows = {v.name: v for v in variants(3)}
    assert rows["CLIP (joined caption)"].loss == "clip"
    off = dict(rows["point-wise only"].overrides)
    assert off == {"loss.weights.sclip": 0.0, "loss.weights.skl": 0.0}
    assert dict(rows["soft CLIP only"].overrides) == {
        "loss.weights.pointwise": 0.0,
        "loss.weights.skl": 0.0,
    }
    assert dict(rows["soft CLIP + point-wise"].overrides) == {"loss.weights.skl": 0.0}
    assert rows["MGLL, all three terms (3 levels)"].overrides == ()
    assert dict(rows["MGLL, 1 level"].overrides) == {"data.levels": [0]}
    assert dict(rows["MGLL, 2 levels"].overrides) == {"data.levels": [0, 1]}
    assert rows["MGLL, 30% of finest-level labels dropped"].drop_fraction == 0.3
    assert len(rows) == 8


def test_label_dropping_removes_that_share_of_training_labels_at_the_finest_level(tmp_path):
    spec = spec_dataset(tmp_path, n=20)
    cfg = {"source": str(spec), "split": {"train": 0.6, "val": 0.2, "test": 0.2}}
    prepared = label_dropping_builder(0.5, seed=0)(cfg, None, 0)
    train = prepared.indices["train"]
    finest = len(prepared.levels) - 1
    dropped = [i for i in train if not prepared.records.records[i].labels[finest]]
    assert len(dropped) == round(0.5 * len(train))
    others = [i for i in range(len(prepared.records.records)) if i not in set(train)]
    assert all(prepared.records.records[i].labels[finest] for i in others)
    again = label_dropping_builder(0.5, seed=0)(cfg, None, 0)
    assert [i for i in train if not again.records.records[i].labels[finest]] == dropped


@pytest.mark.shared_data
@pytest.mark.slow
def test_quick_ablation_on_the_fundus_photos(tmp_path, capsys):
    root = require_shared("csdi-fundus").parent
    out = tmp_path / "ablate"
    args = ["ablate", "--data-root", str(root), "--output-dir", str(out), "--quick"]
    assert main([*args, "--seeds", "1"]) == 0
    summary = json.loads((out / "ablation.json").read_text())
    # The numbers recorded (tests/goldens.py: exact where the data decide, within the measured
    # cross-machine spread where a model does; each pretraining run's losses too).
    matches_golden(ablation_view(out), "ablate-quick.json")
    names = [row["variant"] for row in summary["rows"]]
    assert names[0] == "CLIP (joined caption)" and len(names) == 7  # CSDI has 2 levels
    for row in summary["rows"]:
        assert 0.0 <= row["mean"] <= 1.0 and len(row["auc_macro"]) == 1
    table = (out / "ablation.md").read_text()
    assert "| point-wise only |" in table and table in capsys.readouterr().out
    # Another --quick setting on the same folder is refused, nothing rerun.
    assert main(["ablate", "--data-root", str(root), "--output-dir", str(out), "--seeds", "1"]) == 1
