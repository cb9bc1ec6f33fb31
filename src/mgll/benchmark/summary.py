"""From finished units to ``benchmark.json``, ``table.md`` and ``table.csv``.

A unit is one (task, encoder, protocol, label fraction, seed) run; a row pools the seeds of one
(task, encoder, protocol, fraction) with :func:`mgll.metrics.seed_mean_interval`: the value is
the mean over seeds and the 95% interval is the bootstrap of that mean (each resample draws the
test patients once, and the seeds, with replacement), so it holds the seed-to-seed spread and
the test sampling. Comparisons pair the first encoder with each other one on the same test
images, seeds (same label-fraction draws) and drawn patients.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mgll.benchmark.tasks import BenchmarkError, BenchmarkTask
from mgll.metrics import (
    Statistic,
    both_classes_present,
    check_task,
    classification_metrics,
    seed_mean_interval,
)

INTERVAL = (
    "95% bootstrap of the mean over seeds: each resample draws the test patients and the seeds "
    "(label-fraction draws) with replacement and averages the drawn seeds' metric on the drawn "
    "patients, so the interval holds the seed-to-seed spread and the test sampling"
)


def _aligned(reference: Mapping[str, Any], other: Mapping[str, Any], where: str) -> np.ndarray:
    """Rows of ``other``'s predictions in ``reference``'s image order."""
    position = {image: i for i, image in enumerate(other["images"])}
    missing = [image for image in reference["images"] if image not in position]
    if missing or len(position) != len(reference["images"]):
        raise BenchmarkError(
            f"{where}: the seeds' test images differ (e.g. {missing[:2]}); rerun into a fresh "
            "--output-dir"
        )
    return np.asarray([position[image] for image in reference["images"]], dtype=np.int64)


def _metric(truth: Mapping[str, Any], scores: np.ndarray, metric: str) -> Statistic:
    """``metric`` of one seed's ``scores`` on a set of rows (``truth``: the task's labels,
    classes and type); the macro averages over the classes the whole test set holds both ways."""
    y = np.asarray(truth["y"]).astype(int)
    scores = np.asarray(scores, dtype=float)
    check_task(y, scores, truth["task_type"])
    present = [c for c in range(y.shape[1]) if both_classes_present(y[:, c])]

    def statistic(rows: np.ndarray) -> float:
        return classification_metrics(
            y[rows],
            scores[rows],
            truth["task_type"],
            classes=truth["classes"],
            macro_classes=present,
        )[metric]

    return statistic


def paper_numbers(task: BenchmarkTask, protocol: str, fraction: float) -> dict[str, Any]:
    """The row's ``paper`` (MGLL) and ``paper_other`` (CLIP, best other) numbers: the task's own
    protocol's, at full labels only (the paper reports no label fraction below 1)."""
    if fraction < 1:
        return {"paper": None, "paper_other": {}}
    others = {m: task.paper_value(protocol, m) for m in ("CLIP", "best other")}
    return {
        "paper": task.paper_value(protocol),
        "paper_other": {m: v for m, v in others.items() if v is not None},
    }


def _group_key(unit: Mapping[str, Any]) -> tuple[str, str, str, float]:
    return unit["task"], unit["encoder"], unit["protocol"], float(unit["label_fraction"])


def build_rows(
    units: Sequence[Mapping[str, Any]],
    predictions: Mapping[str, Mapping[str, Any]],
    tasks: Mapping[str, BenchmarkTask],
    *,
    n_resamples: int,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], dict[tuple, dict[str, Any]]]:
    """One row per (task, encoder, protocol, fraction) with a finished seed; also the aligned
    score matrices per group (by seed) for :func:`build_comparisons`."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for unit in units:
        groups.setdefault(_group_key(unit), []).append(unit)
    rows, aligned = [], {}
    for key, members in groups.items():
        task_name, encoder, protocol, fraction = key
        task = tasks[task_name]
        done = [u for u in members if u["status"] == "done"]
        skipped = [{"seed": u["seed"], "reason": u["reason"]} for u in members if u not in done]
        row: dict[str, Any] = {
            "task": task_name,
            "encoder": encoder,
            "protocol": protocol,
            "label_fraction": fraction,
            "metric": task.metric,
            "value": None,
            "ci95": None,
            "n_test": None,
            "seeds": [u["seed"] for u in done],
            "per_seed": [],
            **paper_numbers(task, protocol, fraction),
            "results": [u["folder"] for u in done],
            "skipped": skipped,
            "fixed": all(u.get("fixed", False) for u in members),
        }
        if done:
            first = predictions[done[0]["folder"]]
            by_seed = {}
            for unit in done:
                pred = predictions[unit["folder"]]
                order = _aligned(first, pred, unit["folder"])
                by_seed[unit["seed"]] = pred["scores"][order]
            patients = [
                p or f"image:{image}"
                for p, image in zip(first["patients"], first["images"], strict=True)
            ]
            stats = seed_mean_interval(
                [_metric(first, scores, task.metric) for scores in by_seed.values()],
                [patients] * len(by_seed),
                n_resamples=n_resamples,
                seed=seed,
            )
            row.update(
                value=stats["value"],
                ci95=stats["ci95"],
                n_test=len(first["images"]),
                per_seed=stats["per_seed"],
            )
            aligned[key] = {
                "y": first["y"],
                "images": first["images"],
                "patients": patients,
                "classes": first["classes"],
                "task_type": first["task_type"],
                "by_seed": by_seed,
                "fixed": row["fixed"],
            }
        rows.append(row)
    return rows, aligned


def _paired_seeds(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[int]:
    """The seeds a comparison pairs: those both ran, or every seed of the one that varies
    when the other ran once for all seeds (``fixed``)."""
    if a["fixed"] != b["fixed"]:
        return list((b if a["fixed"] else a)["by_seed"])
    return [s for s in a["by_seed"] if s in b["by_seed"]]


def _scores_of(group: Mapping[str, Any], seed: int) -> np.ndarray:
    """A group's scores of ``seed``; a fixed group's one run stands for every seed."""
    if group["fixed"]:
        return next(iter(group["by_seed"].values()))
    return group["by_seed"][seed]


def build_comparisons(
    rows: Sequence[Mapping[str, Any]],
    aligned: Mapping[tuple, Mapping[str, Any]],
    encoders: Sequence[str],
    tasks: Mapping[str, BenchmarkTask],
    *,
    n_resamples: int,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """The first encoder against each other one, per (task, protocol, fraction), paired by
    image and by seed (seeds both finished)."""
    out = []
    first = encoders[0]
    for row in rows:
        if row["encoder"] != first or row["value"] is None:
            continue
        key_a = (row["task"], first, row["protocol"], row["label_fraction"])
        a = aligned[key_a]
        for other in encoders[1:]:
            key_b = (row["task"], other, row["protocol"], row["label_fraction"])
            if key_b not in aligned:
                continue
            b = aligned[key_b]
            seeds = _paired_seeds(a, b)
            order = _aligned(a, b, f"{row['task']} {other}")
            metric = tasks[row["task"]].metric
            stats = seed_mean_interval(
                [_metric(a, _scores_of(a, s), metric) for s in seeds],
                [a["patients"]] * len(seeds),
                baseline=[_metric(a, _scores_of(b, s)[order], metric) for s in seeds],
                n_resamples=n_resamples,
                seed=seed,
            )
            out.append(
                {
                    "task": row["task"],
                    "a": first,
                    "b": other,
                    "protocol": row["protocol"],
                    "label_fraction": row["label_fraction"],
                    "metric": row["metric"],
                    "diff": stats["value"],
                    "ci95": stats["ci95"],
                    "p": stats["p_value"],
                    "seeds": seeds,
                    "per_seed_diff": stats["per_seed"],
                }
            )
    return out


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def _cell(row: Mapping[str, Any] | None) -> str:
    if row is None:
        return ""
    if row["value"] is None:
        return "skipped" if row["skipped"] else "undefined"
    low, high = row["ci95"] or (None, None)
    interval = f" [{_pct(low)}, {_pct(high)}]" if low is not None else ""
    return f"{_pct(row['value'])}{interval} (n={len(row['seeds'])})"


def _lines(
    rows: Sequence[Mapping[str, Any]], encoders: Sequence[str]
) -> tuple[list[str], list[tuple]]:
    """Header and the (task, protocol, fraction) keys in first-seen order."""
    keys: list[tuple] = []
    for row in rows:
        key = (row["task"], row["protocol"], row["label_fraction"])
        if key not in keys:
            keys.append(key)
    header = ["task", "protocol", "labels", "metric", *encoders, "paper MGLL", "paper CLIP"]
    return header, keys


def format_table(
    rows: Sequence[Mapping[str, Any]],
    encoders: Sequence[str],
    missing: Sequence[Mapping[str, Any]] = (),
    notes: Sequence[str] = (),
) -> str:
    """``table.md``: tasks as rows, encoders as columns (percent, 95% interval, seeds), the
    paper's MGLL and CLIP numbers beside; missing tasks listed below with where to get them,
    and ``notes`` (e.g. what ran once for every seed)."""
    header, keys = _lines(rows, encoders)
    index = {(r["task"], r["protocol"], r["label_fraction"], r["encoder"]): r for r in rows}
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task, protocol, fraction in keys:
        cells = [index.get((task, protocol, fraction, e)) for e in encoders]
        some = next(c for c in cells if c is not None)
        lines.append(
            "| "
            + " | ".join(
                [
                    task,
                    protocol,
                    f"{fraction:g}",
                    some["metric"],
                    *[_cell(c) for c in cells],
                    _pct(some["paper"]),
                    _pct(some["paper_other"].get("CLIP")),
                ]
            )
            + " |"
        )
    for m in missing:  # the paper's row stays in the table, marked as not run here
        paper = m.get("paper") or {}
        numbers = [
            "/".join(
                f"{paper[p][method]:.2f}" if method in paper.get(p, {}) else "-"
                for p in ("probe", "finetune")
            )
            for method in ("MGLL", "CLIP")
        ]
        lines.append(
            "| "
            + " | ".join(
                [m["task"], "not run", "", m.get("metric", ""), *["-" for _ in encoders], *numbers]
            )
            + " |"
        )
    text = "\n".join(lines) + "\n"
    text += f"\nPercent; {INTERVAL}; n = seeds (draws) pooled.\n"
    if missing:
        text += "The paper's numbers of a task not run: linear probe / fine-tune.\n"
    if missing:
        text += "\nNot run:\n\n" + "".join(
            f"- {m['task']}: {m['reason']}; get it: {m['get']}\n" for m in missing
        )
    if notes:
        text += "\nNotes:\n\n" + "".join(f"- {line}\n" for line in notes)
    return text


def format_csv(rows: Sequence[Mapping[str, Any]], encoders: Sequence[str]) -> str:
    """``table.csv``: the table's shape with numbers (fractions) and interval bounds apart."""
    _, keys = _lines(rows, encoders)
    index = {(r["task"], r["protocol"], r["label_fraction"], r["encoder"]): r for r in rows}
    columns = ["task", "protocol", "label_fraction", "metric"]
    for e in encoders:
        columns += [e, f"{e}_ci_low", f"{e}_ci_high", f"{e}_seeds"]
    columns += ["paper_mgll", "paper_clip"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for task, protocol, fraction in keys:
        cells = [index.get((task, protocol, fraction, e)) for e in encoders]
        some = next(c for c in cells if c is not None)
        line: list[Any] = [task, protocol, f"{fraction:g}", some["metric"]]
        for c in cells:
            ci = (c or {}).get("ci95") or ["", ""]
            value = (c or {}).get("value")
            line += ["" if value is None else f"{value:.6f}"]
            line += ["" if v == "" else f"{v:.6f}" for v in ci]
            line += [len(c["seeds"]) if c else 0]
        paper_clip = some["paper_other"].get("CLIP")
        line += [
            "" if some["paper"] is None else f"{some['paper']:.4f}",
            "" if paper_clip is None else f"{paper_clip:.4f}",
        ]
        writer.writerow(line)
    return buffer.getvalue()


def write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically (a reader never sees half a table)."""
    from mgll.io import atomic_write

    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
