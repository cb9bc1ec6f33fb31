"""The output folder every classification protocol writes, and reading it back.

``OUT/results.json`` (schema in docs/evaluation.md), ``OUT/predictions.csv`` (one row per
test image: image, patient, then ``label:<class>`` and ``score:<class>`` per class),
``OUT/split.csv`` (the split used), ``OUT/roc.png`` and ``OUT/confusion.png``. Every file is
written atomically, results.json last, so a folder with a results.json is complete.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mgll.errors import UserError
from mgll.eval.task import EvalData
from mgll.io import atomic_write
from mgll.metrics import (
    DEFAULT_RESAMPLES,
    HEADLINE,
    bootstrap_metrics,
    summarize,
    youden_thresholds,
)

RESULTS_VERSION = 1
RESULTS_FILE = "results.json"
PREDICTIONS_FILE = "predictions.csv"


class ResultsError(UserError, ValueError):
    """An output folder that cannot be read back (the message names the file)."""


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` as indented JSON, atomically."""
    text = json.dumps(payload, indent=2) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_predictions(
    path: Path,
    images: Sequence[str],
    patients: Sequence[str],
    classes: Sequence[str],
    y: np.ndarray,
    scores: np.ndarray,
) -> None:
    """predictions.csv: image, patient, label:<class>..., score:<class>..."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        ["image", "patient", *(f"label:{c}" for c in classes), *(f"score:{c}" for c in classes)]
    )
    for i, image in enumerate(images):
        writer.writerow(
            [
                image,
                patients[i],
                *(int(v) for v in y[i]),
                *(f"{float(v):.8g}" for v in scores[i]),
            ]
        )
    atomic_write(path, lambda tmp: tmp.write_text(buffer.getvalue(), encoding="utf-8"))


def read_predictions(folder: str | Path) -> dict[str, Any]:
    """A results folder's predictions: images, patients, classes, y (N, C), scores (N, C)."""
    path = Path(folder) / PREDICTIONS_FILE
    if not path.is_file():
        raise ResultsError(f"{path}: missing; is {folder} an output folder of mgll probe/...?")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or header[:2] != ["image", "patient"]:
            raise ResultsError(f"{path}: the header must start with image,patient")
        classes = [h[len("label:") :] for h in header if h.startswith("label:")]
        if not classes:
            raise ResultsError(f"{path}: no label:<class> columns; is it a predictions file?")
        if [h for h in header if h.startswith("score:")] != [f"score:{c}" for c in classes]:
            raise ResultsError(f"{path}: label:/score: columns do not match")
        rows = list(reader)
    n = len(classes)
    return {
        "images": [r[0] for r in rows],
        "patients": [r[1] for r in rows],
        "classes": classes,
        "y": np.array([[int(v) for v in r[2 : 2 + n]] for r in rows], dtype=np.int8).reshape(-1, n),
        "scores": np.array([[float(v) for v in r[2 + n :]] for r in rows]).reshape(-1, n),
    }


def read_results(folder: str | Path) -> dict[str, Any]:
    """A folder's results.json."""
    path = Path(folder) / RESULTS_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultsError(f"{path}: missing; is {folder} an mgll evaluation output?") from None
    except json.JSONDecodeError as error:
        raise ResultsError(f"{path}: not valid JSON ({error})") from None


def plot_roc(path: Path, y: np.ndarray, scores: np.ndarray, classes: Sequence[str]) -> None:
    """ROC curve of every class with both positives and negatives (one PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for c, name in enumerate(classes):
        if 0 < y[:, c].sum() < len(y):
            fpr, tpr, _ = roc_curve(y[:, c], scores[:, c])
            auc = roc_auc_score(y[:, c], scores[:, c])
            ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC (test)")
    ax.legend(fontsize="small", loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def plot_confusion(
    path: Path,
    y: np.ndarray,
    scores: np.ndarray,
    classes: Sequence[str],
    task_type: str,
    thresholds: Sequence[float],
) -> None:
    """Confusion matrix (arg-max class) or, multi-label, per-label TP/FN/FP/TN counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if task_type == "multilabel":
        decided = scores >= np.asarray(thresholds)[None, :]
        truth = y == 1
        matrix = np.stack(
            [
                (truth & decided).sum(0),
                (truth & ~decided).sum(0),
                (~truth & decided).sum(0),
                (~truth & ~decided).sum(0),
            ],
            axis=1,
        )
        rows, cols, xlabel, ylabel = list(classes), ["TP", "FN", "FP", "TN"], "", "label"
    else:
        truth, predicted = y.argmax(1), scores.argmax(1)
        k = len(classes)
        matrix = np.bincount(truth * k + predicted, minlength=k * k).reshape(k, k)
        rows, cols, xlabel, ylabel = list(classes), list(classes), "predicted", "true"
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(cols), 1.0 + 0.5 * len(rows)))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(int(value)), ha="center", va="center", fontsize="small")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize="small")
    ax.set_yticks(range(len(rows)), rows, fontsize="small")
    ax.set(xlabel=xlabel, ylabel=ylabel, title="test")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def _validation_thresholds(
    data: EvalData, val_rows: np.ndarray | None, val_scores: np.ndarray | None, notes: list[str]
) -> list[float]:
    """Per class, the Youden threshold on the validation predictions (0.5 where validation
    cannot choose one, said in ``notes``)."""
    task = data.task
    if val_rows is not None and val_scores is not None and len(val_rows):
        chosen = youden_thresholds(data.y[val_rows].astype(int), val_scores)
    else:
        chosen = [None] * len(task.classes)
        notes.append("no validation predictions: thresholds are 0.5")
    for name, t in zip(task.classes, chosen, strict=True):
        if t is None and val_rows is not None and len(val_rows):
            notes.append(f"threshold of {name}: 0.5 (validation lacks positives or negatives)")
    return [0.5 if t is None else float(t) for t in chosen]


def write_classification_outputs(
    output_dir: str | Path,
    data: EvalData,
    test_rows: np.ndarray,
    test_scores: np.ndarray,
    *,
    val_rows: np.ndarray | None,
    val_scores: np.ndarray | None,
    protocol: str,
    encoder: Mapping[str, Any],
    details: Mapping[str, Any],
    seed: int = 0,
    n_resamples: int = DEFAULT_RESAMPLES,
    notes: Sequence[str] = (),
    progress: bool = True,
) -> dict[str, Any]:
    """Score the test predictions, write the output folder and return results.json's dict.

    Thresholds for sensitivity/specificity (and multi-label decisions) are chosen on the
    validation predictions by Youden's J; a class without both labels in validation gets 0.5
    (reported in the notes).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    task = data.task
    y_test = data.y[test_rows].astype(int)
    notes = list(notes)
    thresholds = _validation_thresholds(data, val_rows, val_scores, notes)
    patients = data.patients(test_rows)
    stats = bootstrap_metrics(
        y_test,
        test_scores,
        patients,
        task.type,
        classes=task.classes,
        thresholds=thresholds,
        ordinal=task.ordinal,
        n_resamples=n_resamples,
        seed=seed,
        progress=progress,
    )
    metrics, per_class, metric_notes = summarize(stats, task.classes, task.type)
    for c, name in enumerate(task.classes):
        per_class[name]["n_pos"] = int(y_test[:, c].sum())
        per_class[name]["threshold"] = thresholds[c]
        if per_class[name]["n_pos"] == 0:
            notes.append(f"class {name!r} is absent from the test split")
    images = data.image_ids(test_rows)
    write_predictions(
        out / PREDICTIONS_FILE,
        images,
        data.patient_ids(test_rows),
        task.classes,
        y_test,
        test_scores,
    )
    data.write_split(out / "split.csv")
    plot_roc(out / "roc.png", y_test, test_scores, task.classes)
    plot_confusion(out / "confusion.png", y_test, test_scores, task.classes, task.type, thresholds)
    results = {
        "version": RESULTS_VERSION,
        "task": {"data": data.source, **task.describe()},
        "encoder": dict(encoder),
        "protocol": protocol,
        "n_test": len(test_rows),
        "n_patients_test": len(set(patients)),
        "metrics": metrics,
        "per_class": per_class,
        "thresholds": dict(zip(task.classes, thresholds, strict=True)),
        "bootstrap": {"unit": "patient", "resamples": n_resamples, "seed": seed},
        "details": dict(details),
        "split": {**data.split_info, "file": "split.csv"},
        "seed": seed,
        "notes": notes + metric_notes,
    }
    write_json(out / RESULTS_FILE, results)
    return results


def format_metrics(results: dict[str, Any]) -> str:
    """A short Markdown table of the headline metrics of one results dict."""
    lines = ["| metric | value | 95% CI |", "|---|---|---|"]
    for name in HEADLINE:
        if name not in results["metrics"]:
            continue
        value, ci = results["metrics"][name], results["metrics"][f"{name}_ci95"]
        shown = "undefined" if value is None else f"{value:.4f}"
        interval = "" if ci is None else f"[{ci[0]:.4f}, {ci[1]:.4f}]"
        lines.append(f"| {name} | {shown} | {interval} |")
    return "\n".join(lines)
