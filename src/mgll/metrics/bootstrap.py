"""Patient-level bootstrap: confidence intervals and paired comparisons, and the interval of a
mean over seeds (:func:`seed_mean_interval`: seeds and patients resampled).

Intervals come from resampling *patients* with replacement (all images of a drawn patient
come along), so correlated images of one patient never narrow an interval; paired comparisons
resample the same patients for both prediction sets. A metric undefined on a set is reported
as ``None`` with the reason (:func:`summarize`), and the bootstrap counts the resamples where
it was undefined.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from mgll.metrics.classification import both_classes_present, check_task, classification_metrics

DEFAULT_RESAMPLES = 1000


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


def comparison_verdict(a: str, b: str, ci95: Sequence[float] | None) -> str | None:
    """How a paired difference A - B reads: ``"A better"`` when its 95% interval lies above 0,
    ``"B better"`` below 0, else ``"no clear difference"``; None without an interval."""
    if not ci95:
        return None
    if ci95[0] > 0:
        return f"{a} better"
    if ci95[1] < 0:
        return f"{b} better"
    return "no clear difference"


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
    present = [c for c in range(y.shape[1]) if both_classes_present(y[:, c])]
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
    present = [c for c in range(y.shape[1]) if both_classes_present(y[:, c])]
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


Statistic = Callable[[np.ndarray], float]  # rows of one seed's images -> a number (NaN: undefined)


def seed_mean_interval(
    statistics: Sequence[Statistic],
    patients: Sequence[Sequence[Any]],
    *,
    baseline: Sequence[Statistic] | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """The mean over seeds of a statistic, with a 95% interval over seeds and patients.

    ``statistics[s]`` computes seed s's statistic (a macro AUC, a mean hit rate ...) on an
    array of its rows; ``patients[s]`` names the patient of each of seed s's rows (every seed
    holds the same patients, in any row order). Each resample draws the patients with
    replacement once, for every seed (so repeating a seed adds no patient information), and
    the seeds with replacement; its value is the mean of the drawn seeds' statistics on the
    drawn patients. The interval is the 2.5-97.5 percentiles of those means, so it belongs to
    the reported value (the mean over seeds of each seed's full-data statistic) and holds both
    the seed-to-seed spread and the patient sampling. With few seeds the seed level is coarse
    (3 seeds: 10 distinct seed draws), which widens the interval rather than hiding the spread.

    Returns ``{"value", "per_seed", "ci95", "n_undefined"}`` (resamples where the statistic
    was undefined are counted and left out). With ``baseline`` (one statistic per seed, paired
    with ``statistics`` by seed) the statistic is the difference A - B on the same seeds and
    patients, and the entry adds the two-sided bootstrap ``p_value`` of no difference and
    ``value_a``/``value_b``, each encoder's mean over seeds.
    """
    if not statistics or (baseline is not None and len(baseline) != len(statistics)):
        raise ValueError("seed_mean_interval: give one statistic per seed for A (and B)")
    if len(patients) != len(statistics):
        raise ValueError("seed_mean_interval: give the patients of every seed's rows")
    paired = baseline is not None
    measured = (
        [_difference(a, b) for a, b in zip(statistics, baseline, strict=True)]
        if paired
        else list(statistics)
    )
    per_seed, draws = _seed_mean_draws(measured, patients, n_resamples, seed)
    finite = draws[np.isfinite(draws)]
    value = float(np.mean(per_seed)) if np.all(np.isfinite(per_seed)) else None
    ci = [float(v) for v in np.percentile(finite, [2.5, 97.5])] if finite.size else None
    entry: dict[str, Any] = {
        "value": value,
        "per_seed": [v if np.isfinite(v) else None for v in per_seed],
        "ci95": ci if value is not None else None,
        "n_undefined": int(n_resamples - finite.size),
    }
    if paired:
        means = [_full_data_mean(stats, patients) for stats in (statistics, baseline)]
        comparison = _paired_entry(means[0], means[1], draws)
        entry.update(
            p_value=comparison["p_value"], value_a=comparison["a"], value_b=comparison["b"]
        )
    return entry


def _difference(a: Statistic, b: Statistic) -> Statistic:
    return lambda rows: a(rows) - b(rows)


def _full_data_mean(statistics: Sequence[Statistic], patients: Sequence[Sequence[Any]]) -> float:
    """The mean over seeds of each seed's statistic on all its rows."""
    values = [stat(np.arange(len(p))) for stat, p in zip(statistics, patients, strict=True)]
    return float(np.mean(values))


def _seed_mean_draws(
    statistics: Sequence[Statistic],
    patients: Sequence[Sequence[Any]],
    n_resamples: int,
    seed: int,
) -> tuple[list[float], np.ndarray]:
    """Each seed's statistic on all its rows, and the resampled means over seeds
    (:func:`seed_mean_interval`'s two-level draw)."""
    by_seed = []
    for rows_of in patients:
        groups: dict[Any, list[int]] = {}
        for i, patient in enumerate(rows_of):
            groups.setdefault(patient, []).append(i)
        by_seed.append({p: np.asarray(r, dtype=np.int64) for p, r in groups.items()})
    universe = sorted(by_seed[0])
    if any(sorted(g) != universe for g in by_seed[1:]):
        raise ValueError("seed_mean_interval: the seeds' rows hold different patients")
    per_seed = [
        float(stat(np.arange(len(p)))) for stat, p in zip(statistics, patients, strict=True)
    ]
    rng = np.random.default_rng(seed)
    n_seeds = len(statistics)
    draws = np.empty(n_resamples)
    for b in range(n_resamples):
        # One patient draw for every seed of the resample, then the seeds with replacement.
        drawn = [universe[j] for j in rng.integers(0, len(universe), size=len(universe))]
        values = [
            statistics[s](np.concatenate([by_seed[s][p] for p in drawn]))
            for s in rng.integers(0, n_seeds, size=n_seeds)
        ]
        draws[b] = np.mean(values)
    return per_seed, draws


def _progress(iterable: Iterator[np.ndarray], total: int, enabled: bool) -> Iterator[np.ndarray]:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return iter(
        tqdm(iterable, total=total, desc="bootstrap", unit="resample", leave=False, disable=None)
    )
