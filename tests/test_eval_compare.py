"""``mgll compare`` on output folders: a noisier copy loses, other test sets are refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mgll.cli import main
from mgll.eval.results import read_predictions, write_predictions


def _fake_output(folder, n=80, noise=0.0, seed=0, drop=0):
    """A results folder of a binary task whose scores follow the labels (plus noise)."""
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, n)
    logit = 2.0 * (2 * truth - 1) + rng.normal(size=n)
    logit = logit + noise * np.random.default_rng(seed).normal(size=n)
    p = 1 / (1 + np.exp(-logit))
    keep = np.arange(drop, n)
    folder.mkdir(parents=True)
    write_predictions(
        folder / "predictions.csv",
        [f"img{i}.png" for i in keep],
        [f"p{i // 2}" for i in keep],
        ["no", "yes"],
        np.eye(2, dtype=int)[truth[keep]],
        np.stack([1 - p, p], 1)[keep],
    )
    results = {
        "task": {"level": "finding", "type": "binary", "classes": ["no", "yes"], "ordinal": False},
        "encoder": {"spec": f"enc-noise-{noise}"},
        "protocol": "linear_probe",
        "thresholds": {"no": 0.5, "yes": 0.5},
    }
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def test_compare_finds_the_noisier_encoder_worse(tmp_path, capsys):
    a = _fake_output(tmp_path / "a")
    b = _fake_output(tmp_path / "b", noise=3.0)
    # Rows in another order must be matched by image.
    pred = read_predictions(b)
    order = np.arange(len(pred["images"]))[::-1]
    write_predictions(
        b / "predictions.csv",
        [pred["images"][i] for i in order],
        [pred["patients"][i] for i in order],
        pred["classes"],
        pred["y"][order],
        pred["scores"][order],
    )
    out = tmp_path / "cmp"
    argv = ["compare", str(a), str(b), "--bootstrap", "200", "--no-progress"]
    assert main([*argv, "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| auc_macro |" in printed and "enc-noise-3.0" in printed
    result = json.loads((out / "comparison.json").read_text())
    auc = result["comparisons"][0]["metrics"]["auc_macro"]
    # The AUCs of the predictions written above, by scikit-learn (b's rows in any order).
    truth_a, truth_b = read_predictions(a)["y"][:, 1], pred["y"][:, 1]
    auc_a = roc_auc_score(truth_a, read_predictions(a)["scores"][:, 1])
    auc_b = roc_auc_score(truth_b, pred["scores"][:, 1])
    assert (auc["a"], auc["b"]) == pytest.approx((auc_a, auc_b))
    assert auc["diff"] == pytest.approx(auc_a - auc_b) and auc["diff"] > 0
    assert auc["ci95"][0] > 0 and auc["p_value"] < 0.05
    assert result["n_patients_test"] == 40
    assert (out / "comparison.md").read_text().startswith("A = enc-noise-0.0 [linear_probe]")
    # A folder against itself: no difference.
    shutil.copytree(a, tmp_path / "a2")
    assert (
        main(
            [
                "compare",
                str(a),
                str(tmp_path / "a2"),
                "--bootstrap",
                "50",
                "--no-progress",
                "--output-dir",
                str(tmp_path / "same"),
            ]
        )
        == 0
    )
    same = json.loads((tmp_path / "same" / "comparison.json").read_text())
    assert same["comparisons"][0]["metrics"]["auc_macro"]["p_value"] == 1.0


def test_compare_refuses_different_test_sets_and_tasks(tmp_path, capsys):
    a = _fake_output(tmp_path / "a")
    fewer = _fake_output(tmp_path / "fewer", drop=5)
    assert main(["compare", str(a), str(fewer), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mgll compare: error:") and "different test sets" in err
    other = _fake_output(tmp_path / "other")
    results = json.loads((other / "results.json").read_text())
    results["task"]["level"] = "severity"
    (other / "results.json").write_text(json.dumps(results))
    assert main(["compare", str(a), str(other), "--no-progress"]) == 1
    assert "different tasks (level" in capsys.readouterr().err
    assert main(["compare", str(a), str(tmp_path / "none"), "--no-progress"]) == 1
    assert "results.json: missing" in capsys.readouterr().err
    # A predictions file without label columns is named, not a numpy reshape error.
    broken = _fake_output(tmp_path / "broken")
    (broken / "predictions.csv").write_text("image,patient\nimg0.png,p0\n")
    assert main(["compare", str(a), str(broken), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert "broken/predictions.csv: no label:<class> columns" in err and "\n" not in err
