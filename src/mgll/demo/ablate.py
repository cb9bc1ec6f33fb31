"""``mgll ablate``: the paper's ablation on the demo's data, several seeds, one table.

Variants (each pretrained with the demo's recipe, tower, data order and step budget):

- the loss terms: CLIP (one joined caption per image), point-wise only, soft CLIP only, soft
  CLIP + point-wise, all three (MGLL);
- the number of granularity levels: MGLL on the first 1, ..., G - 1 levels (G is ``mgll``);
- missing labels: MGLL with 30% of the finest level's training labels dropped at random.

For every seed the patients are split anew (patient-level stratified K-fold on the main
level); each variant is pretrained once per fold on that fold's training patients and
evaluated by the demo's linear probe, held-out predictions pooled. The table gives the mean and
standard deviation over seeds of the pooled macro AUC of the main level. Re-running the same
command resumes: finished pretraining runs and evaluations are kept.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mgll.data.build import prepare_data
from mgll.data.records import RecordSet
from mgll.demo.folds import fold_task, patient_folds, pretrain_run, write_folds
from mgll.demo.progress import Progress
from mgll.demo.recipes import Recipe
from mgll.demo.settings import C_GRID, RECIPES, Demo, DemoError, check_settings, load_demo_records
from mgll.eval.encoders import encoder_from_model
from mgll.eval.features import extract_features
from mgll.eval.options import EvalOptions
from mgll.eval.probe import fit_probe
from mgll.io import atomic_write
from mgll.metrics import classification_metrics
from mgll.training.checkpoint import load_model

ABLATION_FOLDS = 2  # per seed; seeds give the spread, folds make every image a test image once
DROP_FRACTION = 0.3
RESULTS_FILE = "ablation.json"
TABLE_FILE = "ablation.md"


@dataclass(frozen=True)
class Variant:
    """One row of the ablation: the loss name, config overrides and a label-drop fraction."""

    name: str
    loss: str
    overrides: tuple[tuple[str, Any], ...] = ()
    drop_fraction: float = 0.0


def variants(num_levels: int) -> list[Variant]:
    """The ablation's rows for data with ``num_levels`` granularity levels."""
    off = 0.0
    rows = [
        Variant("CLIP (joined caption)", "clip"),
        Variant(
            "point-wise only", "mgll", (("loss.weights.sclip", off), ("loss.weights.skl", off))
        ),
        Variant(
            "soft CLIP only", "mgll", (("loss.weights.pointwise", off), ("loss.weights.skl", off))
        ),
        Variant("soft CLIP + point-wise", "mgll", (("loss.weights.skl", off),)),
        Variant(f"MGLL, all three terms ({num_levels} levels)", "mgll"),
    ]
    rows.extend(
        Variant(
            f"MGLL, {g} level{'s' if g > 1 else ''}", "mgll", (("data.levels", list(range(g))),)
        )
        for g in range(1, num_levels)
    )
    rows.append(
        Variant(
            f"MGLL, {DROP_FRACTION:.0%} of finest-level labels dropped",
            "mgll",
            drop_fraction=DROP_FRACTION,
        )
    )
    return rows


def label_dropping_builder(fraction: float, seed: int) -> Callable:
    """A trainer ``data_builder``: the usual prepared data with ``fraction`` of the training
    records' finest-level labels removed (seeded), so the loss treats them as missing."""

    def build(data_cfg: Any, data_root: Any, run_seed: int) -> Any:
        prepared = prepare_data(data_cfg, data_root, run_seed)
        finest = len(prepared.levels) - 1
        train = np.asarray(prepared.indices["train"])
        rng = np.random.default_rng(seed)
        chosen = rng.choice(train, size=round(fraction * len(train)), replace=False)
        for i in chosen:
            prepared.records.records[int(i)].labels[finest] = []
        return prepared

    return build


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def _pooled_auc(
    demo: Demo, variant: Variant, records: RecordSet, fold: np.ndarray, level: str
) -> float:
    """Macro AUC of ``level`` from the variant's fold models, held-out predictions pooled."""
    everything = np.arange(len(records.records))
    pooled = fold_task(demo, records, level, everything[:0], everything)
    task, y = pooled.task, pooled.y
    scores = np.zeros(y.shape, dtype=np.float64)
    options = EvalOptions(cache_dir=False, quiet=True)
    for k in range(demo.folds):
        model, _ = load_model(demo.run_dir(_slug(variant.name), k))
        encoder = encoder_from_model(model, f"{variant.name}/fold{k}")
        feats = extract_features(encoder, records, demo.folder, options)
        part = fold_task(demo, records, level, everything[fold != k], everything[fold == k])
        fitted = fit_probe(
            feats.features, part, part.rows["train"], selection="cv", c_grid=C_GRID, seed=demo.seed
        )
        test = part.rows["test"]
        scores[test] = fitted.scores(feats.features[test])
    rows = pooled.rows["test"]
    metrics = classification_metrics(y[rows], scores[rows], task.type, classes=task.classes)
    return float(metrics["auc_macro"])


def run_ablation(
    data_root: str | Path,
    output_dir: str | Path,
    *,
    dataset: str = "csdi-fundus",
    seeds: int = 3,
    quick: bool = False,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or resume) the ablation; writes ``OUT/ablation.json`` and ``OUT/ablation.md``."""
    if dataset not in RECIPES:
        raise DemoError(f"--dataset {dataset!r}: choose one of {', '.join(RECIPES)}")
    if seeds < 1:
        raise DemoError(f"--seeds {seeds}: give at least 1 (3 or more for a spread)")
    recipe = RECIPES[dataset]
    out = Path(output_dir)
    folder = Path(data_root) / recipe.dataset
    if not folder.is_dir():
        raise DemoError(f"{folder} does not exist; --data-root must hold the {dataset} folder")
    started = time.perf_counter()
    records = load_demo_records(folder)
    rows = variants(len(records.levels))
    demos = [
        _ablation_demo(recipe, Path(data_root), out / f"seed{seed}", quick, seed)
        for seed in range(seeds)
    ]
    progress = Progress(
        runs=len(rows) * sum(d.folds for d in demos),
        evaluations=len(rows) * len(demos),
        echo=echo,
        start=started,
    )
    echo(
        f"mgll ablate: {dataset}, {len(rows)} variants x {seeds} seed(s) x {demos[0].folds} "
        f"folds, main level {recipe.main_level}" + (" (--quick: a smoke run)" if quick else "")
    )
    auc: dict[str, list[float]] = {v.name: [] for v in rows}
    for demo in demos:
        check_settings(demo)  # a re-run with other options on this folder is refused
        fold = patient_folds(records, recipe.main_level, demo.folds, demo.seed)
        write_folds(demo, records, fold)
        for variant in rows:
            auc[variant.name].append(_run_variant(demo, variant, records, fold, progress))
    summary = {
        "dataset": dataset,
        "main_level": recipe.main_level,
        "metric": "macro AUC of the linear probe, held-out predictions pooled over the folds",
        "seeds": seeds,
        "folds": demos[0].folds,
        "quick": quick,
        "rows": [
            {
                "variant": v.name,
                "auc_macro": auc[v.name],
                "mean": float(np.mean(auc[v.name])),
                "std": float(np.std(auc[v.name], ddof=1)) if seeds > 1 else None,
            }
            for v in rows
        ],
        "seconds": time.perf_counter() - started,
    }
    table = format_ablation(summary)
    atomic_write(
        out / RESULTS_FILE,
        lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8"),
    )
    atomic_write(out / TABLE_FILE, lambda tmp: tmp.write_text(table + "\n", encoding="utf-8"))
    echo(table)
    return summary


def _run_variant(
    demo: Demo, variant: Variant, records: RecordSet, fold: np.ndarray, progress: Progress
) -> float:
    """One variant of one seed: pretrain its folds, then the probe's pooled macro AUC (each
    read back when a previous run finished it)."""
    slug = _slug(variant.name)
    builder = (
        label_dropping_builder(variant.drop_fraction, demo.seed) if variant.drop_fraction else None
    )
    for k in range(demo.folds):
        progress.say("pretrain", f"seed {demo.seed}, {variant.name}, fold {k + 1}")
        cfg = demo.config(variant.loss, k, variant.overrides)
        seconds, fresh = pretrain_run(cfg, demo.data_root, demo.run_dir(slug, k), builder)
        progress.done("run", seconds if fresh else None)
    result = demo.out / slug / "probe.json"
    t0 = time.perf_counter()
    if result.is_file():
        value, fresh = json.loads(result.read_text(encoding="utf-8"))["auc_macro"], False
    else:
        progress.say("evaluate", f"seed {demo.seed}, {variant.name}")
        value, fresh = _pooled_auc(demo, variant, records, fold, demo.recipe.main_level), True
        text = json.dumps({"auc_macro": value}) + "\n"
        atomic_write(result, lambda tmp, t=text: tmp.write_text(t, encoding="utf-8"))
    progress.done("eval", time.perf_counter() - t0 if fresh else None)
    return value


def _ablation_demo(recipe: Recipe, data_root: Path, out: Path, quick: bool, seed: int) -> Demo:
    """The demo's settings for one seed of the ablation (its own folds and run folders)."""
    from dataclasses import replace

    return Demo(replace(recipe, folds=ABLATION_FOLDS), data_root, out, quick, seed)


def format_ablation(summary: dict[str, Any]) -> str:
    """The ablation as a Markdown table (mean ± standard deviation over seeds)."""
    lines = [
        f"{summary['dataset']}, {summary['main_level']}: {summary['metric']}; "
        f"{summary['seeds']} seed(s) (patient splits) x {summary['folds']} folds",
        "",
        "| variant | macro AUC, mean ± sd | per seed |",
        "|---|---|---|",
    ]
    for row in summary["rows"]:
        spread = f" ± {row['std']:.3f}" if row["std"] is not None else ""
        per_seed = ", ".join(f"{v:.3f}" for v in row["auc_macro"])
        lines.append(f"| {row['variant']} | {row['mean']:.3f}{spread} | {per_seed} |")
    return "\n".join(lines)


__all__: Sequence[str] = ("Variant", "format_ablation", "run_ablation", "variants")
