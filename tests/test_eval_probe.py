"""``mgll probe``: outputs, metrics recomputed from predictions.csv, cache, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from data_fixtures import require_shared
from eval_fixtures import make_downstream, pretrained_run  # noqa: F401 (a fixture)
from mgll.cli import main
from mgll.eval.results import read_predictions, read_results
from mgll.metrics import HEADLINE


def _recomputed_auc(folder) -> float:
    pred = read_predictions(folder)
    results = read_results(folder)
    y, s = pred["y"], pred["scores"]
    if results["task"]["type"] == "binary":
        return roc_auc_score(y[:, 1], s[:, 1])
    present = [c for c in range(y.shape[1]) if 0 < y[:, c].sum() < len(y)]
    return float(np.mean([roc_auc_score(y[:, c], s[:, c]) for c in present]))


def _probe(tmp_path, *extra: str) -> int:
    return main(
        [
            "probe",
            "--num-workers",
            "0",
            "--bootstrap",
            "50",
            "--no-progress",
            "--cache-dir",
            str(tmp_path / "features"),
            *extra,
        ]
    )


def test_probe_on_a_synthetic_set_writes_every_output(tmp_path, capsys):
    data = make_downstream(tmp_path / "grades")
    out = tmp_path / "out"
    args = ["--encoder", "random:mgll-vit-test-32:0", "--data", str(data), "--level", "grade"]
    assert _probe(tmp_path, *args, "--output-dir", str(out)) == 0
    assert "| auc_macro |" in capsys.readouterr().out
    results = read_results(out)
    assert {p.name for p in out.iterdir()} >= {
        "results.json",
        "predictions.csv",
        "split.csv",
        "roc.png",
        "confusion.png",
    }
    assert results["protocol"] == "linear_probe"
    assert results["task"] == {
        "data": str(data),
        "level": "grade",
        "type": "multiclass",
        "classes": ["0", "1", "2"],
        "ordinal": True,
        "merged": {},
    }
    assert results["split"]["from"] == "default" and results["split"]["settings"] == {
        "mode": "source"
    }
    assert results["n_test"] == 12 and results["n_patients_test"] == 12
    assert results["encoder"]["spec"] == "random:mgll-vit-test-32:0"
    metrics = results["metrics"]
    for name in HEADLINE:
        assert name in metrics and f"{name}_ci95" in metrics
    assert metrics["auc_macro"] == pytest.approx(_recomputed_auc(out))
    assert metrics["auc_macro"] > 0.9  # brightness separates the classes
    assert results["per_class"]["1"]["n_pos"] == 4
    assert results["details"]["features_from_cache"] is False

    # Second probe of the same encoder and data: features come from the cache.
    again = tmp_path / "again"
    assert _probe(tmp_path, *args, "--output-dir", str(again), "--label-fraction", "0.5,1") == 0
    half = read_results(again / "fraction-0.5")
    assert half["details"]["features_from_cache"] is True
    assert half["details"]["n_train"] == 12
    summary = json.loads((again / "summary.json").read_text())
    assert set(summary["fractions"]) == {"0.5", "1"}
    assert read_results(again / "fraction-1")["metrics"]["auc_macro"] == metrics["auc_macro"]


def test_bad_level_encoder_and_single_class_test_split_fail_clearly(tmp_path, capsys):
    data = make_downstream(tmp_path / "grades", test_classes=("1",))
    base = ["--data", str(data), "--output-dir", str(tmp_path / "o")]
    enc = ["--encoder", "random:mgll-vit-test-32:0"]
    assert _probe(tmp_path, *enc, *base, "--level", "stage") == 1
    err = capsys.readouterr().err
    assert err.startswith("mgll probe: error: level 'stage' does not exist") and "grade" in err
    assert _probe(tmp_path, "--encoder", "nothing/here", *base, "--level", "grade") == 1
    err = capsys.readouterr().err
    assert "encoder 'nothing/here'" in err and "random:ARCH[:SEED]" in err
    assert _probe(tmp_path, *enc, *base, "--level", "grade") == 1
    err = capsys.readouterr().err
    assert "test split (12 images) holds a single class (1)" in err
    assert not (tmp_path / "o" / "results.json").exists()


@pytest.mark.shared_data
def test_probe_of_a_random_tower_on_csdi_severity(tmp_path):
    data_root = require_shared("csdi-fundus").parent
    out = tmp_path / "csdi"
    argv = [
        "--encoder",
        "random:mgll-vit-test-32:0",
        "--data",
        "csdi-fundus",
        "--data-root",
        str(data_root),
        "--level",
        "severity",
        "--ordinal",
        "--output-dir",
        str(out),
    ]
    assert _probe(tmp_path, *argv) == 0
    results = read_results(out)
    assert results["task"]["classes"] == ["Normal", "Acceptable", "Mild", "Moderate", "Severe"]
    assert results["task"]["ordinal"] and results["metrics"]["kappa_quadratic"] is not None
    assert results["metrics"]["auc_macro"] == pytest.approx(_recomputed_auc(out))
    assert results["n_test"] == len(read_predictions(out)["images"])
    # The same floor on a chest X-ray level (multi-label).
    xray = tmp_path / "xray"
    argv = [
        "--encoder",
        "random:mgll-vit-test-32:0",
        "--data",
        "covid-cxr",
        "--data-root",
        str(data_root),
        "--level",
        "category",
        "--output-dir",
        str(xray),
    ]
    assert _probe(tmp_path, *argv) == 0
    assert read_results(xray)["task"]["type"] == "multilabel"
    assert read_results(xray)["metrics"]["auc_macro"] == pytest.approx(_recomputed_auc(xray))


@pytest.mark.shared_data
@pytest.mark.slow
def test_probe_of_a_pretrained_run_uses_its_split_on_the_xray_levels(
    tmp_path,
    pretrained_run,  # noqa: F811 (the imported fixture)
):
    from mgll.eval.encoders import load_encoder
    from mgll.eval.options import EvalOptions
    from mgll.eval.probe import linear_probe
    from mgll.eval.task import load_eval_data

    data_root = require_shared("covid-cxr").parent
    encoder = load_encoder(pretrained_run)
    options = EvalOptions(n_resamples=50, cache_dir=tmp_path / "f", quiet=True)
    for level, kind in (("category", "multilabel"), ("type", "multiclass")):
        data = load_eval_data(
            "covid-cxr", level, data_root=data_root, encoder_config=encoder.run_config
        )
        out = tmp_path / level
        results = linear_probe(encoder, data, out, options)
        assert results["task"]["type"] == kind
        assert results["split"]["from"] == "the pretraining run's data.split"
        assert results["encoder"]["kind"] == "run"
        assert results["metrics"]["auc_macro"] == pytest.approx(_recomputed_auc(out))
    # The run on another dataset: that dataset's own (default) split.
    csdi = load_eval_data(
        "csdi-fundus", "severity", data_root=data_root, encoder_config=encoder.run_config
    )
    results = linear_probe(encoder, csdi, tmp_path / "csdi", options)
    assert results["split"]["from"] == "default"
    assert results["metrics"]["auc_macro"] == pytest.approx(_recomputed_auc(tmp_path / "csdi"))
    # The test patients are the pretraining run's test patients.
    from mgll.data.build import build_datasets
    from mgll.data.splits import patient_key

    run_test = build_datasets(
        encoder.run_config["data"],
        data_root,
        image_size=32,
        mean=(0, 0, 0),
        std=(1, 1, 1),
        seed=encoder.run_config["train"]["seed"],
    )["test"]
    run_patients = {patient_key(r) for r in run_test.records}
    assert set(data.patients(data.rows["test"])) <= run_patients
