"""``mgll probe``: linear probe of a frozen encoder (METHOD.md section 4).

Features (pre-projection, see :mod:`mgll.eval.encoders`) are extracted once per encoder and
dataset and cached (:mod:`mgll.eval.features`). They are standardised with the training split's
mean and standard deviation, then a scikit-learn logistic regression is fitted for each inverse
regularisation strength C of a log grid; the C with the best validation macro AUC (accuracy
when no validation AUC is defined) is kept, and the test split is scored once with it.
Multi-class levels use one multinomial model; multi-label levels one binary model per label.

``--label-fraction 0.01,0.1,1.0`` repeats the probe on seeded patient-level draws of the
training split (validation and test unchanged): label efficiency.

:func:`fit_probe` is the core every caller shares; without a validation split (the demo's
cross-validation folds) its ``selection="cv"`` chooses C by an inner patient-grouped CV of the
training rows instead.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mgll.eval import features as feature_store
from mgll.eval.encoders import Encoder, load_encoder
from mgll.eval.options import DEFAULT_OPTIONS, EvalOptions, resolve_device
from mgll.eval.results import write_classification_outputs, write_json
from mgll.eval.task import EvalData, TaskError, check_scorable, label_fraction_rows
from mgll.metrics import classification_metrics

DEFAULT_C_GRID = tuple(float(c) for c in np.logspace(-4, 2, 7))
INNER_FOLDS = 3  # the cross-validated selection's inner folds


class LinearClassifier:
    """Logistic regression(s) for a task type, refitted warm over an increasing C grid.

    Binary / multi-class: one multinomial model; multi-label: one binary model per label (a
    label with one value in training scores that value). ``warm_start`` makes each fit start
    from the previous C's solution, which is what keeps a C sweep on 10,000 vectors fast.
    """

    def __init__(self, task_type: str, n_classes: int, seed: int = 0) -> None:
        self.task_type, self.n_classes, self.seed = task_type, n_classes, seed
        self.models: list[Any] = []

    def _new(self) -> Any:
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(max_iter=1000, warm_start=True, random_state=self.seed)

    def fit(self, x: np.ndarray, y: np.ndarray, c: float) -> LinearClassifier:
        """Fit with inverse regularisation ``c`` on features ``x`` and label rows ``y``."""
        from sklearn.exceptions import ConvergenceWarning

        targets = (
            [y[:, k] for k in range(self.n_classes)]
            if self.task_type == "multilabel"
            else [y.argmax(1)]
        )
        if not self.models:
            self.models = [
                float(t[0])
                if self.task_type == "multilabel" and t.min() == t.max()
                else self._new()
                for t in targets
            ]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            for model, target in zip(self.models, targets, strict=True):
                if not isinstance(model, float):
                    model.set_params(C=c).fit(x, target)
        return self

    def predict_scores(self, x: np.ndarray) -> np.ndarray:
        """(N, C) class probabilities (multi-class) or per-label probabilities."""
        if self.task_type != "multilabel":
            model = self.models[0]
            out = np.zeros((len(x), self.n_classes))
            out[:, model.classes_] = model.predict_proba(x)  # unseen classes score 0
            return out
        columns = [
            np.full(len(x), m) if isinstance(m, float) else m.predict_proba(x)[:, 1]
            for m in self.models
        ]
        return np.stack(columns, axis=1)


def select_and_fit(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    task_type: str,
    classes: Sequence[str],
    *,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    seed: int = 0,
) -> tuple[Any, dict[str, Any]]:
    """Fit one classifier per C, keep the best on validation; returns it and the sweep."""
    present = [k for k in range(y_val.shape[1]) if 0 < y_val[:, k].sum() < len(y_val)]
    best, best_key, sweep = None, None, []
    model = LinearClassifier(task_type, y_train.shape[1], seed)
    for c in sorted(c_grid):
        model.fit(x_train, y_train, c)
        m = classification_metrics(
            y_val, model.predict_scores(x_val), task_type, classes=classes, macro_classes=present
        )
        auc = m["auc_macro"] if present else float("nan")
        key = (np.nan_to_num(auc, nan=-1.0), m["accuracy"])
        sweep.append(
            {"C": c, "val_auc_macro": None if np.isnan(auc) else auc, "val_accuracy": m["accuracy"]}
        )
        if best_key is None or key > best_key:
            best, best_key, chosen = copy.deepcopy(model), key, c
    criterion = "validation macro AUC" if present else "validation accuracy"
    return best, {"C": chosen, "criterion": criterion, "sweep": sweep}


def cross_validated_c(
    x: np.ndarray,
    y: np.ndarray,
    groups: Sequence[str],
    task_type: str,
    classes: Sequence[str],
    *,
    c_grid: Sequence[float],
    seed: int = 0,
) -> tuple[float, list[dict[str, Any]]]:
    """The C of ``c_grid`` with the best mean macro AUC over a :data:`INNER_FOLDS`-fold inner
    CV of the (standardised) training vectors ``x`` that keeps each patient (``groups``) on one
    side; stratified on the class for single-label tasks. Returns C and the sweep."""
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    groups = np.asarray(groups)
    if task_type == "multilabel":
        inner = list(GroupKFold(n_splits=INNER_FOLDS).split(x, None, groups))
    else:
        splitter = StratifiedGroupKFold(n_splits=INNER_FOLDS, shuffle=True, random_state=seed)
        inner = list(splitter.split(x, y.argmax(1), groups))
    best_c, best_auc, sweep = c_grid[0], -math.inf, []
    for c in c_grid:
        aucs = []
        for fit_rows, val_rows in inner:
            model = LinearClassifier(task_type, y.shape[1], seed).fit(x[fit_rows], y[fit_rows], c)
            yv = y[val_rows]
            present = [j for j in range(yv.shape[1]) if 0 < yv[:, j].sum() < len(yv)]
            if not present:
                continue
            m = classification_metrics(
                yv,
                model.predict_scores(x[val_rows]),
                task_type,
                classes=classes,
                macro_classes=present,
            )
            aucs.append(m["auc_macro"])
        auc = float(np.nanmean(aucs)) if aucs else -math.inf
        sweep.append({"C": c, "cv_auc_macro": None if not np.isfinite(auc) else auc})
        if auc > best_auc:
            best_c, best_auc = c, auc
    return float(best_c), sweep


@dataclass
class FittedProbe:
    """A fitted probe: the training rows' standardisation, the classifier and how its C was
    chosen (``selection``: C, criterion, sweep)."""

    mean: np.ndarray
    std: np.ndarray
    classifier: LinearClassifier
    selection: dict[str, Any]

    def scores(self, features: np.ndarray) -> np.ndarray:
        """(N, C) class scores of raw (unstandardised) feature vectors."""
        return self.classifier.predict_scores((features - self.mean) / self.std)


def fit_probe(
    features: np.ndarray,
    data: EvalData,
    train_rows: np.ndarray,
    *,
    val_rows: np.ndarray | None = None,
    selection: str = "validation",
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    seed: int = 0,
) -> FittedProbe:
    """Fit the linear probe of ``data``'s task on ``features[train_rows]``, standardised with
    those rows' mean and standard deviation (never any other rows').

    ``selection="validation"``: C by macro AUC (then accuracy) on ``val_rows``, one warm
    sweep over the grid (``mgll probe``). ``selection="cv"``: C by mean macro AUC over an
    inner patient-grouped CV of the training rows, then one fit on all of them (the demo,
    whose folds have no validation part).
    """
    x = features[train_rows]
    mean = x.mean(0, keepdims=True)
    std = x.std(0, keepdims=True) + 1e-6
    x = (x - mean) / std
    y = data.y[train_rows].astype(int)
    task = data.task
    if selection == "validation":
        if val_rows is None or len(val_rows) == 0:
            raise ValueError("selection='validation' needs validation rows")
        model, chosen = select_and_fit(
            x,
            y,
            (features[val_rows] - mean) / std,
            data.y[val_rows].astype(int),
            task.type,
            task.classes,
            c_grid=c_grid,
            seed=seed,
        )
    elif selection == "cv":
        c, sweep = cross_validated_c(
            x, y, data.patients(train_rows), task.type, task.classes, c_grid=c_grid, seed=seed
        )
        model = LinearClassifier(task.type, y.shape[1], seed).fit(x, y, c)
        criterion = f"macro AUC, {INNER_FOLDS}-fold patient CV in training"
        chosen = {"C": c, "criterion": criterion, "sweep": sweep}
    else:
        raise ValueError(f"selection {selection!r}: choose 'validation' or 'cv'")
    return FittedProbe(mean, std, model, chosen)


def linear_probe(
    encoder: Encoder,
    data: EvalData,
    output_dir: str | Path,
    options: EvalOptions = DEFAULT_OPTIONS,
    *,
    label_fractions: Sequence[float] = (1.0,),
    c_grid: Sequence[float] = DEFAULT_C_GRID,
) -> dict[str, Any]:
    """Linear probe of ``encoder`` (an :class:`~mgll.eval.encoders.Encoder` or a spec) on
    ``data`` (:class:`~mgll.eval.task.EvalData`); writes the output folder(s), returns results.

    One fraction: ``output_dir`` holds results.json etc. and the dict is that results.json.
    Several: one sub-folder ``fraction-<f>`` each, ``output_dir/summary.json`` lists them and
    the dict is ``{"fractions": {f: results}}``.
    """
    check_scorable(data)
    if isinstance(encoder, (str, Path)):
        encoder = load_encoder(encoder, resolve_device(options.device))
    started = time.perf_counter()
    features = feature_store.extract_features(encoder, data.records, data.folder, options)
    extract_s = time.perf_counter() - started
    notes = []
    bad = features.unreadable
    if bad.any():
        notes.append(f"{int(bad.sum())} unreadable image(s) left out")
    rows = {name: r[~bad[r]] for name, r in data.rows.items()}
    if len(rows["val"]) == 0:
        raise TaskError(
            "the validation split is empty: the probe chooses its regularisation on it; "
            "use a split with a validation part (--split patient --split-fractions 0.7,0.1,0.2)"
        )
    out = Path(output_dir)
    fractions = [float(f) for f in label_fractions]
    all_results: dict[str, Any] = {}
    for fraction in fractions:
        folder = out if len(fractions) == 1 else out / f"fraction-{fraction:g}"
        all_results[f"{fraction:g}"] = _probe_fraction(
            encoder, data, features, rows, fraction, folder, options, c_grid, notes, extract_s
        )
    if len(fractions) == 1:
        return next(iter(all_results.values()))
    summary = {
        "protocol": "linear_probe",
        "encoder": encoder.describe(),
        "fractions": {
            f: {
                "folder": f"fraction-{f}",
                "n_train": r["details"]["n_train"],
                "auc_macro": r["metrics"]["auc_macro"],
                "auc_macro_ci95": r["metrics"]["auc_macro_ci95"],
            }
            for f, r in all_results.items()
        },
    }
    write_json(out / "summary.json", summary)
    return {"fractions": all_results}


def _probe_fraction(
    encoder: Encoder,
    data: EvalData,
    features: Any,
    rows: dict[str, np.ndarray],
    fraction: float,
    folder: Path,
    options: EvalOptions,
    c_grid: Sequence[float],
    notes: list[str],
    extract_s: float,
) -> dict[str, Any]:
    """One label fraction: draw its training images, fit the probe, write ``folder``."""
    seed = options.seed
    bad = features.unreadable
    train_rows = label_fraction_rows(data, fraction, seed)
    train_rows = train_rows[~bad[train_rows]]
    y_train = data.y[train_rows].astype(int)
    if data.task.type != "multilabel" and len(np.unique(y_train.argmax(1))) < 2:
        raise TaskError(
            f"--label-fraction {fraction}: the drawn training images ({len(train_rows)}) "
            "hold a single class; use a larger fraction"
        )
    fit_started = time.perf_counter()
    probe = fit_probe(
        features.features, data, train_rows, val_rows=rows["val"], c_grid=c_grid, seed=seed
    )
    fit_s = time.perf_counter() - fit_started
    details = {
        "classifier": "scikit-learn LogisticRegression on standardised pre-projection features",
        **probe.selection,
        "label_fraction": fraction,
        "n_train": len(train_rows),
        "n_patients_train": len(set(data.patients(train_rows))),
        "n_val": len(rows["val"]),
        "features_from_cache": features.from_cache,
        "feature_seconds": round(extract_s, 3),
        "fit_seconds": round(fit_s, 3),
    }
    return write_classification_outputs(
        folder,
        data,
        rows["test"],
        probe.scores(features.features[rows["test"]]),
        val_rows=rows["val"],
        val_scores=probe.scores(features.features[rows["val"]]),
        protocol="linear_probe",
        encoder=encoder.describe(),
        details=details,
        seed=seed,
        n_resamples=options.n_resamples,
        notes=notes,
        progress=options.progress,
    )
