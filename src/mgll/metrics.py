"""Clinical classification metrics with patient-level bootstrap confidence intervals.

Everything works on one representation, whatever the task: ``y`` an ``(N, C)`` 0/1 indicator
matrix (one-hot for binary and multi-class tasks, multi-hot for multi-label ones) and
``scores`` an ``(N, C)`` float matrix (class probabilities for binary/multi-class, per-label
probabilities for multi-label). The metrics follow scikit-learn's definitions (tested equal):

- ``auc_macro``: binary: the AUC of the positive class's score (class 1); multi-class: mean of
  the one-vs-rest AUCs; multi-label: mean of the per-label AUCs; ``auc:<class>`` per class;
- ``map``: mean over classes of the average precision (per class ``ap:<class>``);
- ``accuracy`` and ``f1_macro``: binary/multi-class on the arg-max class; multi-label on the
  per-label decisions ``score >= threshold`` (accuracy = mean per-label accuracy);
- ``sensitivity`` / ``specificity``: per class, one-vs-rest, at the class's threshold (chosen
  on validation by Youden's J, see :func:`youden_thresholds`), macro-averaged; for a binary
  task those of the positive class;
- ``kappa_quadratic``: quadratic-weighted Cohen's kappa of the arg-max class, for ordinal
  levels (classes in grade order, e.g. DR 0-4).

A metric that is undefined on a set (a class without positives or without negatives, a kappa
of one class) is ``NaN`` inside these functions and is never averaged in silently:
:func:`summarize` reports it as ``None`` with the reason, and the bootstrap counts the resamples
where it was undefined. Confidence intervals come from resampling *patients* with replacement
(all images of a drawn patient come along), so correlated images of one patient never narrow
an interval; paired comparisons resample the same patients for both prediction sets.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import roc_curve

TASK_TYPES = ("binary", "multiclass", "multilabel")
DEFAULT_RESAMPLES = 1000


def check_task(y: np.ndarray, scores: np.ndarray, task_type: str) -> None:
    """ValueError unless ``y``/``scores`` are matching (N, C) arrays of a known task type."""
    if task_type not in TASK_TYPES:
        raise ValueError(f"task type {task_type!r} is not one of {TASK_TYPES}")
    if y.ndim != 2 or y.shape != scores.shape:
        raise ValueError(f"labels {y.shape} and scores {scores.shape} must both be (N, C)")
    if task_type == "binary" and y.shape[1] != 2:
        raise ValueError(f"a binary task has 2 classes, got {y.shape[1]}")
    if task_type != "multilabel" and not np.all(y.sum(axis=1) == 1):
        raise ValueError(f"a {task_type} task needs exactly one class per sample")


def _both_present(column: np.ndarray) -> bool:
    return 0 < int(column.sum()) < len(column)


# The bootstrap evaluates every metric thousands of times, so the per-class kernels below are
# plain numpy (scikit-learn's input checks cost ~100x the arithmetic); the tests hold them equal
# to scikit-learn's roc_auc_score, average_precision_score, f1_score and cohen_kappa_score.


def roc_auc(column: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney U with mid-ranks for ties); NaN without both classes."""
    n_pos = int(column.sum())
    n_neg = len(column) - n_pos
    if n_pos == 0 or n_neg == 0:
        return np.nan
    ranks = rankdata(score)
    return float((ranks[column == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(column: np.ndarray, score: np.ndarray) -> float:
    """Average precision (scikit-learn's step-wise definition, ties as one threshold)."""
    n_pos = int(column.sum())
    if n_pos == 0:
        return np.nan
    order = np.argsort(-score, kind="mergesort")
    sorted_score, sorted_true = score[order], column[order]
    # The last index of each run of equal scores is one threshold.
    last = np.r_[np.flatnonzero(np.diff(sorted_score)), len(score) - 1]
    tp = np.cumsum(sorted_true)[last]
    precision = tp / (last + 1)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _f1_macro(truth: np.ndarray, predicted: np.ndarray, labels: np.ndarray) -> float:
    """Macro F1 over ``labels`` from 0/1 truth and decision matrices (N, len(labels))."""
    tp = np.sum(truth & predicted, axis=0)
    denominator = np.sum(truth, axis=0) + np.sum(predicted, axis=0)
    f1 = np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)
    return float(np.mean(f1)) if len(labels) else np.nan


def quadratic_kappa(truth: np.ndarray, predicted: np.ndarray, n_classes: int) -> float:
    """Quadratic-weighted Cohen's kappa of two class-index vectors; NaN when undefined."""
    confusion = np.bincount(truth * n_classes + predicted, minlength=n_classes * n_classes).reshape(
        n_classes, n_classes
    )
    grades = np.arange(n_classes)
    weights = (grades[:, None] - grades[None, :]) ** 2
    expected = np.outer(confusion.sum(1), confusion.sum(0)) / max(confusion.sum(), 1)
    chance = float(np.sum(weights * expected))
    if chance == 0:
        return np.nan
    return float(1 - np.sum(weights * confusion) / chance)


def youden_thresholds(y: np.ndarray, scores: np.ndarray) -> list[float | None]:
    """Per class, the score threshold maximising sensitivity + specificity - 1 on (y, scores).

    None for a class without both positives and negatives in ``y`` (the caller falls back to
    0.5 and reports it). Ties between thresholds go to the highest (fewest positives).
    """
    thresholds: list[float | None] = []
    for c in range(y.shape[1]):
        if not _both_present(y[:, c]):
            thresholds.append(None)
            continue
        fpr, tpr, cut = roc_curve(y[:, c], scores[:, c])
        best = int(np.argmax(tpr - fpr))
        thresholds.append(float(min(cut[best], 1.0)) if np.isfinite(cut[best]) else 1.0)
    return thresholds


def _threshold_array(thresholds: Sequence[float | None] | None, n_classes: int) -> np.ndarray:
    if thresholds is None:
        return np.full(n_classes, 0.5)
    return np.array([0.5 if t is None else float(t) for t in thresholds])


def _mean_defined(values: np.ndarray) -> float:
    """Mean over all classes, NaN as soon as one is undefined (never a silent partial mean)."""
    return float(np.mean(values)) if values.size and np.all(np.isfinite(values)) else np.nan


def classification_metrics(
    y: np.ndarray,
    scores: np.ndarray,
    task_type: str,
    *,
    classes: Sequence[str],
    thresholds: Sequence[float | None] | None = None,
    ordinal: bool = False,
    macro_classes: Sequence[int] | None = None,
) -> dict[str, float]:
    """Every metric of the module docstring as a flat ``{name: value}`` dict (NaN = undefined).

    ``macro_classes`` restricts the macro averages to those class indices (the classes present
    in the full test set, so a bootstrap resample averages the same classes); default all.
    """
    y = np.asarray(y).astype(int)
    scores = np.asarray(scores, dtype=float)
    n_classes = y.shape[1]
    keep = np.arange(n_classes) if macro_classes is None else np.asarray(macro_classes, int)
    out: dict[str, float] = {}
    auc = np.full(n_classes, np.nan)
    ap = np.full(n_classes, np.nan)
    sens = np.full(n_classes, np.nan)
    spec = np.full(n_classes, np.nan)
    cut = _threshold_array(thresholds, n_classes)
    decided = scores >= cut[None, :]
    for c in range(n_classes):
        column = y[:, c]
        positives = column == 1
        auc[c] = roc_auc(column, scores[:, c])
        ap[c] = average_precision(column, scores[:, c])
        if np.isfinite(auc[c]):
            sens[c] = float(np.mean(decided[positives, c]))
            spec[c] = float(np.mean(~decided[~positives, c]))
        out[f"auc:{classes[c]}"] = float(auc[c])
        out[f"ap:{classes[c]}"] = float(ap[c])
    if task_type == "binary":
        out["auc_macro"] = float(auc[1])
        out["sensitivity"], out["specificity"] = float(sens[1]), float(spec[1])
    else:
        out["auc_macro"] = _mean_defined(auc[keep])
        out["sensitivity"] = _mean_defined(sens[keep])
        out["specificity"] = _mean_defined(spec[keep])
    out["map"] = _mean_defined(ap[keep])

    truth_hot = y == 1
    if task_type == "multilabel":
        out["accuracy"] = float(np.mean(decided == truth_hot))
        out["f1_macro"] = _f1_macro(truth_hot[:, keep], decided[:, keep], keep)
    else:
        truth = y.argmax(axis=1)
        predicted = scores.argmax(axis=1)
        out["accuracy"] = float(np.mean(truth == predicted))
        predicted_hot = np.eye(n_classes, dtype=bool)[predicted]
        out["f1_macro"] = _f1_macro(truth_hot[:, keep], predicted_hot[:, keep], keep)
        if ordinal:
            out["kappa_quadratic"] = quadratic_kappa(truth, predicted, n_classes)
    return out


def patient_groups(patients: Sequence[Any]) -> list[np.ndarray]:
    """Row indices of each patient, patients in order of first appearance."""
    groups: dict[Any, list[int]] = {}
    for i, patient in enumerate(patients):
        groups.setdefault(patient, []).append(i)
    return [np.asarray(rows, dtype=np.int64) for rows in groups.values()]


def bootstrap_indices(
    groups: Sequence[np.ndarray], n_resamples: int, seed: int
) -> Iterator[np.ndarray]:
    """Row indices of ``n_resamples`` patient-level resamples (patients drawn with replacement;
    every image of a drawn patient comes along)."""
    rng = np.random.default_rng(seed)
    for _ in range(n_resamples):
        drawn = rng.integers(0, len(groups), size=len(groups))
        yield np.concatenate([groups[g] for g in drawn])


def _percentile_ci(values: np.ndarray) -> list[float] | None:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None
    low, high = np.percentile(finite, [2.5, 97.5])
    return [float(low), float(high)]


def undefined_reason(name: str, task_type: str) -> str:
    """Why ``name`` can be undefined on a set, for reports."""
    if name.startswith(("auc:", "ap:")) or name in ("auc_macro", "map"):
        return "a class has no positive (or no negative) sample in the test set"
    if name in ("sensitivity", "specificity"):
        return "a class has no positive (or no negative) sample in the test set"
    if name == "kappa_quadratic":
        return "truth and prediction hold a single class"
    return "undefined on this test set"


def bootstrap_metrics(
    y: np.ndarray,
    scores: np.ndarray,
    patients: Sequence[Any],
    task_type: str,
    *,
    classes: Sequence[str],
    thresholds: Sequence[float | None] | None = None,
    ordinal: bool = False,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """Point estimate, patient-bootstrap 95% CI and undefined-resample count of every metric.

    Returns ``{name: {"value", "ci95", "n_undefined"}}``; ``value``/``ci95`` are None when
    undefined (``n_undefined`` counts the resamples where the metric could not be computed;
    the interval comes from the others).
    """
    y = np.asarray(y).astype(int)
    scores = np.asarray(scores, dtype=float)
    check_task(y, scores, task_type)
    present = [c for c in range(y.shape[1]) if _both_present(y[:, c])]
    kwargs = dict(classes=classes, thresholds=thresholds, ordinal=ordinal, macro_classes=present)
    point = classification_metrics(y, scores, task_type, **kwargs)
    draws: dict[str, list[float]] = {name: [] for name in point}
    for rows in _progress(
        bootstrap_indices(patient_groups(patients), n_resamples, seed), n_resamples, progress
    ):
        sample = classification_metrics(y[rows], scores[rows], task_type, **kwargs)
        for name in point:
            draws[name].append(sample[name])
    result = {}
    for name, value in point.items():
        values = np.asarray(draws[name], dtype=float)
        result[name] = {
            "value": float(value) if np.isfinite(value) else None,
            "ci95": _percentile_ci(values) if np.isfinite(value) else None,
            "n_undefined": int(np.sum(~np.isfinite(values))),
        }
    return result


def paired_bootstrap(
    y: np.ndarray,
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    patients: Sequence[Any],
    task_type: str,
    *,
    classes: Sequence[str],
    thresholds_a: Sequence[float | None] | None = None,
    thresholds_b: Sequence[float | None] | None = None,
    ordinal: bool = False,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """Difference A - B of every metric on the same test images, with a paired bootstrap.

    Each resample draws patients once and scores both prediction sets on them. Returns
    ``{name: {"a", "b", "diff", "ci95", "p_value", "n_undefined"}}``; the p-value is the
    two-sided bootstrap p of "no difference": 2 x the smaller share of resampled differences
    on either side of 0, with the +1 correction, capped at 1.
    """
    y = np.asarray(y).astype(int)
    check_task(y, np.asarray(scores_a, dtype=float), task_type)
    check_task(y, np.asarray(scores_b, dtype=float), task_type)
    present = [c for c in range(y.shape[1]) if _both_present(y[:, c])]
    common = dict(classes=classes, ordinal=ordinal, macro_classes=present)
    point_a = classification_metrics(y, scores_a, task_type, thresholds=thresholds_a, **common)
    point_b = classification_metrics(y, scores_b, task_type, thresholds=thresholds_b, **common)
    diffs: dict[str, list[float]] = {name: [] for name in point_a}
    scores_a = np.asarray(scores_a, dtype=float)
    scores_b = np.asarray(scores_b, dtype=float)
    for rows in _progress(
        bootstrap_indices(patient_groups(patients), n_resamples, seed), n_resamples, progress
    ):
        a = classification_metrics(
            y[rows], scores_a[rows], task_type, thresholds=thresholds_a, **common
        )
        b = classification_metrics(
            y[rows], scores_b[rows], task_type, thresholds=thresholds_b, **common
        )
        for name in point_a:
            diffs[name].append(a[name] - b[name])
    return {
        name: _paired_entry(point_a[name], point_b[name], np.asarray(diffs[name], dtype=float))
        for name in point_a
    }


def _paired_entry(a: float, b: float, diffs: np.ndarray) -> dict[str, Any]:
    """One metric's paired comparison from its point values and resampled differences A - B:
    the CI is their 2.5-97.5 percentiles, the p-value the two-sided bootstrap p of "no
    difference" (2 x the smaller share on either side of 0, +1 corrected, capped at 1)."""
    finite = diffs[np.isfinite(diffs)]
    defined = bool(np.isfinite(a) and np.isfinite(b) and finite.size > 0)
    p_value = None
    if defined:
        below = (1 + np.sum(finite <= 0)) / (finite.size + 1)
        above = (1 + np.sum(finite >= 0)) / (finite.size + 1)
        p_value = float(min(1.0, 2 * min(below, above)))
    return {
        "a": float(a) if np.isfinite(a) else None,
        "b": float(b) if np.isfinite(b) else None,
        "diff": float(a - b) if defined else None,
        "ci95": _percentile_ci(diffs) if defined else None,
        "p_value": p_value,
        "n_undefined": int(np.sum(~np.isfinite(diffs))),
    }


def mean_with_ci(
    values: np.ndarray,
    patients: Sequence[Any],
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> tuple[float | None, list[float] | None]:
    """Mean of per-query values (e.g. retrieval hits) and its patient-bootstrap 95% CI; NaN
    values (not applicable to that query) are left out, (None, None) when none is left."""
    values = np.asarray(values, dtype=float)
    if len(patients) != values.size:
        raise ValueError(f"{values.size} values for {len(patients)} patients: give one per query")
    defined = np.isfinite(values)
    values = values[defined]
    patients = [p for p, keep in zip(patients, defined, strict=True) if keep]
    if values.size == 0:
        return None, None
    draws = np.array(
        [
            values[rows].mean()
            for rows in bootstrap_indices(patient_groups(patients), n_resamples, seed)
        ]
    )
    return float(values.mean()), _percentile_ci(draws)


def paired_mean_bootstrap(
    values_a: np.ndarray,
    values_b: np.ndarray,
    patients: Sequence[Any],
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """Difference of the means of two per-query value arrays on the same queries (e.g. the
    retrieval hits of two encoders), with a paired patient bootstrap; the entry has the keys of
    :func:`paired_bootstrap`'s. Queries where either value is NaN (not applicable) are left
    out of both."""
    a, b = np.asarray(values_a, dtype=float), np.asarray(values_b, dtype=float)
    if a.shape != b.shape or a.shape != (len(patients),):
        raise ValueError(
            f"paired values must be one per query: got {a.shape}, {b.shape} for "
            f"{len(patients)} patients"
        )
    defined = np.isfinite(a) & np.isfinite(b)
    a, b = a[defined], b[defined]
    patients = [p for p, keep in zip(patients, defined, strict=True) if keep]
    if a.size == 0:
        return _paired_entry(float("nan"), float("nan"), np.zeros(0))
    delta = a - b
    draws = np.array(
        [
            delta[rows].mean()
            for rows in bootstrap_indices(patient_groups(patients), n_resamples, seed)
        ]
    )
    return _paired_entry(float(a.mean()), float(b.mean()), draws)


def summarize(
    stats: Mapping[str, Mapping[str, Any]], classes: Sequence[str], task_type: str
) -> tuple[dict[str, Any], dict[str, dict[str, Any]], list[str]]:
    """Split :func:`bootstrap_metrics` output into results.json's ``metrics`` (name, name_ci95,
    name_ci_undefined_resamples), ``per_class`` entries and a list of undefined-metric notes."""
    metrics: dict[str, Any] = {}
    per_class: dict[str, dict[str, Any]] = {str(c): {} for c in classes}
    notes: list[str] = []
    for name, entry in stats.items():
        if ":" in name:
            kind, cls = name.split(":", 1)
            per_class[cls][kind] = entry["value"]
            per_class[cls][f"{kind}_ci95"] = entry["ci95"]
        else:
            metrics[name] = entry["value"]
            metrics[f"{name}_ci95"] = entry["ci95"]
            metrics[f"{name}_undefined_resamples"] = entry["n_undefined"]
        if entry["value"] is None:
            notes.append(f"{name}: undefined ({undefined_reason(name, task_type)})")
        elif entry["n_undefined"]:
            notes.append(
                f"{name}: undefined in {entry['n_undefined']} bootstrap resample(s) (a resample "
                "without both classes); its CI comes from the other resamples"
            )
    return metrics, per_class, notes


def _top_k_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """(Q, G) bool: each row's k best entries, ties at the cut taken in column order (the
    order a stable sort of the row would give), without sorting the rows."""
    k = min(k, scores.shape[1])
    if k == 0:
        return np.zeros(scores.shape, dtype=bool)
    kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1 : k]  # the k-th largest per row
    above = scores > kth
    ties = scores == kth
    mask = above | ties
    need = k - above.sum(axis=1)
    crowded = np.flatnonzero(ties.sum(axis=1) > need)  # more ties at the cut than places
    if crowded.size:
        first = np.cumsum(ties[crowded], axis=1) <= need[crowded, None]
        mask[crowded] = above[crowded] | (ties[crowded] & first)
    return mask


def retrieval_hits(
    similarity: np.ndarray,
    own_text: np.ndarray,
    image_labels: np.ndarray,
    text_labels: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    *,
    text_to_image: bool = True,
) -> dict[str, np.ndarray]:
    """Per-query hit arrays (float, one entry per query) of every retrieval metric, the one
    ranking kernel of validation during pretraining and of ``mgll retrieve``.

    ``similarity`` (I, T) images x texts; ``own_text`` (I,) the gallery index of each image's
    text; ``image_labels`` (I, C) and ``text_labels`` (T, C) 0/1 label matrices. Keys:
    ``i2t_R@K`` (own text in the top K), ``t2i_R@K`` (one of the text's images in the top K),
    ``i2t_P@K``/``t2i_P@K`` (share of the top K whose labels overlap the query's; a K beyond
    the gallery counts the whole gallery) and ``i2t_rank`` (1-based rank of the own text);
    ``text_to_image=False`` leaves the ``t2i`` keys out. Ties rank in gallery order, as a
    stable sort would (which favours the earlier entry; exact ties are rare with float
    embeddings). No row is sorted: O(I x T) per K in time and memory.
    """
    similarity = np.asarray(similarity)
    own_text = np.asarray(own_text, dtype=np.int64)
    n_images, n_texts = similarity.shape
    rows = np.arange(n_images)
    own = similarity[rows, own_text][:, None]
    earlier = np.arange(n_texts)[None, :] < own_text[:, None]
    rank_of_own = (similarity > own).sum(axis=1) + ((similarity == own) & earlier).sum(axis=1)
    # 0/1 labels: float32 products are exact counts, and BLAS makes them cheap
    overlap = (
        np.asarray(image_labels, dtype=np.float32) @ np.asarray(text_labels, dtype=np.float32).T
    ) > 0  # (I, T)
    out: dict[str, np.ndarray] = {}
    if text_to_image:
        owner = np.zeros((n_texts, n_images), dtype=bool)
        owner[own_text, rows] = True
    for k in ks:
        out[f"i2t_R@{k}"] = (rank_of_own < k).astype(float)
        top = _top_k_mask(similarity, k)
        out[f"i2t_P@{k}"] = (top & overlap).sum(axis=1) / max(min(k, n_texts), 1)
        if text_to_image:
            top_t = _top_k_mask(similarity.T, k)
            out[f"t2i_R@{k}"] = (top_t & owner).any(axis=1).astype(float)
            out[f"t2i_P@{k}"] = (top_t & overlap.T).sum(axis=1) / max(min(k, n_images), 1)
    out["i2t_rank"] = rank_of_own.astype(float) + 1
    return out


def _progress(iterable: Iterator[np.ndarray], total: int, enabled: bool) -> Iterator[np.ndarray]:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return iter(
        tqdm(iterable, total=total, desc="bootstrap", unit="resample", leave=False, disable=None)
    )


def seed_pooled_bootstrap(
    y: np.ndarray,
    scores: Sequence[np.ndarray],
    patients: Sequence[Any],
    task_type: str,
    metric: str,
    *,
    classes: Sequence[str],
    baseline: Sequence[np.ndarray] | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """One metric over several seeds' predictions on the same test images, with an interval
    that holds both the patient sampling and the seed-to-seed spread.

    ``scores`` holds one (N, C) matrix per seed (rows aligned with ``y`` and ``patients``).
    The value is the mean over seeds of each seed's metric. Each resample draws patients with
    replacement *and* one seed uniformly, and scores that seed's predictions on those patients
    (a two-stage bootstrap: seeds, then patients within the seed), so the 2.5-97.5 percentiles
    widen with the spread between seeds; with one seed it is :func:`bootstrap_metrics`'s CI.
    With ``baseline`` (one matrix per seed, paired with ``scores`` by seed) the entry is the
    paired difference A - B in :func:`paired_bootstrap`'s keys (``a``, ``b``, ``diff``,
    ``ci95``, ``p_value``), the same seed and patients drawn for both.
    """
    y = np.asarray(y).astype(int)
    runs = [np.asarray(s, dtype=float) for s in scores]
    others = None if baseline is None else [np.asarray(s, dtype=float) for s in baseline]
    if not runs or (others is not None and len(others) != len(runs)):
        raise ValueError("seed_pooled_bootstrap: give one score matrix per seed for A (and B)")
    for s in runs + (others or []):
        check_task(y, s, task_type)
    present = [c for c in range(y.shape[1]) if _both_present(y[:, c])]

    def value(rows: np.ndarray | slice, s: np.ndarray) -> float:
        return classification_metrics(
            y[rows], s[rows], task_type, classes=classes, macro_classes=present
        )[metric]

    everyone = slice(None)
    per_seed = [value(everyone, s) for s in runs]
    rng = np.random.default_rng(seed + 1)  # the seed draw, apart from the patients' stream
    draws = []
    for rows in bootstrap_indices(patient_groups(patients), n_resamples, seed):
        k = int(rng.integers(len(runs)))
        a = value(rows, runs[k])
        draws.append(a if others is None else a - value(rows, others[k]))
    draws_array = np.asarray(draws, dtype=float)
    mean_a = float(np.mean(per_seed))
    if others is None:
        defined = bool(np.all(np.isfinite(per_seed)))
        return {
            "value": mean_a if defined else None,
            "ci95": _percentile_ci(draws_array) if defined else None,
            "per_seed": [float(v) if np.isfinite(v) else None for v in per_seed],
            "n_undefined": int(np.sum(~np.isfinite(draws_array))),
        }
    per_seed_b = [value(everyone, s) for s in others]
    entry = _paired_entry(mean_a, float(np.mean(per_seed_b)), draws_array)
    entry["per_seed_diff"] = [float(a - b) for a, b in zip(per_seed, per_seed_b, strict=True)]
    return entry
