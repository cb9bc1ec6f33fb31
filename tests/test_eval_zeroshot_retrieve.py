"""``mgll zeroshot`` and ``mgll retrieve``: hand-checked kernels and a briefly pretrained run."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from data_fixtures import require_shared
from eval_fixtures import pretrained_run  # noqa: F401 (a fixture)
from mgll.cli import main
from mgll.eval.results import read_predictions, read_results
from mgll.eval.retrieve import retrieval_metrics
from mgll.eval.zeroshot import zero_shot_scores


def test_zero_shot_scores_are_softmax_over_scaled_cosines():
    images = np.array([[1.0, 0.0], [0.0, 2.0]])
    texts = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scale = np.log(10.0)
    got = zero_shot_scores(images, texts, None, scale)
    expected = torch.tensor([[10.0, 6.0], [0.0, 8.0]]).softmax(1).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # Multi-label: positive vs negative prompt of each label.
    negative = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    got = zero_shot_scores(images, texts, negative, scale)
    assert got[0, 0] == pytest.approx(1 / (1 + np.exp(0 - 10)))  # cos 1 vs cos 0
    assert got[1, 1] == pytest.approx(1 / (1 + np.exp(0 - 8)))


def test_retrieval_metrics_by_hand():
    # 3 images, 2 texts; image 0 and 1 carry text 0, image 2 text 1.
    similarity = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7]])
    own = np.array([0, 0, 1])
    image_labels = np.array([[1, 0], [1, 0], [0, 1]])
    text_labels = np.array([[1, 0], [0, 1]])
    hits = retrieval_metrics(similarity, own, image_labels, text_labels, ks=(1, 2))
    np.testing.assert_array_equal(hits["i2t_R@1"], [1, 0, 1])
    np.testing.assert_array_equal(hits["i2t_rank"], [1, 2, 1])
    # text 0 ranks images 0 (0.9), 2 (0.3), 1 (0.2); text 1 ranks 1 (0.8), 2 (0.7), 0.
    np.testing.assert_array_equal(hits["t2i_R@1"], [1, 0])
    np.testing.assert_array_equal(hits["t2i_R@2"], [1, 1])
    np.testing.assert_array_equal(hits["t2i_P@2"], [0.5, 0.5])
    np.testing.assert_array_equal(hits["i2t_P@2"], [0.5, 0.5, 0.5])


@pytest.mark.shared_data
@pytest.mark.slow
def test_zeroshot_and_retrieval_of_a_pretrained_run_then_compare_with_a_probe(
    tmp_path,
    pretrained_run,  # noqa: F811 (the imported fixture)
    capsys,
):
    data_root = require_shared("covid-cxr").parent
    common = [
        "--data",
        "covid-cxr",
        "--data-root",
        str(data_root),
        "--num-workers",
        "0",
        "--bootstrap",
        "50",
        "--no-progress",
        "--cache-dir",
        str(tmp_path / "f"),
    ]
    zs = tmp_path / "zs"
    assert (
        main(
            [
                "zeroshot",
                "--model",
                str(pretrained_run),
                "--level",
                "type",
                "--output-dir",
                str(zs),
                *common,
            ]
        )
        == 0
    )
    results = read_results(zs)
    assert results["protocol"] == "zeroshot"
    assert results["details"]["prompt_source"].startswith("the dataset's class texts")
    assert results["details"]["prompts"]["Viral"] == ["A chest X-ray showing viral pneumonia."]
    pred = read_predictions(zs)
    np.testing.assert_allclose(pred["scores"].sum(1), 1.0, atol=1e-6)
    present = [c for c in range(pred["y"].shape[1]) if 0 < pred["y"][:, c].sum() < len(pred["y"])]
    auc = np.mean([roc_auc_score(pred["y"][:, c], pred["scores"][:, c]) for c in present])
    assert results["metrics"]["auc_macro"] == pytest.approx(auc)

    # The Python API on one loaded model: a probe of its image tower, then compare via the CLI.
    from mgll.eval.data import load_eval_data
    from mgll.eval.encoders import encoder_from_model
    from mgll.eval.probe import linear_probe
    from mgll.eval.retrieve import retrieval
    from mgll.eval.zeroshot import zero_shot
    from mgll.training.checkpoint import load_model

    model, config = load_model(pretrained_run)
    category = load_eval_data("covid-cxr", "category", data_root=data_root, encoder_config=config)
    details = zero_shot(
        model,
        category,
        tmp_path / "zs-ml",
        name="run",
        templates=["a chest X-ray showing {}"],
        n_resamples=20,
        cache_dir=tmp_path / "f",
        progress=False,
    )["details"]
    assert details["negative_prompts"]["ARDS"] == ["a chest X-ray showing no ARDS"]
    assert details["prompts"]["ARDS"] == ["a chest X-ray showing ARDS"]
    probe = tmp_path / "probe"
    data = load_eval_data("covid-cxr", "type", data_root=data_root, encoder_config=config)
    linear_probe(
        encoder_from_model(model, "run", config),
        data,
        probe,
        n_resamples=50,
        cache_dir=tmp_path / "f",
        progress=False,
    )
    capsys.readouterr()
    assert main(["compare", str(probe), str(zs), "--bootstrap", "50", "--no-progress"]) == 0
    assert "| auc_macro |" in capsys.readouterr().out

    rt = tmp_path / "rt"
    notes = load_eval_data("covid-cxr", "notes", data_root=data_root, encoder_config=config)
    results = retrieval(
        model,
        notes,
        rt,
        name=str(pretrained_run),
        n_resamples=50,
        cache_dir=tmp_path / "f",
        progress=False,
    )
    assert read_results(rt) == results
    assert (
        main(
            [
                "retrieve",
                "--model",
                str(pretrained_run),
                "--level",
                "notes",
                "--output-dir",
                str(rt),
                *common,
            ]
        )
        == 0
    )
    results = read_results(rt)
    assert results["protocol"] == "retrieval" and results["n_texts"] > 10
    with (rt / "retrieval.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == results["n_test"]
    ranks = np.array([int(r["rank_of_own_text"]) for r in rows])
    assert results["metrics"]["i2t_R@5"] == pytest.approx(np.mean(ranks <= 5))
    lo, hi = results["metrics"]["i2t_R@5_ci95"]
    assert lo <= results["metrics"]["i2t_R@5"] <= hi
    assert (rt / "recall.png").stat().st_size > 0
