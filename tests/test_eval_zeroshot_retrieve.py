"""``mgll zeroshot`` and ``mgll retrieve``: hand-checked kernels and a briefly pretrained run."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from data_fixtures import require_shared
from eval_fixtures import pretrained_run  # noqa: F401 (a fixture)
from mgll.cli import main
from mgll.eval.results import read_predictions, read_results
from mgll.eval.zeroshot import zero_shot_scores
from mgll.metrics import retrieval_hits


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
    hits = retrieval_hits(similarity, own, image_labels, text_labels, ks=(1, 2))
    np.testing.assert_array_equal(hits["i2t_R@1"], [1, 0, 1])
    np.testing.assert_array_equal(hits["i2t_rank"], [1, 2, 1])
    # text 0 ranks images 0 (0.9), 2 (0.3), 1 (0.2); text 1 ranks 1 (0.8), 2 (0.7), 0.
    np.testing.assert_array_equal(hits["t2i_R@1"], [1, 0])
    np.testing.assert_array_equal(hits["t2i_R@2"], [1, 1])
    np.testing.assert_array_equal(hits["t2i_P@2"], [0.5, 0.5])
    np.testing.assert_array_equal(hits["i2t_P@2"], [0.5, 0.5, 0.5])


class _TextTable(torch.nn.Module):
    """A stand-in model whose text embedding is a fixed vector per string (and per tower)."""

    def __init__(self, vectors: dict[str, list[float]], towers: int = 1):
        super().__init__()
        self.vectors = vectors
        self.text_per_level = towers > 1
        self.text_towers = [None] * towers
        self.levels_asked: list[int] = []

    def encode_text(self, strings, level=0):
        self.levels_asked.append(level)
        return torch.tensor([self.vectors[s] for s in strings])


def _grade_data(n: int = 12):
    """EvalData of a 'grade' task whose finest level is one description per image."""
    from mgll.data.records import Record, RecordSet, build_levels
    from mgll.eval.task import EvalData, build_task

    grades = ["low", "high", "low"]
    records = [
        Record(
            image=Path(f"/nowhere/{i}.png"),
            texts=[[f"grade {grades[i % 3]}"], [f"report {i % (n // 2)}"]],
            labels=[[grades[i % 3]], [f"report {i % (n // 2)}"]],
            patient_id=f"p{i // 2}",
        )
        for i in range(n)
    ]
    levels = build_levels(["grade", "report"], records, multi_label=[False, False])
    record_set = RecordSet(levels=levels, records=records, source="synthetic")
    task, y, _ = build_task(record_set, "grade")
    everything = np.arange(n)
    return EvalData(
        records=record_set,
        folder=Path("/nowhere"),
        task=task,
        y=y,
        rows={"train": everything[:0], "val": everything[:0], "test": everything},
        split_info={},
        source="synthetic",
        split_indices={"train": [], "val": [], "test": everything.tolist()},
    )


def test_score_retrieval_ranks_the_gallery_and_judges_p_at_k_by_the_task_labels():
    from mgll.eval.retrieve import retrieval_texts, score_retrieval

    data = _grade_data()
    rows, texts = retrieval_texts(data, data.rows["test"], "report")
    assert texts[0] == "report 0" and texts[6] == "report 0"  # images 0 and 6 share a text
    angle = {f"report {j}": [np.cos(j), np.sin(j)] for j in range(6)}
    model = _TextTable(angle, towers=2)
    images = np.array([angle[t] for t in texts]) * 3.0  # own text exactly; scale ignored
    scores = score_retrieval(model, images, texts, data.y[rows], text_level=1)
    assert model.levels_asked == [1]  # the report level's own tower
    assert scores.gallery == [f"report {j}" for j in range(6)]
    hits = scores.hits(ks=(1, 2))
    np.testing.assert_array_equal(hits["i2t_R@1"], np.ones(12))
    references = scores.references(ks=(1, 2))
    np.testing.assert_array_equal(references["gallery"], np.full(12, 6.0))
    # Text j's labels: the grades of images j and j + 6, i.e. grades[j % 3] and grades[j % 3]
    # (6 is a multiple of 3), so 4 of the 6 texts are "low" and 2 "high".
    low = data.task.classes.index("low")
    is_low = data.y[rows][:, low] == 1
    np.testing.assert_allclose(references["chance_P"], np.where(is_low, 4 / 6, 2 / 6))
    np.testing.assert_allclose(references["top1_hub"], np.full(12, 2 / 12))  # each text: 2
    np.testing.assert_array_equal(hits["i2t_P@1"], np.ones(12))
    # The second-nearest text (angle one step away) is of the same grade only for some.
    neighbour = [scores.gallery[j] for j in np.argsort(-scores.similarity, axis=1)[:, 1]]
    grade_of = {f"report {j}": ["low", "high", "low"][j % 3] for j in range(6)}
    same = [grade_of[t] == grade_of[own] for t, own in zip(neighbour, texts, strict=True)]
    np.testing.assert_allclose(hits["i2t_P@2"], (1 + np.array(same)) / 2)
    # One tower: every level is embedded by it.
    single = _TextTable(angle)
    score_retrieval(single, images, texts, data.y[rows], text_level=1)
    assert single.levels_asked == [0]


def test_image_blind_references_by_hand():
    from mgll.eval.retrieve import RetrievalScores

    # 10 images: text A carried by 5 (class x), B by 3 (y), C by 1 (x), D by 1 (y).
    own = np.array([0, 0, 0, 0, 0, 1, 1, 1, 2, 3])
    x, y = [1, 0], [0, 1]
    image_labels = np.array([x] * 5 + [y] * 3 + [x, y])
    text_labels = np.array([x, y, x, y])
    # An encoder that ignores the image: the same similarities for every image, A first.
    similarity = np.tile([0.9, 0.5, 0.2, 0.1], (10, 1))
    scores = RetrievalScores(similarity, ["A", "B", "C", "D"], own, image_labels, text_labels)
    ref = scores.references(ks=(1, 2))
    # Best constant ranking for R@K: A, B, C, D (by how many images carry each).
    np.testing.assert_array_equal(ref["blind_R@1"], (own == 0).astype(float))
    np.testing.assert_array_equal(ref["blind_R@2"], (own <= 1).astype(float))
    # For P@K: A and C (6 class-x images overlap each) before B and D (4).
    is_x = image_labels[:, 0] == 1
    np.testing.assert_array_equal(ref["blind_P@1"], is_x.astype(float))
    np.testing.assert_array_equal(ref["blind_P@2"], is_x.astype(float))
    np.testing.assert_allclose(ref["chance_P"], np.full(10, 0.5))
    np.testing.assert_array_equal(ref["top1_hub"], np.ones(10))  # A is first for everyone
    # Such an encoder matches the image-blind R@1 exactly, and beats "chance" (1/4) by far.
    hits = scores.hits(ks=(1,))
    assert hits["i2t_R@1"].mean() == ref["blind_R@1"].mean() == 0.5
    # An image without a label (all its findings left out of the task): its P@K, chance and
    # image-blind P@K are not applicable (NaN), its R@K still counts.
    unlabelled = image_labels.copy()
    unlabelled[9] = 0
    partial = RetrievalScores(similarity, ["A", "B", "C", "D"], own, unlabelled, text_labels)
    hits, ref = partial.hits(ks=(1,)), partial.references(ks=(1,))
    assert np.isnan(hits["i2t_P@1"][9]) and not np.isnan(hits["i2t_P@1"][:9]).any()
    assert np.isnan(ref["chance_P"][9]) and np.isnan(ref["blind_P@1"][9])
    assert hits["i2t_R@1"][9] == 0.0


def test_retrieval_outputs_are_compared_by_image(tmp_path, capsys):
    from mgll.eval.retrieve import (
        read_retrieval_hits,
        retrieval_texts,
        score_retrieval,
        write_retrieval_outputs,
    )

    data = _grade_data(40)
    rows, texts = retrieval_texts(data, data.rows["test"], "report")
    rng = np.random.default_rng(0)
    vectors = {t: list(rng.normal(size=8)) for t in dict.fromkeys(texts)}
    model = _TextTable(vectors)
    own = np.array([vectors[t] for t in texts])
    folders = []
    for name, noise in (("sharp", 0.3), ("blurred", 3.0)):
        images = own + noise * np.random.default_rng(1).normal(size=own.shape)
        scores = score_retrieval(model, images, texts, data.y[rows], text_level=1)
        out = tmp_path / name
        results = write_retrieval_outputs(
            out,
            data,
            rows,
            texts,
            scores.hits(),
            scores.references(),
            text_level="report",
            encoder={"spec": name},
            n_texts=len(scores.gallery),
            n_resamples=200,
        )
        folders.append(out)
        assert results["task"] == {
            "data": "synthetic",
            "level": "report",
            "label_level": "grade",
            "classes": data.task.classes,
        }
        assert results["chance"]["i2t_R@5"] == pytest.approx(5 / 20)
        # Every text is carried by 2 images: the best constant ranking gets 2 x 5 of 40 in.
        assert results["image_blind"]["i2t_R@5"] == pytest.approx(10 / 40)
        read = read_retrieval_hits(out)
        assert read["texts"] == texts
        assert results["metrics"]["i2t_R@1"] == pytest.approx(read["hits"]["i2t_R@1"].mean())
        lo, hi = results["metrics"]["i2t_R@1_ci95"]
        assert lo <= results["metrics"]["i2t_R@1"] <= hi
    sharp = read_results(folders[0])["metrics"]
    assert sharp["i2t_R@1"] > 0.9
    argv = ["compare", *map(str, folders), "--bootstrap", "200", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if line.startswith("| i2t_R@1 |"))
    diff = float(row.split("|")[4])
    blurred = read_results(folders[1])["metrics"]["i2t_R@1"]
    assert diff == pytest.approx(sharp["i2t_R@1"] - blurred, abs=1e-4) and diff > 0.3
    # A retrieval output is not compared with a classification output.
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "results.json").write_text('{"protocol": "linear_probe", "task": {}}')
    (probe / "predictions.csv").write_text("image,patient,label:low,score:low\n")
    assert main(["compare", str(folders[0]), str(probe), "--no-progress"]) == 1
    assert "retrieval output and the other a classification" in capsys.readouterr().err


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
    from mgll.eval.encoders import encoder_from_model
    from mgll.eval.options import EvalOptions
    from mgll.eval.probe import linear_probe
    from mgll.eval.retrieve import retrieval
    from mgll.eval.task import load_eval_data
    from mgll.eval.zeroshot import zero_shot
    from mgll.training.checkpoint import load_model

    model, config = load_model(pretrained_run)
    quick = EvalOptions(n_resamples=20, cache_dir=tmp_path / "f", quiet=True)
    category = load_eval_data("covid-cxr", "category", data_root=data_root, encoder_config=config)
    details = zero_shot(
        model,
        category,
        tmp_path / "zs-ml",
        quick,
        name="run",
        templates=["a chest X-ray showing {}"],
    )["details"]
    assert details["negative_prompts"]["ARDS"] == ["a chest X-ray showing no ARDS"]
    assert details["prompts"]["ARDS"] == ["a chest X-ray showing ARDS"]
    probe = tmp_path / "probe"
    data = load_eval_data("covid-cxr", "type", data_root=data_root, encoder_config=config)
    linear_probe(
        encoder_from_model(model, "run", config),
        data,
        probe,
        replace(quick, n_resamples=50),
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
        replace(quick, n_resamples=50),
        name=str(pretrained_run),
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
    # The notes as the gallery, label-aware P@K judged by the organism.
    by_organism = tmp_path / "rt-organism"
    argv = ["retrieve", "--model", str(pretrained_run), "--level", "organism"]
    argv += ["--text-level", "notes", "--output-dir", str(by_organism), *common]
    assert main(argv) == 0
    organism = read_results(by_organism)
    assert organism["task"]["level"] == "notes" and organism["task"]["label_level"] == "organism"
    with (by_organism / "retrieval.csv").open() as handle:
        texts = [r["text"] for r in csv.DictReader(handle)]
    assert len(texts) == organism["n_test"] and len(set(texts)) == organism["n_texts"]
    assert 0 < organism["chance"]["i2t_P@1"] < 1
    assert "| i2t_P@5 |" in capsys.readouterr().out
