"""Clinical classification metrics on one representation for every task type.

``y`` is an ``(N, C)`` 0/1 indicator matrix (one-hot for binary and multi-class tasks,
multi-hot for multi-label ones) and ``scores`` an ``(N, C)`` float matrix (class probabilities
for binary/multi-class, per-label probabilities for multi-label). The metrics follow
scikit-learn's definitions (tested equal):

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
of one class) is ``NaN`` here and is never averaged in silently (see
:mod:`mgll.metrics.bootstrap`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import roc_curve

TASK_TYPES = ("binary", "multiclass", "multilabel")


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


def both_classes_present(column: np.ndarray) -> bool:
    """Whether a 0/1 column holds both a positive and a negative (else AUC/AP are undefined)."""
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
        if not both_classes_present(y[:, c]):
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


HEADLINE = (
    "auc_macro",
    "map",
    "accuracy",
    "f1_macro",
    "sensitivity",
    "specificity",
    "kappa_quadratic",
)
"""The headline metrics of :func:`classification_metrics`, in the order commands print them
and ``mgll compare`` compares them."""


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
