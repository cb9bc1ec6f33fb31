"""``mgll probe``: linear probe of a frozen encoder (METHOD.md section 4).

Features (pre-projection, see :mod:`mgll.eval.encoders`) are extracted once per encoder and
dataset and cached (:mod:`mgll.eval.features`). They are standardised with the training split's
mean and standard deviation, then a scikit-learn logistic regression is fitted for each inverse
regularisation strength C of a log grid; the C with the best validation macro AUC (accuracy
when no validation AUC is defined) is kept, and the test split is scored once with it.
Multi-class levels use one multinomial model; multi-label levels one binary model per label.

``--label-fraction 0.01,0.1,1.0`` repeats the probe on seeded patient-level draws of the
training split (validation and test unchanged): label efficiency.
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mgll.eval.data import TaskError

DEFAULT_C_GRID = tuple(float(c) for c in np.logspace(-4, 2, 7))


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
    from mgll.metrics import classification_metrics

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


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mean = train.mean(0, keepdims=True)
    std = train.std(0, keepdims=True) + 1e-6
    return [(a - mean) / std for a in (train, *others)]


def linear_probe(
    encoder: Any,
    data: Any,
    output_dir: str | Path,
    *,
    label_fractions: Sequence[float] = (1.0,),
    seed: int = 0,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    n_resamples: int = 1000,
    cache_dir: str | Path | bool | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    precision: str = "fp32",
    progress: bool = True,
) -> dict[str, Any]:
    """Linear probe of ``encoder`` (an :class:`~mgll.eval.encoders.Encoder` or a spec) on
    ``data`` (:class:`~mgll.eval.data.EvalData`); writes the output folder(s), returns results.

    One fraction: ``output_dir`` holds results.json etc. and the dict is that results.json.
    Several: one sub-folder ``fraction-<f>`` each, ``output_dir/summary.json`` lists them and
    the dict is ``{"fractions": {f: results}}``.
    """
    from mgll.eval.data import label_fraction_rows
    from mgll.eval.encoders import load_encoder
    from mgll.eval.features import extract_features
    from mgll.eval.results import write_classification_outputs, write_json

    if isinstance(encoder, (str, Path)):
        encoder = load_encoder(encoder)
    started = time.perf_counter()
    features = extract_features(
        encoder,
        data.records,
        data.folder,
        batch_size=batch_size,
        num_workers=num_workers,
        cache_dir=cache_dir,
        precision=precision,
        progress=progress,
    )
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
        train_rows = label_fraction_rows(data, fraction, seed)
        train_rows = train_rows[~bad[train_rows]]
        y_train = data.y[train_rows].astype(int)
        if data.task.type != "multilabel" and len(np.unique(y_train.argmax(1))) < 2:
            raise TaskError(
                f"--label-fraction {fraction}: the drawn training images ({len(train_rows)}) "
                "hold a single class; use a larger fraction"
            )
        x_train, x_val, x_test = _standardise(
            features.features[train_rows],
            features.features[rows["val"]],
            features.features[rows["test"]],
        )
        fit_started = time.perf_counter()
        model, selection = select_and_fit(
            x_train,
            y_train,
            x_val,
            data.y[rows["val"]].astype(int),
            data.task.type,
            data.task.classes,
            c_grid=c_grid,
            seed=seed,
        )
        fit_s = time.perf_counter() - fit_started
        folder = out if len(fractions) == 1 else out / f"fraction-{fraction:g}"
        details = {
            "classifier": "scikit-learn LogisticRegression on standardised pre-projection features",
            **selection,
            "label_fraction": fraction,
            "n_train": len(train_rows),
            "n_patients_train": len(set(data.patients(train_rows))),
            "n_val": len(rows["val"]),
            "features_from_cache": features.from_cache,
            "feature_seconds": round(extract_s, 3),
            "fit_seconds": round(fit_s, 3),
        }
        all_results[f"{fraction:g}"] = write_classification_outputs(
            folder,
            data,
            rows["test"],
            model.predict_scores(x_test),
            val_rows=rows["val"],
            val_scores=model.predict_scores(x_val),
            protocol="linear_probe",
            encoder=encoder.describe(),
            details=details,
            seed=seed,
            n_resamples=n_resamples,
            notes=notes,
            progress=progress,
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


def format_metrics(results: dict[str, Any]) -> str:
    """A short Markdown table of the headline metrics of one results dict."""
    lines = ["| metric | value | 95% CI |", "|---|---|---|"]
    for name in (
        "auc_macro",
        "map",
        "accuracy",
        "f1_macro",
        "sensitivity",
        "specificity",
        "kappa_quadratic",
    ):
        if name not in results["metrics"]:
            continue
        value, ci = results["metrics"][name], results["metrics"][f"{name}_ci95"]
        shown = "undefined" if value is None else f"{value:.4f}"
        interval = "" if ci is None else f"[{ci[0]:.4f}, {ci[1]:.4f}]"
        lines.append(f"| {name} | {shown} | {interval} |")
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``probe`` sub-command."""
    from mgll.eval.cli import add_run_arguments, add_task_arguments

    parser = subparsers.add_parser(
        "probe",
        help="linear probe of a frozen image encoder",
        description="Linear probe: cached frozen features, logistic regression with C chosen "
        "on validation, test metrics with patient-bootstrap 95% CIs (docs/evaluation.md).",
    )
    parser.add_argument(
        "--encoder",
        required=True,
        help="run folder/checkpoint, exported encoder, open_clip:ARCH:TAG, hf-hub:ORG/REPO or "
        "random:ARCH[:SEED]",
    )
    add_task_arguments(parser)
    add_run_arguments(parser)
    parser.add_argument(
        "--label-fraction",
        default="1.0",
        metavar="F[,F...]",
        help="fractions of the training patients to fit on, e.g. 0.01,0.1,1.0 (default 1.0)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``mgll probe``."""
    from mgll.eval.cli import run_safely

    def body() -> int:
        from mgll.eval.cli import load_task, resolve_device, run_options
        from mgll.eval.encoders import load_encoder

        try:
            fractions = [float(f) for f in args.label_fraction.split(",") if f.strip()]
        except ValueError:
            raise TaskError(f"--label-fraction: {args.label_fraction!r} is not numbers") from None
        encoder = load_encoder(args.encoder, resolve_device(args.device))
        data = load_task(args, encoder.run_config)
        results = linear_probe(
            encoder,
            data,
            args.output_dir,
            label_fractions=fractions,
            **run_options(args),
        )
        for fraction, result in results.get("fractions", {"1": results}).items():
            if "fractions" in results:
                print(f"label fraction {fraction}:")
            print(format_metrics(result))
        print(f"wrote {args.output_dir}")
        return 0

    return run_safely("probe", body)
