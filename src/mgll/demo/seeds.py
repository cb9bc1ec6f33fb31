"""The demo over several seeds: one complete single-seed demo per seed (its own folds,
initialisation and data order, ``OUT/seed<s>/``), then one summary whose intervals carry the
seed-to-seed spread.

Interval over seeds and patients: :func:`mgll.metrics.seed_mean_interval` (each resample draws
the patient groups once for every seed, and the seeds, with replacement) of a macro AUC or a
mean retrieval hit rate; a comparison is its paired form, the difference of two encoders on the
same images, seeds and patients (with a p-value). A claim holds across seeds when this interval
excludes 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mgll.demo.evaluation import RETRIEVAL_HEADLINE
from mgll.demo.settings import DemoError
from mgll.demo.summary import table_encoders
from mgll.eval.results import read_predictions, read_results
from mgll.eval.retrieve import read_retrieval_hits
from mgll.metrics import Statistic, classification_metrics, seed_mean_interval


def _same_patients(patients: Sequence[Sequence[str]]) -> None:
    universe = set(patients[0])
    if any(set(p) != universe for p in patients[1:]):
        raise DemoError("the seeds' outputs hold different patients; rerun the demo")


def _classification(folder: Path) -> dict[str, Any]:
    predictions = read_predictions(folder)
    predictions["type"] = read_results(folder)["task"]["type"]
    return predictions


def _auc(p: dict[str, Any]) -> Statistic:
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


def _same_images(a: Sequence[str], b: Sequence[str], where: str) -> None:
    if list(a) != list(b):
        raise DemoError(f"{where}: the encoders' outputs hold different images; rerun the demo")


def across_seeds(
    outs: Sequence[Path],
    levels: Sequence[str],
    text_level: str,
    *,
    encoders: Sequence[str],
    pairs: Sequence[tuple[str, str]],
    n_resamples: int,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The across-seed ``table`` (every encoder's macro AUC per level and protocol, and its
    retrieval headline metrics) and ``comparisons`` (each of ``pairs`` ``(a, b)``: a - b) from the
    per-seed demo folders ``outs``, each with its interval over seeds and patients."""
    table, comparisons = [], []
    tasks = [(lv, p, f"{p}-{lv}", "auc_macro") for lv in levels for p in ("probe", "zeroshot")]
    tasks += [(text_level, "retrieval", f"retrieval-{text_level}", m) for m in RETRIEVAL_HEADLINE]
    for level, protocol, name, metric in tasks:
        read: dict[str, list] = {e: [] for e in encoders}
        for out in outs:
            for encoder in encoders:
                folder = out / encoder / name
                if protocol == "retrieval":
                    hits = read_retrieval_hits(folder)
                    read[encoder].append((hits["images"], hits["patients"], _hits(hits, metric)))
                else:
                    p = _classification(folder)
                    read[encoder].append((p["images"], p["patients"], _auc(p)))
        patients = [p for _, p, _ in read[encoders[0]]]
        _same_patients(patients)
        shown = {"probe": "linear_probe"}.get(protocol, protocol)
        for encoder in encoders:
            stats = [stat for _, _, stat in read[encoder]]
            entry = seed_mean_interval(stats, patients, n_resamples=n_resamples, seed=seed)
            table.append(
                {"encoder": encoder, "level": level, "protocol": shown, "metric": metric, **entry}
            )
        for a, b in pairs:
            for s, ((images_a, _, _), (images_b, _, _)) in enumerate(
                zip(read[a], read[b], strict=True)
            ):
                _same_images(images_a, images_b, str(outs[s] / name))
            entry = seed_mean_interval(
                [stat for _, _, stat in read[a]],
                patients,
                baseline=[stat for _, _, stat in read[b]],
                n_resamples=n_resamples,
                seed=seed,
            )
            comparisons.append(
                {"a": a, "b": b, "level": level, "protocol": shown, "metric": metric, **entry}
            )
    return table, comparisons


def format_seeds(summary: dict[str, Any]) -> str:
    """The across-seed table and comparisons, as printed at the end."""
    n = len(summary["settings"]["seeds"])
    encoders = table_encoders(summary["table"])
    rows: dict[tuple[str, str, str], dict[str, str]] = {}
    for r in summary["table"]:
        rows.setdefault((r["level"], r["protocol"], r["metric"]), {})[r["encoder"]] = _cell(r)
    # a column as wide as its widest cell, and two spaces: the cells never run together
    width = 2 + max(len(text) for cells in rows.values() for text in [*cells.values(), *encoders])
    lines = [
        f"over {n} seeds: mean (95% interval over seeds and patients) [each seed]",
        f"{'level':<14}{'protocol':<14}{'metric':<10}" + "".join(f"{e:<{width}}" for e in encoders),
    ]
    for (level, protocol, metric), cells in rows.items():
        lines.append(
            f"{level:<14}{protocol:<14}{metric:<10}"
            + "".join(f"{cells.get(e, ''):<{width}}" for e in encoders)
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
