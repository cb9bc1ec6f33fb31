"""The demo's phases in order: folds, pretraining, evaluation, summary (see :mod:`mgll.demo`).

Each phase lives in its own module: :mod:`~mgll.demo.settings` (what a run is),
:mod:`~mgll.demo.folds` (records, folds, pretraining runs), :mod:`~mgll.demo.evaluation`
(through :mod:`mgll.eval`), :mod:`~mgll.demo.summary` (table and comparisons),
:mod:`~mgll.demo.progress` and :mod:`~mgll.demo.report`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mgll.demo.evaluation import RETRIEVAL_HEADLINE, RETRIEVAL_KS, evaluate_encoder, evaluated
from mgll.demo.folds import (
    classification_levels,
    load_demo_records,
    patient_folds,
    pretrain_folds,
    write_folds,
)
from mgll.demo.progress import Progress
from mgll.demo.settings import (
    C_GRID,
    ENCODERS,
    PRETRAINED,
    RECIPES,
    SUMMARY_FILE,
    Demo,
    DemoError,
    check_settings,
)
from mgll.demo.summary import compare_encoders, format_table, table_rows, without_split


def run_demo(
    data_root: str | Path,
    output_dir: str | Path,
    *,
    dataset: str = "csdi-fundus",
    quick: bool = False,
    seed: int = 0,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or resume) the demo and return the summary written to ``OUT/summary.json``."""
    from mgll.demo.report import write_demo_report
    from mgll.eval.probe import INNER_FOLDS
    from mgll.io import atomic_write
    from mgll.training.trainer import SUMMARY_FILE as RUN_SUMMARY

    if dataset not in RECIPES:
        raise DemoError(f"--dataset {dataset!r}: choose one of {', '.join(RECIPES)}")
    demo = Demo(RECIPES[dataset], Path(data_root), Path(output_dir), quick, seed)
    if not demo.folder.is_dir():
        raise DemoError(f"{demo.folder} does not exist; --data-root must hold the {dataset} folder")
    started = time.perf_counter()
    check_settings(demo)

    records = load_demo_records(demo.folder)
    fold = patient_folds(records, demo.recipe.main_level, demo.folds, seed)
    write_folds(demo, records, fold)
    levels = classification_levels(records)
    text_level = records.levels[-1].name
    progress = Progress(
        runs=sum(  # a resumed demo redoes none
            not (demo.run_dir(e, k) / RUN_SUMMARY).is_file()
            for e in PRETRAINED
            for k in range(demo.folds)
        ),
        evaluations=sum(not evaluated(demo, e, records, levels) for e in ENCODERS),
        first_guess_s=20.0 if quick else 100.0,
        echo=echo,
        start=started,
    )
    echo(
        f"mgll demo: {dataset}, {len(records.records)} images of "
        f"{len({r.patient_id for r in records.records})} patient groups, {demo.folds}-fold "
        f"patient cross-validation, levels probed: {', '.join(levels)}"
        + (" (--quick: a smoke run, not a measurement)" if quick else "")
    )
    pretrain_s = pretrain_folds(demo, PRETRAINED, progress)

    table: list[dict[str, Any]] = []
    for encoder in ENCODERS:
        progress.say(
            "evaluate", f"{encoder}: linear probe, zero-shot and retrieval, pooled over folds"
        )
        t0 = time.perf_counter()
        if evaluate_encoder(demo, encoder, records, fold, levels):
            progress.done("eval", time.perf_counter() - t0)
        table.extend(table_rows(demo, encoder, levels, text_level))

    progress.say("compare", "paired patient bootstrap")
    comparisons = compare_encoders(demo, levels, text_level)
    summary = {
        "dataset": dataset,
        "config": without_split(demo.config("mgll", 0).to_dict()),
        "settings": demo.settings(),
        "protocol": {
            "split": f"patient-level stratified {demo.folds}-fold cross-validation "
            "(StratifiedGroupKFold on the main level, patients joined across identical "
            "image files); each encoder pretrained once per fold on its training patients; "
            "held-out predictions pooled",
            "main_level": demo.recipe.main_level,
            "n_images": len(records.records),
            "n_patient_groups": len({r.patient_id for r in records.records}),
            "probe": "standardised pre-projection features, scikit-learn LogisticRegression; C "
            f"in {list(C_GRID)} by macro AUC over {INNER_FOLDS}-fold patient CV inside the "
            "fold's training patients",
            "retrieval": f"image -> text within each fold's held-out images: the distinct "
            f"{text_level} texts of those images are the gallery, ranked by "
            "cosine similarity with the fold's model; R@K (own text in the top K) and label-aware "
            f"P@K (top K texts of images with the same {demo.recipe.main_level}) for K in "
            f"{list(RETRIEVAL_KS)}, pooled over folds; headline comparisons "
            f"{', '.join(RETRIEVAL_HEADLINE)} (chosen before measuring); read against a random "
            "ranking and the best image-blind ranking (the texts most images carry first)",
            "bootstrap": f"{demo.resamples} patient-group resamples, paired for differences",
        },
        "table": table,
        "comparisons": comparisons,
        "pretrain_seconds": pretrain_s,
        "seconds": time.perf_counter() - started,
    }
    text = json.dumps(summary, indent=2) + "\n"
    atomic_write(demo.out / SUMMARY_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    echo(format_table(summary))
    report = write_demo_report(demo, records, summary)
    echo(f"report: {report}")
    return summary
