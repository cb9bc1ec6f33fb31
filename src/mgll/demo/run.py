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

from mgll.data.records import RecordSet
from mgll.demo.evaluation import RETRIEVAL_HEADLINE, RETRIEVAL_KS, evaluate_encoder, evaluated
from mgll.demo.folds import (
    check_main_level,
    classification_levels,
    level_kinds,
    patient_folds,
    pretrain_folds,
    retrieval_level,
    write_folds,
)
from mgll.demo.progress import Progress
from mgll.demo.recipes import STARTS
from mgll.demo.report import write_demo_report
from mgll.demo.seeds import across_seeds, format_seeds
from mgll.demo.settings import (
    C_GRID,
    DEFAULT_SEEDS,
    PRETRAINED,
    SUMMARY_FILE,
    Demo,
    DemoError,
    Recipe,
    check_settings,
    fold_count,
    recipe_for,
    recipe_records,
)
from mgll.demo.summary import compare_encoders, format_table, table_rows, without_split
from mgll.eval.probe import INNER_FOLDS
from mgll.io import atomic_write
from mgll.training.trainer import SUMMARY_FILE as RUN_SUMMARY


def run_demo(
    data_root: str | Path,
    output_dir: str | Path,
    *,
    dataset: str | None = None,
    level: str | None = None,
    quick: bool = False,
    seed: int = 0,
    seeds: int | None = None,
    start: str = "scratch",
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or resume) the demo and return the summary written to ``OUT/summary.json``.

    ``dataset``: a shipped recipe, a dataset folder, a format name or a spec file (``--data``),
    ``level`` its main level, ``start`` where the encoders start (:data:`STARTS`). ``seeds``
    (default 3, 1 with ``quick``) seeds from ``seed`` on: one seed writes the single-seed
    layout into ``OUT``; several write one such folder per seed (``OUT/seed<s>``) and the
    summary over seeds (:mod:`mgll.demo.seeds`).
    """
    recipe = recipe_for(dataset, level, Path(data_root))
    n_seeds = seeds if seeds is not None else (1 if quick else DEFAULT_SEEDS)
    if start not in STARTS:
        raise DemoError(f"--from {start}: choose one of {', '.join(STARTS)}")
    if seed < 0 or n_seeds < 1:
        raise DemoError(f"--seed {seed} --seeds {n_seeds}: the seed must be >= 0, seeds >= 1")
    folder = Path(data_root) / recipe.dataset
    if not folder.is_dir():
        raise DemoError(
            f"{folder} does not exist; --data-root must hold the {recipe.dataset} folder"
        )
    records = recipe_records(recipe, Path(data_root))
    names = [lv.name for lv in records.levels]
    if recipe.main_level not in names:  # before anything is written
        raise DemoError(f"--level {recipe.main_level!r}: the data's levels are {names}")
    check_main_level(records, recipe.main_level, fold_count(recipe, quick))
    out = Path(output_dir)
    if n_seeds == 1:
        return run_seed(Demo(recipe, Path(data_root), out, quick, seed, start), echo)
    seeds_run = list(range(seed, seed + n_seeds))
    return run_seeds(recipe, Path(data_root), out, quick, seeds_run, echo, start)


def run_seeds(
    recipe: Recipe,
    data_root: Path,
    out: Path,
    quick: bool,
    seeds: list[int],
    echo: Callable[[str], None],
    start: str = "scratch",
) -> dict[str, Any]:
    """One single-seed demo per seed in ``OUT/seed<s>``, then ``OUT/summary.json`` over seeds."""
    started = time.perf_counter()
    demos = [Demo(recipe, data_root, out / f"seed{s}", quick, s, start) for s in seeds]
    settings = {**demos[0].settings(), "seed": None, "seeds": seeds}
    check_settings(demos[0], out, settings)
    runs = []
    for demo in demos:
        echo(f"== seed {demo.seed} ({len(runs) + 1} of {len(seeds)}) -> {demo.out}")
        runs.append(run_seed(demo, echo))
    first = runs[0]
    levels = sorted({r["level"] for r in first["table"] if r["protocol"] != "retrieval"})
    text_level = next(r["level"] for r in first["table"] if r["protocol"] == "retrieval")
    echo("[seeds] bootstrap over seeds and patients")
    table, comparisons = across_seeds(
        [d.out for d in demos],
        levels,
        text_level,
        encoders=demos[0].encoders,
        pairs=demos[0].comparisons,
        n_resamples=demos[0].resamples,
    )
    summary = {
        "dataset": first["dataset"],
        "settings": settings,
        "protocol": {
            **first["protocol"],
            "seeds": "each seed a complete demo (its own folds, initialisation and data order) "
            "in OUT/seed<s>; values are means over seeds; intervals a bootstrap over seeds and, "
            "within each drawn seed, its patient groups (mgll.demo.seeds)",
        },
        "per_seed": [
            {
                "seed": d.seed,
                "folder": d.out.name,
                "table": r["table"],
                "comparisons": r["comparisons"],
            }
            for d, r in zip(demos, runs, strict=True)
        ],
        "table": table,
        "comparisons": comparisons,
        "seconds": time.perf_counter() - started,
    }
    text = json.dumps(summary, indent=2) + "\n"
    atomic_write(out / SUMMARY_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    echo(format_seeds(summary))
    return summary


def run_seed(demo: Demo, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """The single-seed demo: folds, pretraining, evaluation and summary in ``demo.out``."""
    seed, quick, dataset = demo.seed, demo.quick, demo.recipe.dataset
    started = time.perf_counter()
    check_settings(demo)

    records = recipe_records(demo.recipe, demo.data_root)
    fold = patient_folds(records, demo.recipe.main_level, demo.folds, seed)
    write_folds(demo, records, fold)
    levels = classification_levels(records, demo.folds)
    text_level = retrieval_level(records, demo.folds)
    progress = Progress(
        runs=sum(  # a resumed demo redoes none
            not (demo.run_dir(e, k) / RUN_SUMMARY).is_file()
            for e in PRETRAINED
            for k in range(demo.folds)
        ),
        evaluations=[  # per encoder: features and retrieval, then each level's probe
            kind
            for e in demo.encoders
            if not evaluated(demo, e, records, levels)
            for kind in ("retrieval", *levels)
        ],
        echo=echo,
        start=started,
    )
    echo(
        f"mgll demo: {dataset}, {len(records.records)} images of "
        f"{len({r.patient_id for r in records.records})} patient groups, {demo.folds}-fold "
        f"patient cross-validation; {_levels_line(records, demo.folds, text_level)}"
        + (" (--quick: a smoke run, not a measurement)" if quick else "")
    )
    pretrain_s = pretrain_folds(demo, PRETRAINED, progress)

    table: list[dict[str, Any]] = []
    for encoder in demo.encoders:
        evaluate_encoder(demo, encoder, records, fold, levels, progress)
        table.extend(table_rows(demo, encoder, levels, text_level))

    progress.say("compare", "paired patient bootstrap")
    comparisons = compare_encoders(demo, levels, text_level)
    summary = {
        "dataset": dataset,
        "config": without_split(demo.config("mgll", 0).to_dict()),
        "settings": demo.settings(),
        "protocol": _protocol(demo, records, text_level),
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


def _levels_line(records: RecordSet, folds: int, text_level: str) -> str:
    """Which levels the demo probes, which it retrieves and which it leaves, and why."""
    kinds = level_kinds(records, folds)
    probed = [name for name, kind in kinds.items() if kind == "label"]
    line = f"probed (linear probe, zero-shot): {', '.join(probed)}; retrieved (image -> text): "
    line += f"{text_level}" + (" (free text)" if kinds[text_level] == "text" else "")
    left = [
        f"{name} ({'free text' if kind == 'text' else 'a single class'})"
        for name, kind in kinds.items()
        if kind != "label" and name != text_level
    ]
    return line + (f"; not scored: {', '.join(left)}" if left else "")


def _protocol(demo: Demo, records: RecordSet, text_level: str) -> dict[str, Any]:
    """How the single-seed demo measured (summary.json's ``protocol``)."""
    return {
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
    }
