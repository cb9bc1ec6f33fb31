"""mgll.metrics against scikit-learn, the patient bootstrap and the paired comparison."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    cohen_kappa_score,
    f1_score,
    roc_auc_score,
)

from mgll.metrics import (
    bootstrap_metrics,
    classification_metrics,
    paired_bootstrap,
    summarize,
    youden_thresholds,
)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _multiclass(rng, n=120, c=4):
    truth = rng.integers(0, c, n)
    scores = _softmax(rng.normal(size=(n, c)) + 1.5 * np.eye(c)[truth])
    return np.eye(c, dtype=int)[truth], scores, truth


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multiclass_metrics_equal_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    y, scores, truth = _multiclass(rng)
    classes = ["a", "b", "c", "d"]
    m = classification_metrics(y, scores, "multiclass", classes=classes, ordinal=True)
    assert m["auc_macro"] == pytest.approx(roc_auc_score(truth, scores, multi_class="ovr"))
    for c, name in enumerate(classes):
        assert m[f"auc:{name}"] == pytest.approx(roc_auc_score(y[:, c], scores[:, c]))
    assert m["map"] == pytest.approx(average_precision_score(y, scores, average="macro"))
    predicted = scores.argmax(1)
    assert m["accuracy"] == pytest.approx(accuracy_score(truth, predicted))
    assert m["f1_macro"] == pytest.approx(f1_score(truth, predicted, average="macro"))
    assert m["kappa_quadratic"] == pytest.approx(
        cohen_kappa_score(truth, predicted, weights="quadratic")
    )
    # Sensitivity/specificity at the default 0.5 cut, one-vs-rest, by hand.
    decided = scores >= 0.5
    sens = [decided[y[:, c] == 1, c].mean() for c in range(4)]
    spec = [(~decided[y[:, c] == 0, c]).mean() for c in range(4)]
    assert m["sensitivity"] == pytest.approx(np.mean(sens))
    assert m["specificity"] == pytest.approx(np.mean(spec))


def test_binary_auc_is_the_positive_class_score_and_thresholds_come_from_validation():
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 2, 200)
    p = 1 / (1 + np.exp(-(2 * truth - 1 + rng.normal(size=200))))
    scores = np.stack([1 - p, p], axis=1)
    y = np.eye(2, dtype=int)[truth]
    thresholds = youden_thresholds(y, scores)
    m = classification_metrics(y, scores, "binary", classes=["neg", "pos"], thresholds=thresholds)
    assert m["auc_macro"] == pytest.approx(roc_auc_score(truth, p))
    t = thresholds[1]
    assert m["sensitivity"] == pytest.approx(np.mean(p[truth == 1] >= t))
    assert m["specificity"] == pytest.approx(np.mean(p[truth == 0] < t))
    # Youden's threshold maximises sensitivity + specificity over every cut of the data.
    best = max(np.mean(p[truth == 1] >= c) + np.mean(p[truth == 0] < c) for c in p)
    assert m["sensitivity"] + m["specificity"] == pytest.approx(best)
    assert m["f1_macro"] == pytest.approx(f1_score(truth, scores.argmax(1), average="macro"))


def test_multilabel_metrics_equal_scikit_learn():
    rng = np.random.default_rng(4)
    y = (rng.random((150, 5)) < 0.3).astype(int)
    scores = 1 / (1 + np.exp(-(2 * y - 1 + rng.normal(size=y.shape))))
    m = classification_metrics(y, scores, "multilabel", classes=list("vwxyz"))
    assert m["auc_macro"] == pytest.approx(roc_auc_score(y, scores, average="macro"))
    assert m["map"] == pytest.approx(average_precision_score(y, scores, average="macro"))
    decided = (scores >= 0.5).astype(int)
    assert m["f1_macro"] == pytest.approx(f1_score(y, decided, average="macro"))
    assert m["accuracy"] == pytest.approx(np.mean(decided == y))


def test_a_class_absent_from_the_test_set_is_reported_not_averaged():
    rng = np.random.default_rng(5)
    y, scores, truth = _multiclass(rng, n=60, c=3)
    keep = truth != 2  # class "c" never occurs
    y, scores = y[keep], scores[keep]
    stats = bootstrap_metrics(
        y, scores, list(range(len(y))), "multiclass", classes=["a", "b", "c"], n_resamples=50
    )
    metrics, per_class, notes = summarize(stats, ["a", "b", "c"], "multiclass")
    assert per_class["c"]["auc"] is None
    assert any(n.startswith("auc:c: undefined") for n in notes)
    expected = np.mean([roc_auc_score(y[:, k], scores[:, k]) for k in (0, 1)])
    assert metrics["auc_macro"] == pytest.approx(expected)
    # The interval: scikit-learn's macro AUC over the two present classes on the same draws.
    from mgll.metrics import bootstrap_indices, patient_groups

    draws = [
        np.mean([roc_auc_score(y[rows, k], scores[rows, k]) for k in (0, 1)])
        for rows in bootstrap_indices(patient_groups(list(range(len(y)))), 50, 0)
    ]
    assert metrics["auc_macro_ci95"] == pytest.approx(list(np.percentile(draws, [2.5, 97.5])))


def test_patient_bootstrap_ci_matches_the_binomial_and_ignores_duplicated_images():
    n, p = 200, 0.75
    correct = np.zeros(n, dtype=bool)
    correct[: int(n * p)] = True
    truth = np.arange(n) % 2
    predicted = np.where(correct, truth, 1 - truth)
    y = np.eye(2, dtype=int)[truth]
    scores = np.eye(2)[predicted] * 0.8 + 0.1
    patients = np.arange(n)
    kw = dict(classes=["0", "1"], n_resamples=1000, seed=7)
    ci = bootstrap_metrics(y, scores, patients, "binary", **kw)["accuracy"]["ci95"]
    half = 1.96 * np.sqrt(p * (1 - p) / n)  # the normal approximation of the binomial
    assert ci[0] == pytest.approx(p - half, abs=0.012) and ci[1] == pytest.approx(
        p + half, abs=0.012
    )

    # Three images per patient, same predictions: the patients, not the images, set the width.
    rep = np.repeat(np.arange(n), 3)
    ci_dup = bootstrap_metrics(y[rep], scores[rep], patients[rep], "binary", **kw)
    assert ci_dup["accuracy"]["ci95"] == pytest.approx(ci)
    # Counting each image as its own patient would (wrongly) narrow it by about sqrt(3).
    ci_naive = bootstrap_metrics(y[rep], scores[rep], np.arange(3 * n), "binary", **kw)
    width = ci[1] - ci[0]
    naive = ci_naive["accuracy"]["ci95"][1] - ci_naive["accuracy"]["ci95"][0]
    assert naive == pytest.approx(width / np.sqrt(3), rel=0.15)


def test_resamples_without_both_classes_are_counted():
    truth = np.array([1] + [0] * 9)  # one positive patient
    y = np.eye(2, dtype=int)[truth]
    scores = np.stack([1 - truth * 0.9, truth * 0.9], axis=1)
    stats = bootstrap_metrics(
        y, scores, np.arange(10), "binary", classes=["0", "1"], n_resamples=200
    )
    # P(the positive patient is never drawn) = 0.9 ** 10 ~ 0.35
    assert 40 < stats["auc_macro"]["n_undefined"] < 100
    assert stats["auc_macro"]["value"] == 1.0


def test_paired_comparison_detects_added_noise_and_not_a_copy():
    rng = np.random.default_rng(8)
    n = 300
    truth = rng.integers(0, 2, n)
    logit = 2.0 * (2 * truth - 1) + rng.normal(size=n)
    noisy = logit + 3.0 * rng.normal(size=n)
    a = np.stack([1 - 1 / (1 + np.exp(-logit)), 1 / (1 + np.exp(-logit))], 1)
    b = np.stack([1 - 1 / (1 + np.exp(-noisy)), 1 / (1 + np.exp(-noisy))], 1)
    y = np.eye(2, dtype=int)[truth]
    patients = np.arange(n) // 2  # two images per patient
    kw = dict(classes=["0", "1"], n_resamples=300, seed=0)
    result = paired_bootstrap(y, a, b, patients, "binary", **kw)["auc_macro"]
    assert result["diff"] == pytest.approx(
        roc_auc_score(truth, a[:, 1]) - roc_auc_score(truth, b[:, 1])
    )
    assert result["diff"] > 0.05 and result["ci95"][0] > 0 and result["p_value"] < 0.01
    same = paired_bootstrap(y, a, a, patients, "binary", **kw)["auc_macro"]
    assert same["diff"] == 0.0 and same["ci95"] == [0.0, 0.0] and same["p_value"] == 1.0


def _two_sided_p(draws: np.ndarray) -> float:
    """The bootstrap p of "no difference", computed here from the resampled differences: twice
    the smaller +1-corrected share on either side of 0, capped at 1."""
    n = draws.size
    below = (1 + np.count_nonzero(draws <= 0)) / (n + 1)
    above = (1 + np.count_nonzero(draws >= 0)) / (n + 1)
    return min(1.0, 2 * min(below, above))


@pytest.mark.parametrize("sign", [1, -1])
def test_paired_p_value_is_two_sided_against_scikit_learn_resamples(sign):
    """A modest difference in either direction: the p-value equals the two-sided p of the
    AUC differences recomputed with scikit-learn on the same patient resamples."""
    from mgll.metrics import bootstrap_indices, patient_groups

    rng = np.random.default_rng(3)
    n = 80
    truth = rng.integers(0, 2, n)
    logit = 1.0 * (2 * truth - 1) + rng.normal(size=n)
    other = logit + 0.4 * rng.normal(size=n)
    good, bad = np.stack([-logit, logit], 1), np.stack([-other, other], 1)
    a, b = (good, bad) if sign > 0 else (bad, good)
    y = np.eye(2, dtype=int)[truth]
    patients = np.arange(n) // 2
    got = paired_bootstrap(y, a, b, patients, "binary", classes=["0", "1"], n_resamples=200)
    draws = np.array(
        [
            roc_auc_score(truth[rows], a[rows, 1]) - roc_auc_score(truth[rows], b[rows, 1])
            for rows in bootstrap_indices(patient_groups(list(patients)), 200, 0)
        ]
    )
    expected = _two_sided_p(draws)
    assert 0.01 < expected < 0.5  # one- and two-sided p differ here
    assert got["auc_macro"]["p_value"] == pytest.approx(expected)
    assert np.sign(got["auc_macro"]["diff"]) == sign


def test_kernels_handle_ties_like_scikit_learn():
    from mgll.metrics import average_precision, quadratic_kappa, roc_auc

    rng = np.random.default_rng(9)
    for _ in range(20):
        column = rng.integers(0, 2, 40)
        if column.min() == column.max():
            continue
        score = rng.integers(0, 4, 40) / 4.0  # many ties
        assert roc_auc(column, score) == pytest.approx(roc_auc_score(column, score))
        assert average_precision(column, score) == pytest.approx(
            average_precision_score(column, score)
        )
        truth, predicted = rng.integers(0, 5, 40), rng.integers(0, 5, 40)
        assert quadratic_kappa(truth, predicted, 5) == pytest.approx(
            cohen_kappa_score(truth, predicted, weights="quadratic")
        )
    assert np.isnan(roc_auc(np.zeros(5, int), np.arange(5.0)))


def test_mean_with_ci_resamples_patients_not_images():
    from mgll.metrics import mean_with_ci

    values = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    value, ci = mean_with_ci(values, ["a", "a", "b", "c", "d", "e"], n_resamples=400, seed=0)
    assert value == pytest.approx(0.5)
    # Independent: draw the five patients with numpy and average their images' values.
    rng = np.random.default_rng(0)
    per_patient = [[1.0, 0.0], [1.0], [1.0], [0.0], [0.0]]
    draws = []
    for _ in range(400):
        drawn = [v for g in rng.integers(0, 5, size=5) for v in per_patient[g]]
        draws.append(np.mean(drawn))
    assert ci == pytest.approx(list(np.percentile(draws, [2.5, 97.5])))
    # One patient's images repeated ten times: the interval keeps its width (patients drawn).
    many = np.repeat(values, 10)
    patients = np.repeat(["a", "a", "b", "c", "d", "e"], 10)
    _, repeated = mean_with_ci(many, patients, n_resamples=400, seed=0)
    assert repeated == pytest.approx(ci)


def test_paired_mean_bootstrap_by_hand():
    from mgll.metrics import paired_mean_bootstrap

    rng = np.random.default_rng(4)
    n = 200
    a = (rng.random(n) < 0.7).astype(float)
    b = np.where(rng.random(n) < 0.5, a, 0.0)  # b loses some of a's hits, never gains
    patients = np.arange(n) // 2
    got = paired_mean_bootstrap(a, b, patients, n_resamples=500, seed=0)
    assert got["a"] == pytest.approx(a.mean()) and got["b"] == pytest.approx(b.mean())
    assert got["diff"] == pytest.approx(a.mean() - b.mean())
    assert got["ci95"][0] > 0 and got["p_value"] < 0.01
    # The resamples draw patients: the first draw of rows reproduces the same numbers.
    from mgll.metrics import bootstrap_indices, patient_groups

    draws = [
        (a - b)[rows].mean() for rows in bootstrap_indices(patient_groups(list(patients)), 500, 0)
    ]
    assert got["ci95"] == pytest.approx(list(np.percentile(draws, [2.5, 97.5])))
    same = paired_mean_bootstrap(a, a, patients, n_resamples=100, seed=0)
    assert same["diff"] == 0.0 and same["p_value"] == 1.0
    with pytest.raises(ValueError, match="one per query"):
        paired_mean_bootstrap(a, b[:-1], patients)


def _stable_sort_reference(similarity, own_text, image_labels, text_labels, ks):
    """Retrieval hits from fully sorted rows (stable: ties in gallery order), for comparison."""
    n_images, n_texts = similarity.shape
    i2t = np.argsort(-similarity, axis=1, kind="stable")
    rank = np.argmax(i2t == own_text[:, None], axis=1)
    t2i = np.argsort(-similarity.T, axis=1, kind="stable")
    owner = np.zeros((n_texts, n_images), dtype=bool)
    owner[own_text, np.arange(n_images)] = True
    first = np.array([np.argmax(owner[t, t2i[t]]) for t in range(n_texts)])
    overlap = (image_labels @ text_labels.T) > 0
    out = {"i2t_rank": rank + 1.0}
    for k in ks:
        out[f"i2t_R@{k}"] = (rank < k).astype(float)
        out[f"t2i_R@{k}"] = (first < k).astype(float)
        out[f"i2t_P@{k}"] = np.take_along_axis(overlap, i2t[:, :k], axis=1).mean(1)
        out[f"t2i_P@{k}"] = np.take_along_axis(overlap.T, t2i[:, :k], axis=1).mean(1)
    return out


@pytest.mark.parametrize("ties", [False, True])
def test_retrieval_hits_equal_fully_sorted_rankings(ties):
    from mgll.metrics import retrieval_hits

    rng = np.random.default_rng(5)
    for _ in range(60):
        n_texts = int(rng.integers(1, 12))
        n_images = n_texts + int(rng.integers(0, 14))
        # every gallery text is some image's own text, as galleries are built
        own = rng.permutation(np.arange(n_images) % n_texts)
        shape = (n_images, n_texts)
        similarity = rng.integers(0, 3, shape) / 2.0 if ties else rng.normal(size=shape)
        image_labels = (rng.random((n_images, 3)) < 0.4).astype(int)
        text_labels = np.zeros((n_texts, 3), dtype=int)
        for i, t in enumerate(own):
            text_labels[t] |= image_labels[i]
        ks = (1, 3, 30)  # 30: beyond every gallery, the whole gallery counts
        got = retrieval_hits(similarity, own, image_labels, text_labels, ks)
        expected = _stable_sort_reference(similarity, own, image_labels, text_labels, ks)
        assert set(got) == set(expected)
        for key, values in expected.items():
            np.testing.assert_allclose(got[key], values, err_msg=key)
        one_way = retrieval_hits(
            similarity, own, image_labels, text_labels, ks, text_to_image=False
        )
        assert not any(key.startswith("t2i") for key in one_way)
        np.testing.assert_array_equal(one_way["i2t_P@3"], got["i2t_P@3"])


def test_means_leave_out_queries_where_a_value_is_not_applicable():
    from mgll.metrics import mean_with_ci, paired_mean_bootstrap

    values = np.array([1.0, np.nan, 0.0, 1.0])
    value, ci = mean_with_ci(values, ["a", "b", "c", "d"], n_resamples=50)
    assert value == pytest.approx(2 / 3) and 0 <= ci[0] <= ci[1] <= 1
    assert mean_with_ci(np.array([np.nan]), ["a"]) == (None, None)
    paired = paired_mean_bootstrap(values, np.array([0.0, 1.0, np.nan, 0.0]), list("abcd"))
    assert paired["a"] == 1.0 and paired["b"] == 0.0  # only queries a and d count


def test_comparison_verdict_reads_the_interval_against_zero():
    from mgll.metrics import comparison_verdict

    assert comparison_verdict("mgll", "clip", [0.01, 0.2]) == "mgll better"
    assert comparison_verdict("mgll", "clip", [-0.2, -0.01]) == "clip better"
    assert comparison_verdict("mgll", "clip", [-0.01, 0.2]) == "no clear difference"
    assert comparison_verdict("mgll", "clip", [0.0, 0.2]) == "no clear difference"  # touches 0
    assert comparison_verdict("mgll", "clip", None) is None
