"""``mgll probe``: outputs, the probe and its macro AUC against scikit-learn on hand-made
features, cache, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from data_fixtures import require_shared
from eval_fixtures import make_downstream, pretrained_run  # noqa: F401 (a fixture)
from mgll.cli import main
from mgll.data.records import Record, RecordSet, build_levels
from mgll.eval.options import EvalOptions
from mgll.eval.probe import DEFAULT_C_GRID, linear_probe
from mgll.eval.results import read_predictions, read_results
from mgll.eval.task import EvalData, build_task
from mgll.metrics import HEADLINE
from test_eval_guards import _stub_features, _StubEncoder


def _hand_made(task_type: str) -> tuple[np.ndarray, EvalData]:
    """60 training, 36 validation and 36 test vectors of a 3-class (one class per image) or
    3-label (one to three labels per image) task; the test vectors are scaled and shifted, so
    statistics fitted on them would change every score."""
    rng = np.random.default_rng(3)
    names = ["low", "mid", "high"]
    centres = 0.7 * rng.normal(size=(3, 6))
    blocks, labels, rows, start = [], [], {}, 0
    for split, n in (("train", 60), ("val", 36), ("test", 36)):
        hot = np.eye(3, dtype=bool)[np.arange(n) % 3]
        if task_type == "multilabel":
            hot |= rng.random((n, 3)) < 0.35
        x = rng.normal(size=(n, 6)) + hot @ centres
        blocks.append(2.0 * x + 1.5 if split == "test" else x)
        labels += [[name for name, on in zip(names, row, strict=True) if on] for row in hot]
        rows[split] = np.arange(start, start + n)
        start += n
    records = [
        Record(image=Path(f"/nowhere/{i}.png"), texts=[["x"]], labels=[lab], patient_id=f"p{i}")
        for i, lab in enumerate(labels)
    ]
    levels = build_levels(["grade"], records, multi_label=[task_type == "multilabel"])
    record_set = RecordSet(levels=levels, records=records, source="hand-made")
    task, y, _ = build_task(record_set, "grade")
    assert task.type == task_type
    data = EvalData.from_rows(record_set, Path("/nowhere"), task, y, rows, source="hand-made")
    return np.concatenate(blocks), data


def _sklearn_probe(x: np.ndarray, y: np.ndarray, rows: dict, multilabel: bool):
    """The probe by hand: training statistics, per C of the grid (ascending) a logistic
    regression (one per label for multi-label), C by validation macro AUC then accuracy."""
    mean, std = x[rows["train"]].mean(0), x[rows["train"]].std(0) + 1e-6
    z = (x - mean) / std
    train, val = rows["train"], rows["val"]

    def fit(c):
        if multilabel:
            models = [
                LogisticRegression(C=c, max_iter=1000).fit(z[train], y[train, k]) for k in range(3)
            ]
            return lambda r: np.stack([m.predict_proba(z[r])[:, 1] for m in models], 1)
        model = LogisticRegression(C=c, max_iter=1000).fit(z[train], y[train].argmax(1))
        return lambda r: model.predict_proba(z[r])

    best = None
    for c in sorted(DEFAULT_C_GRID):
        scores = fit(c)
        p = scores(val)
        if multilabel:
            key = (roc_auc_score(y[val], p, average="macro"), np.mean((p >= 0.5) == y[val]))
        else:
            key = (
                roc_auc_score(y[val].argmax(1), p, multi_class="ovr"),
                np.mean(p.argmax(1) == y[val].argmax(1)),
            )
        if best is None or key > best[0]:
            best = (key, c, scores(rows["test"]))
    return best[1], best[2]


@pytest.mark.parametrize("task_type", ["multiclass", "multilabel"])
def test_probe_and_its_macro_auc_are_scikit_learns_on_hand_made_features(
    tmp_path, monkeypatch, task_type
):
    x, data = _hand_made(task_type)
    _stub_features(monkeypatch, x)
    options = EvalOptions(n_resamples=20, quiet=True)
    results = linear_probe(_StubEncoder(), data, tmp_path / "probe", options)
    c, expected = _sklearn_probe(x, data.y, data.rows, task_type == "multilabel")
    assert results["details"]["C"] == c
    written = read_predictions(tmp_path / "probe")
    assert written["images"] == [f"{i}.png" for i in data.rows["test"]]
    # (the probe refits warm over the grid, so its optimum differs from a cold fit by < 0.01)
    np.testing.assert_allclose(written["scores"], expected, atol=0.02)
    y_test = data.y[data.rows["test"]]
    if task_type == "multilabel":
        auc = roc_auc_score(y_test, expected, average="macro")
    else:
        auc = roc_auc_score(y_test.argmax(1), expected, multi_class="ovr")
    assert results["metrics"]["auc_macro"] == pytest.approx(auc, abs=0.005)


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
    # The run on another dataset: that dataset's own (default) split.
    csdi = load_eval_data(
        "csdi-fundus", "severity", data_root=data_root, encoder_config=encoder.run_config
    )
    results = linear_probe(encoder, csdi, tmp_path / "csdi", options)
    assert results["split"]["from"] == "default"
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
