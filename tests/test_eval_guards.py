"""Guards on what decides whether an evaluation number can be trusted, each checked against an
independent computation (scikit-learn on hand-made features, a stub text tower whose right
answer is known, a spy on what the probe fitted on): the probe's standardisation and C come
from training and validation rows, never test ones; decision thresholds from validation;
zero-shot prompts in class order; a macro average never silently partial; the image-blind
retrieval reference blind to the image; the feature cache keyed by which features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score, roc_curve

from eval_fixtures import make_downstream
from mgll.data.records import Record, RecordSet, build_levels
from mgll.eval.features import FeatureSet
from mgll.eval.options import EvalOptions
from mgll.eval.task import EvalData, build_task

C_GRID = [float(c) for c in np.logspace(-4, 2, 7)]


def _records(labels: list[str], patients: list[str] | None = None) -> RecordSet:
    records = [
        Record(
            image=Path(f"/nowhere/{i}.png"),
            texts=[[f"a photo of {name}"]],
            labels=[[name]],
            patient_id=patients[i] if patients else f"p{i}",
        )
        for i, name in enumerate(labels)
    ]
    levels = build_levels(["grade"], records, multi_label=[False])
    return RecordSet(levels=levels, records=records, source="hand-made")


def _hand_made_probe_data(seed: int = 7) -> tuple[np.ndarray, EvalData, dict[str, np.ndarray]]:
    """30 training, 40 validation and 40 test vectors of a binary task; the test vectors are
    scaled and shifted (so statistics fitted on them change every score) and, for this seed,
    validation and test prefer different C (checked by the test)."""
    rng = np.random.default_rng(seed)
    w = np.array([1.0, 0.6, 0.3, 0.0, 0.0])
    blocks, labels, rows, start = [], [], {}, 0
    for split, n in (("train", 30), ("val", 40), ("test", 40)):
        y = np.arange(n) % 2
        x = rng.normal(size=(n, 5)) + np.outer(2 * y - 1, w) * 0.8
        if split == "test":
            x = x * 2.0 + 1.5
        blocks.append(x)
        labels += ["neg" if v == 0 else "pos" for v in y]
        rows[split] = np.arange(start, start + n)
        start += n
    records = _records(labels)
    task, y, _ = build_task(records, "grade")
    data = EvalData.from_rows(records, Path("/nowhere"), task, y, rows, source="hand-made")
    return np.concatenate(blocks), data, rows


class _StubEncoder:
    def describe(self) -> dict[str, str]:
        return {"spec": "stub", "kind": "stub"}


def _stub_features(monkeypatch, features: np.ndarray) -> None:
    """``extract_features`` hands back ``features`` (what a real tower would have produced)."""
    import mgll.eval.features

    def fake(encoder, records, folder, options=None, **kwargs):
        assert len(records.records) == len(features)
        return FeatureSet(features, np.zeros(len(features), dtype=bool), False, None)

    monkeypatch.setattr(mgll.eval.features, "extract_features", fake)


def _sklearn_probe(x: np.ndarray, y: np.ndarray, rows: dict[str, np.ndarray]):
    """The probe done by hand: train statistics, C by validation AUC (then accuracy, the
    smallest C on ties), one fit."""
    mean, std = x[rows["train"]].mean(0), x[rows["train"]].std(0) + 1e-6
    z = (x - mean) / std
    y_int = y.argmax(1)
    best = None
    for c in C_GRID:
        model = LogisticRegression(C=c, max_iter=1000, random_state=0)
        model.fit(z[rows["train"]], y_int[rows["train"]])
        p = model.predict_proba(z[rows["val"]])[:, 1]
        key = (roc_auc_score(y_int[rows["val"]], p), np.mean((p >= 0.5) == y_int[rows["val"]]))
        if best is None or key > best[0]:
            best = (key, c, model)
    _, c, model = best
    return c, model.predict_proba(z[rows["val"]]), model.predict_proba(z[rows["test"]])


def _best_c_on(split: str, x: np.ndarray, y: np.ndarray, rows: dict[str, np.ndarray]) -> float:
    mean, std = x[rows["train"]].mean(0), x[rows["train"]].std(0) + 1e-6
    z, y_int = (x - mean) / std, y.argmax(1)
    aucs = []
    for c in C_GRID:
        model = LogisticRegression(C=c, max_iter=1000).fit(z[rows["train"]], y_int[rows["train"]])
        aucs.append(roc_auc_score(y_int[rows[split]], model.predict_proba(z[rows[split]])[:, 1]))
    return C_GRID[int(np.argmax(aucs))]


def test_probe_standardises_on_training_rows_chooses_c_and_thresholds_on_validation(
    tmp_path, monkeypatch
):
    from mgll.eval.probe import linear_probe

    x, data, rows = _hand_made_probe_data()
    _stub_features(monkeypatch, x)
    options = EvalOptions(n_resamples=20, quiet=True)
    results = linear_probe(_StubEncoder(), data, tmp_path / "probe", options)

    c, val_scores, test_scores = _sklearn_probe(x, data.y, rows)
    assert _best_c_on("val", x, data.y, rows) != _best_c_on("test", x, data.y, rows)
    assert results["details"]["C"] == c
    from mgll.eval.results import read_predictions

    written = read_predictions(tmp_path / "probe")["scores"]
    # (the probe refits warm over the grid, so its optimum differs from a cold fit by < 0.01)
    np.testing.assert_allclose(written, test_scores, atol=0.02)
    # Youden's threshold of the positive class, searched by hand over the validation scores.
    truth = data.y[rows["val"]].argmax(1)
    fpr, tpr, cuts = roc_curve(truth, val_scores[:, 1])
    expected = float(min(cuts[int(np.argmax(tpr - fpr))], 1.0))
    test_truth = data.y[rows["test"]].argmax(1)
    fpr_t, tpr_t, cuts_t = roc_curve(test_truth, test_scores[:, 1])
    assert abs(float(min(cuts_t[int(np.argmax(tpr_t - fpr_t))], 1.0)) - expected) > 1e-3
    assert results["thresholds"]["pos"] == pytest.approx(expected, abs=0.02)
    decided = written[:, 1] >= results["thresholds"]["pos"]
    assert results["metrics"]["sensitivity"] == pytest.approx(decided[test_truth == 1].mean())
    assert results["metrics"]["specificity"] == pytest.approx((~decided)[test_truth == 0].mean())


def test_probe_cross_validated_selection_keeps_patients_on_one_side(monkeypatch):
    """The demo's selection mode: C by a patient-grouped inner CV of the training rows. A spy
    on every fit recovers the rows it saw: no patient is on both sides of an inner split, and
    the final fit sees every training row standardised with their own statistics."""
    from mgll.eval import probe

    rng = np.random.default_rng(0)
    n_patients, per = 30, 3
    grades = ["low", "mid", "high"]
    labels = [grades[p % 3] for p in range(n_patients) for _ in range(per)]
    patients = [f"p{p}" for p in range(n_patients) for _ in range(per)]
    records = _records(labels, patients)
    task, y, _ = build_task(records, "grade")
    x = rng.normal(size=(len(labels), 6)) + 2.0 * y @ rng.normal(size=(3, 6))
    train = np.arange(0, 60)
    test = np.arange(60, 90)
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    z = (x[train] - mean) / std

    fits: list[np.ndarray] = []
    real_fit = probe.LinearClassifier.fit

    def spy(self, features, targets, c):
        distance = ((features[:, None, :] - z[None, :, :]) ** 2).sum(-1)
        fits.append(train[distance.argmin(1)])
        assert distance.min(1).max() < 1e-12  # every row is a standardised training row
        return real_fit(self, features, targets, c)

    monkeypatch.setattr(probe.LinearClassifier, "fit", spy)
    data = EvalData.from_rows(
        records, Path("/nowhere"), task, y, {"train": train, "test": test}, source="hand-made"
    )
    fitted = probe.fit_probe(x, data, train, selection="cv", c_grid=(0.01, 1.0), seed=0)
    assert fitted.scores(x[test]).shape == (30, 3)
    assert fitted.selection["C"] in (0.01, 1.0)
    owner = dict(zip(train, (patients[i] for i in train), strict=True))
    inner = [rows for rows in fits if len(rows) < len(train)]
    assert len(inner) == 2 * probe.INNER_FOLDS
    for rows in inner:
        held = set(train) - set(rows)
        assert held and {owner[i] for i in rows}.isdisjoint({owner[i] for i in held})
    assert sorted(fits[-1]) == list(train)


class _KeywordTextTower:
    """A stub model: a prompt's embedding is the one-hot of the class word it names, so class
    k's prompts and an image equal to class k's one-hot agree exactly."""

    logit_scale = torch.tensor(float(np.log(10.0)))
    text_per_level = False

    def __init__(self, words: list[str]) -> None:
        self.words = words

    def encode_text(self, texts: list[str], level: int = 0) -> torch.Tensor:
        rows = []
        for text in texts:
            hits = [w for w in self.words if w in text.split()]
            assert len(hits) == 1, text
            rows.append(torch.eye(len(self.words))[self.words.index(hits[0])])
        return torch.stack(rows)


def test_zero_shot_scores_each_class_with_its_own_prompts():
    from mgll.eval.zeroshot import build_zero_shot_classifier

    words = ["alpha", "mid", "zeta"]
    records = _records(["zeta", "alpha", "mid"] * 2)
    # not alphabetical: a loop over sorted names or the vocabulary would misplace them
    task, y, _ = build_task(records, "grade", classes="zeta,alpha,mid")
    data = EvalData.from_rows(records, Path("/nowhere"), task, y, {"train": range(6)}, source="h")
    model = _KeywordTextTower(words)
    expected = torch.tensor([[0.0, 10.0, 0.0], [0.0, 0.0, 10.0], [10.0, 0.0, 0.0]]).softmax(1)
    user = {"alpha": ["an alpha eye"], "mid": ["a mid eye", "mid ."], "zeta": ["zeta here"]}
    for prompts in (None, user):  # the dataset's own class texts, then the user's
        classifier = build_zero_shot_classifier(model, data, prompts=prompts)
        assert list(classifier.prompts) == task.classes
        # image i is the one-hot of word i: "alpha", "mid", "zeta" in the stub's order
        scores = classifier.scores(np.eye(3))
        assert [task.classes[k] for k in scores.argmax(1)] == words
        np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-6)


def test_a_macro_average_is_undefined_in_a_resample_that_lacks_a_class(tmp_path):
    """A class present in the test split but held by one patient vanishes from some bootstrap
    resamples: there the macro average is undefined (counted), never the mean of the rest."""
    from mgll.eval.results import write_classification_outputs
    from mgll.metrics import bootstrap_indices, patient_groups

    labels = ["a"] * 6 + ["b"] * 6 + ["c"] * 2
    patients = [f"p{i}" for i in range(12)] + ["rare", "rare"]
    records = _records(labels, patients)
    task, y, _ = build_task(records, "grade")
    rng = np.random.default_rng(1)
    scores = np.clip(y + rng.normal(0, 0.4, y.shape), 0.01, None)
    scores /= scores.sum(1, keepdims=True)
    rows = np.arange(len(labels))
    data = EvalData.from_rows(records, Path("/nowhere"), task, y, {"test": rows}, source="h")
    results = write_classification_outputs(
        tmp_path, data, rows, scores, val_rows=None, val_scores=None, protocol="t",
        encoder={}, details={}, seed=3, n_resamples=200, progress=False,
    )  # fmt: skip
    expected = np.mean([roc_auc_score(y[:, k], scores[:, k]) for k in range(3)])
    assert results["metrics"]["auc_macro"] == pytest.approx(expected)
    lacking = sum(  # resamples where some class has no positive (or no negative) image
        not all(0 < y[drawn, k].sum() < len(drawn) for k in range(3))
        for drawn in bootstrap_indices(patient_groups(data.patients(rows)), 200, 3)
    )
    assert lacking > 20  # P(the rare patient is never drawn) = (13/14) ** 13 ~ 0.38
    assert results["metrics"]["auc_macro_undefined_resamples"] == lacking


def test_the_image_blind_reference_ignores_the_similarities():
    from mgll.eval.retrieve import RetrievalScores

    own = np.array([0, 0, 0, 0, 1, 1, 2])  # text 0 carried by 4 images, 1 by 2, 2 by 1
    labels = np.eye(2, dtype=int)[[0, 0, 0, 0, 1, 1, 0]]
    text_labels = np.eye(2, dtype=int)[[0, 1, 0]]
    rng = np.random.default_rng(0)
    references = []
    # each image ranks the texts its own (random) way; then every image ranks B, then C, first
    similarities = [rng.normal(size=(7, 3)) for _ in range(3)]
    similarities += [np.tile([0.0, 10.0, 5.0], (7, 1)), np.tile([0.0, 10.0, 0.0], (7, 1))]
    for similarity in similarities:
        scores = RetrievalScores(similarity, ["A", "B", "C"], own, labels, text_labels)
        references.append(scores.references(ks=(1, 2)))
    for ref in references:
        # by hand: the ranking A, B, C (carriers 4, 2, 1) for R@K
        np.testing.assert_array_equal(ref["blind_R@1"], (own == 0).astype(float))
        np.testing.assert_array_equal(ref["blind_R@2"], (own <= 1).astype(float))
        # P@K: A and C share class 0 with 5 images, B class 1 with 2: A, C first
        np.testing.assert_array_equal(ref["blind_P@1"], labels[:, 0].astype(float))
        np.testing.assert_array_equal(ref["blind_P@2"], labels[:, 0].astype(float))


def test_the_feature_cache_keeps_projected_and_pre_projection_features_apart(tmp_path):
    from mgll.data.build import load_records
    from mgll.eval.encoders import load_encoder
    from mgll.eval.features import extract_features

    folder = make_downstream(tmp_path / "grades", per_split={"Train": 4, "Val": 2, "Test": 2})
    records, folder = load_records(None, folder)
    encoder = load_encoder("random:mgll-vit-test-32:0")
    options = EvalOptions(cache_dir=tmp_path / "features", quiet=True)
    projected = extract_features(encoder, records, folder, options, projected=True)
    plain = extract_features(encoder, records, folder, options)
    assert not plain.from_cache
    again = extract_features(encoder, records, folder, options)
    assert again.from_cache and np.array_equal(again.features, plain.features)
    # by hand: the tower with and without its projection on the same batch
    from mgll.eval.features import image_dataset

    images = torch.stack([image_dataset(encoder, records, folder)[i]["image"] for i in range(8)])
    with torch.no_grad():
        np.testing.assert_allclose(plain.features, encoder.encode(images), atol=1e-5)
        np.testing.assert_allclose(
            projected.features, encoder.encode(images, projected=True), atol=1e-5
        )
    assert not np.allclose(plain.features, projected.features)
