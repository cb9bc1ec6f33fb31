"""Metrics: classification (:mod:`.classification`, scikit-learn's definitions, tested equal),
the patient-level bootstrap with paired comparisons (:mod:`.bootstrap`) and retrieval ranking
(:mod:`.retrieval`). Every public name is re-exported here: ``from mgll.metrics import X``.

All of them work on one representation, whatever the task: ``y`` an ``(N, C)`` 0/1 indicator
matrix and ``scores`` an ``(N, C)`` float matrix; an undefined metric is ``NaN`` inside the
functions and is never averaged in silently.
"""

from mgll.metrics.bootstrap import (
    DEFAULT_RESAMPLES,
    Statistic,
    bootstrap_indices,
    bootstrap_metrics,
    comparison_verdict,
    mean_with_ci,
    paired_bootstrap,
    paired_mean_bootstrap,
    patient_groups,
    seed_mean_interval,
    summarize,
    undefined_reason,
)
from mgll.metrics.classification import (
    HEADLINE,
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
    "HEADLINE",
    "TASK_TYPES",
    "Statistic",
    "average_precision",
    "bootstrap_indices",
    "bootstrap_metrics",
    "both_classes_present",
    "check_task",
    "classification_metrics",
    "comparison_verdict",
    "mean_with_ci",
    "paired_bootstrap",
    "paired_mean_bootstrap",
    "patient_groups",
    "quadratic_kappa",
    "retrieval_hits",
    "roc_auc",
    "seed_mean_interval",
    "summarize",
    "undefined_reason",
    "youden_thresholds",
]
