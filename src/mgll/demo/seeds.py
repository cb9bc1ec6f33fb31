"""The demo over several seeds: one complete single-seed demo per seed (its own folds,
initialisation and data order, ``OUT/seed<s>/``), then one summary whose intervals carry the
seed-to-seed spread.

Interval over seeds and patients (a two-level bootstrap): each resample draws the patient
groups with replacement (one draw: every seed scores the same patients) and the seeds with
replacement; the statistic (a macro AUC, a difference of two encoders' macro AUCs on the same
images, a mean retrieval hit rate or its difference) is computed on each drawn seed's images of
the drawn patients and averaged over the drawn seeds. The 2.5th and 97.5th percentiles of those
averages are the 95% interval; the point estimate is the mean over seeds of each seed's
full-data value. With few seeds the
seed level is coarse (3 seeds: 10 distinct seed draws), which widens the interval rather than
hiding the spread; a claim holds across seeds when this interval excludes 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mgll.demo.evaluation import RETRIEVAL_HEADLINE
from mgll.demo.settings import COMPARISONS, ENCODERS, DemoError

Statistic = Callable[[np.ndarray], float]  # rows of one seed's images -> a number (NaN: undefined)


def seeds_and_patients_interval(
    statistics: Sequence[Statistic],
    patients: Sequence[Sequence[str]],
    *,
    n_resamples: int,
    seed: int = 0,
) -> dict[str, Any]:
    """Mean over seeds and its 95% interval over seeds and patients (module docstring).

    ``statistics[s]`` computes the statistic of seed s on an array of its rows,
    ``patients[s]`` is the patient of each of seed s's rows. Every seed holds the same patients
    (the same dataset), so one patient draw serves all seeds of a resample: the patient-level
    spread is not averaged away by repeating seeds. Returns ``{"value", "per_seed", "ci95",
    "n_undefined"}`` (resamples where the statistic was undefined are counted, left out)."""
    by_seed = []
    for rows_of in patients:
        groups: dict[str, list[int]] = {}
        for i, patient in enumerate(rows_of):
            groups.setdefault(patient, []).append(i)
        by_seed.append({p: np.asarray(r, dtype=np.int64) for p, r in groups.items()})
    universe = sorted(by_seed[0])
    if any(sorted(g) != universe for g in by_seed[1:]):
        raise DemoError("the seeds' outputs hold different patients; rerun the demo")
    per_seed = [
        float(stat(np.arange(len(p)))) for stat, p in zip(statistics, patients, strict=True)
    ]
    rng = np.random.default_rng(seed)
    n_seeds = len(statistics)
    draws = np.empty(n_resamples)
    for b in range(n_resamples):
        drawn = [universe[j] for j in rng.integers(0, len(universe), size=len(universe))]
        values = [
            statistics[s](np.concatenate([by_seed[s][p] for p in drawn]))
            for s in rng.integers(0, n_seeds, size=n_seeds)
        ]
        draws[b] = np.mean(values)
    finite = draws[np.isfinite(draws)]
    value = float(np.mean(per_seed)) if np.all(np.isfinite(per_seed)) else None
    ci = [float(v) for v in np.percentile(finite, [2.5, 97.5])] if finite.size else None
    return {
        "value": value,
        "per_seed": [v if np.isfinite(v) else None for v in per_seed],
        "ci95": ci if value is not None else None,
        "n_undefined": int(n_resamples - finite.size),
    }


def _classification(folder: Path) -> dict[str, Any]:
    from mgll.eval.results import read_predictions, read_results

    predictions = read_predictions(folder)
    predictions["type"] = read_results(folder)["task"]["type"]
    return predictions


def _auc(p: dict[str, Any]) -> Statistic:
    from mgll.metrics import classification_metrics

    y = p["y"].astype(int)
    present = [c for c in range(y.shape[1]) if 0 < y[:, c].sum() < len(y)]

    def statistic(rows: np.ndarray) -> float:
        m = classification_metrics(
            y[rows], p["scores"][rows], p["type"], classes=p["classes"], macro_classes=present
        )
        return m["auc_macro"]

    return statistic


def _hits(h: dict[str, Any], metric: str) -> Statistic:
    values = h["hits"][metric]

    def statistic(rows: np.ndarray) -> float:
        picked = values[rows]
        picked = picked[np.isfinite(picked)]
        return float(picked.mean()) if picked.size else float("nan")

    return statistic


def _difference(a: Statistic, b: Statistic) -> Statistic:
    return lambda rows: a(rows) - b(rows)


def _same_images(a: Sequence[str], b: Sequence[str], where: str) -> None:
    if list(a) != list(b):
        raise DemoError(f"{where}: the encoders' outputs hold different images; rerun the demo")


def across_seeds(
    outs: Sequence[Path],
    levels: Sequence[str],
    text_level: str,
    *,
    n_resamples: int,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The across-seed ``table`` (every encoder's macro AUC per level and protocol, and its
    retrieval headline metrics) and ``comparisons`` (MGLL - CLIP, MGLL - random) from the
    per-seed demo folders ``outs``, each with its interval over seeds and patients."""
    from mgll.eval.retrieve import read_retrieval_hits

    table, comparisons = [], []
    tasks = [(lv, p, f"{p}-{lv}", "auc_macro") for lv in levels for p in ("probe", "zeroshot")]
    tasks += [(text_level, "retrieval", f"retrieval-{text_level}", m) for m in RETRIEVAL_HEADLINE]
    for level, protocol, name, metric in tasks:
        read = {e: [] for e in ENCODERS}
        for out in outs:
            for encoder in ENCODERS:
                folder = out / encoder / name
                if protocol == "retrieval":
                    hits = read_retrieval_hits(folder)
                    read[encoder].append((hits["images"], hits["patients"], _hits(hits, metric)))
                else:
                    p = _classification(folder)
                    read[encoder].append((p["images"], p["patients"], _auc(p)))
        patients = [p for _, p, _ in read[ENCODERS[0]]]
        shown = {"probe": "linear_probe"}.get(protocol, protocol)
        for encoder in ENCODERS:
            stats = [stat for _, _, stat in read[encoder]]
            entry = seeds_and_patients_interval(stats, patients, n_resamples=n_resamples, seed=seed)
            table.append(
                {"encoder": encoder, "level": level, "protocol": shown, "metric": metric, **entry}
            )
        for a, b in COMPARISONS:
            stats = []
            for s, ((images_a, _, sa), (images_b, _, sb)) in enumerate(
                zip(read[a], read[b], strict=True)
            ):
                _same_images(images_a, images_b, str(outs[s] / name))
                stats.append(_difference(sa, sb))
            entry = seeds_and_patients_interval(stats, patients, n_resamples=n_resamples, seed=seed)
            comparisons.append(
                {"a": a, "b": b, "level": level, "protocol": shown, "metric": metric, **entry}
            )
    return table, comparisons


def format_seeds(summary: dict[str, Any]) -> str:
    """The across-seed table and comparisons, as printed at the end."""
    n = len(summary["settings"]["seeds"])
    lines = [
        f"over {n} seeds: mean (95% interval over seeds and patients) [each seed]",
        f"{'level':<14}{'protocol':<14}{'metric':<10}" + "".join(f"{e:<40}" for e in ENCODERS),
    ]
    rows: dict[tuple[str, str, str], dict[str, str]] = {}
    for r in summary["table"]:
        rows.setdefault((r["level"], r["protocol"], r["metric"]), {})[r["encoder"]] = _cell(r)
    for (level, protocol, metric), cells in rows.items():
        lines.append(
            f"{level:<14}{protocol:<14}{metric:<10}"
            + "".join(f"{cells.get(e, ''):<40}" for e in ENCODERS)
        )
    lines.append("")
    for c in summary["comparisons"]:
        holds = c["ci95"] is not None and (c["ci95"][0] > 0 or c["ci95"][1] < 0)
        lines.append(
            f"{c['a']} - {c['b']} ({c['level']}, {c['protocol']} {c['metric']}): {_cell(c, '+')}"
            + ("" if holds else "  (not shown across seeds: the interval includes 0)")
        )
    return "\n".join(lines)


def _cell(entry: dict[str, Any], sign: str = "") -> str:
    if entry["value"] is None:
        return "undefined"
    seeds = ", ".join("-" if v is None else f"{v:{sign}.3f}" for v in entry["per_seed"])
    ci = entry["ci95"]
    return f"{entry['value']:{sign}.3f} [{ci[0]:{sign}.3f}, {ci[1]:{sign}.3f}] ({seeds})"
