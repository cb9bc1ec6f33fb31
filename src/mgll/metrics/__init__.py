"""Metrics: classification (scikit-learn's definitions), the patient bootstrap, retrieval.

``classification.py``, ``bootstrap.py`` and ``retrieval.py`` hold them; every public name is
re-exported here, so ``from mgll.metrics import X`` reads the same.

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

from mgll.metrics.bootstrap import (
    DEFAULT_RESAMPLES,
    bootstrap_indices,
    bootstrap_metrics,
    mean_with_ci,
    paired_bootstrap,
    paired_mean_bootstrap,
    patient_groups,
    summarize,
    undefined_reason,
)
from mgll.metrics.classification import (
    TASK_TYPES,
    average_precision,
    both_classes_present,
    check_task,
    classification_metrics,
    quadratic_kappa,
    roc_auc,
    youden_thresholds,
)
from mgll.metrics.retrieval import retrieval_hits

__all__ = [
    "DEFAULT_RESAMPLES",
    "TASK_TYPES",
    "average_precision",
    "bootstrap_indices",
    "bootstrap_metrics",
    "both_classes_present",
    "check_task",
    "classification_metrics",
    "mean_with_ci",
    "paired_bootstrap",
    "paired_mean_bootstrap",
    "patient_groups",
    "quadratic_kappa",
    "retrieval_hits",
    "roc_auc",
    "summarize",
    "undefined_reason",
    "youden_thresholds",
]
