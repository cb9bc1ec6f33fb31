"""The demo's phases: folds, pretraining, evaluation, comparison (see :mod:`mgll.demo`)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mgll.errors import UserError

ENCODERS = ("random", "clip", "mgll")
PRETRAINED = ("clip", "mgll")
COMPARISONS = (("mgll", "clip"), ("mgll", "random"))
SETTINGS_FILE = "demo.json"
REPORT_FILE = "report.html"
SUMMARY_FILE = "summary.json"
C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)
INNER_FOLDS = 3
RESAMPLES = 1000
QUICK_RESAMPLES = 200


class DemoError(UserError, ValueError):
    """The demo cannot run as asked (the message says what to change)."""


@dataclass(frozen=True)
class Recipe:
    """One dataset's demo: its folder under the data root, pretraining config and main level."""

    dataset: str
    config: str
    main_level: str
    folds: int = 5


RECIPES = {
    "csdi-fundus": Recipe("csdi-fundus", "demo-csdi-fundus", "severity"),
    "covid-cxr": Recipe("covid-cxr", "demo-covid-cxr", "organism"),
}
# --quick: the same recipe with fewer folds and epochs (a smoke run, not a measurement).
QUICK_FOLDS = 2
QUICK_OVERRIDES: tuple[tuple[str, Any], ...] = (("train.epochs", 1),)


# ---- data ------------------------------------------------------------------------------------


def classification_levels(records: Any) -> list[str]:
    """Levels worth a classifier: at least 2 classes and fewer classes than half the labelled
    images (a caption level, one text per image, is left to retrieval)."""
    names = []
    for g, level in enumerate(records.levels):
        labelled = sum(1 for r in records.records if r.labels[g])
        if 2 <= len(level.vocabulary) < labelled / 2:
            names.append(level.name)
    return names


def load_demo_records(folder: Path) -> Any:
    """The dataset's records with every patient id replaced by its patient *group*: patients
    joined across byte-identical image files, so that no photo is on both sides of a split and
    the bootstrap resamples the groups."""
    from mgll.data.build import drop_missing_images, load_records
    from mgll.data.splits import linked_patient_keys

    records, _ = load_records(None, folder)
    records, _missing = drop_missing_images(records)
    if not records.records:
        raise DemoError(f"{folder}: no image file of the dataset exists")
    for record, group in zip(records.records, linked_patient_keys(records.records), strict=True):
        record.patient_id = group
    return records


def patient_folds(records: Any, level: str, k: int, seed: int) -> np.ndarray:
    """Fold (0..k-1) of every record: patient-group-level folds stratified on ``level``'s
    first label (scikit-learn ``StratifiedGroupKFold``)."""
    from sklearn.model_selection import StratifiedGroupKFold

    g = [lv.name for lv in records.levels].index(level)
    strata = [r.labels[g][0] if r.labels[g] else "" for r in records.records]
    groups = [r.patient_id for r in records.records]
    if len(set(groups)) < k:
        raise DemoError(f"{len(set(groups))} patients cannot fill {k} folds")
    fold = np.full(len(strata), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for index, (_, held_out) in enumerate(splitter.split(np.zeros(len(strata)), strata, groups)):
        fold[held_out] = index
    return fold


# ---- progress --------------------------------------------------------------------------------


class Progress:
    """Prints each step with the elapsed time and an estimate of the time left.

    The estimate counts pretraining runs (measured mean, or ``first_guess_s`` before the first
    ends) and evaluations (measured mean, or a tenth of a run).
    """

    def __init__(
        self, runs: int, evaluations: int, first_guess_s: float, echo: Callable, start: float
    ) -> None:
        self.start = start
        self.runs_left, self.evals_left = runs, evaluations
        self.run_times: list[float] = []
        self.eval_times: list[float] = []
        self.first_guess_s = first_guess_s
        self.echo = echo

    def left_s(self) -> float:
        run = float(np.mean(self.run_times)) if self.run_times else self.first_guess_s
        evaluation = float(np.mean(self.eval_times)) if self.eval_times else run / 10
        return self.runs_left * run + self.evals_left * evaluation

    def say(self, phase: str, what: str) -> None:
        elapsed = _duration(time.perf_counter() - self.start)
        self.echo(f"[{phase}] {what} | elapsed {elapsed}, about {_duration(self.left_s())} left")

    def done(self, kind: str, seconds: float | None) -> None:
        if kind == "run":
            self.runs_left -= 1
            if seconds is not None:
                self.run_times.append(seconds)
        else:
            self.evals_left -= 1
            if seconds is not None:
                self.eval_times.append(seconds)


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# ---- the run ---------------------------------------------------------------------------------


@dataclass
class Demo:
    """Settings and paths of one demo run."""

    recipe: Recipe
    data_root: Path
    out: Path
    quick: bool
    seed: int

    @property
    def folds(self) -> int:
        return QUICK_FOLDS if self.quick else self.recipe.folds

    @property
    def resamples(self) -> int:
        return QUICK_RESAMPLES if self.quick else RESAMPLES

    @property
    def folder(self) -> Path:
        return self.data_root / self.recipe.dataset

    def settings(self) -> dict[str, Any]:
        return {
            "dataset": self.recipe.dataset,
            "config": self.recipe.config,
            "quick": self.quick,
            "seed": self.seed,
            "folds": self.folds,
            "data": str(self.folder.resolve()),
        }

    def config(self, loss: str, fold: int, extra: Sequence[tuple[str, Any]] = ()) -> dict[str, Any]:
        """The pretraining config of one encoder and fold (``extra``: more overrides)."""
        from mgll.training.config import load_config

        overrides: list[tuple[str, Any]] = [
            ("data.split", {"file": str(self.split_file(fold).resolve())}),
            ("train.seed", self.seed),
            ("loss.name", loss),
            # CLIP's one caption per image: all of its level texts joined, coarse to fine
            *([("loss.clip_level", "joined")] if loss == "clip" else []),
            ("eval.every_epochs", 0),
            ("log.progress_bar", False),
        ]
        if self.quick:
            overrides.extend(QUICK_OVERRIDES)
        return load_config(self.recipe.config, [*overrides, *extra])

    def split_file(self, fold: int) -> Path:
        return self.out / "folds" / f"fold{fold}.csv"

    def run_dir(self, encoder: str, fold: int) -> Path:
        return self.out / encoder / f"fold{fold}"


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
    from mgll.io import atomic_write

    if dataset not in RECIPES:
        raise DemoError(f"--dataset {dataset!r}: choose one of {', '.join(RECIPES)}")
    if seed < 0:
        raise DemoError(f"--seed {seed}: give a seed >= 0 (it seeds the folds and the models)")
    demo = Demo(RECIPES[dataset], Path(data_root), Path(output_dir), quick, seed)
    if not demo.folder.is_dir():
        raise DemoError(f"{demo.folder} does not exist; --data-root must hold the {dataset} folder")
    started = time.perf_counter()
    check_settings(demo)

    records = load_demo_records(demo.folder)
    fold = patient_folds(records, demo.recipe.main_level, demo.folds, seed)
    write_folds(demo, records, fold)
    levels = classification_levels(records)
    from mgll.training.trainer import SUMMARY_FILE as RUN_SUMMARY

    finished = {
        (encoder, k): (demo.run_dir(encoder, k) / RUN_SUMMARY).is_file()
        for encoder in PRETRAINED
        for k in range(demo.folds)
    }
    progress = Progress(
        runs=sum(not done for done in finished.values()),  # a resumed demo redoes none
        evaluations=sum(not _evaluated(demo, e, records, levels) for e in ENCODERS),
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

    pretrain_s: dict[str, float] = {}
    for encoder in PRETRAINED:
        pretrain_s[encoder] = 0.0
        for k in range(demo.folds):
            what = f"{encoder} fold {k + 1}/{demo.folds}"
            progress.say("pretrain", what + (" (finished earlier)" if finished[encoder, k] else ""))
            seconds = pretrain_run(
                demo.config(encoder, k), demo.data_root, demo.run_dir(encoder, k)
            )
            pretrain_s[encoder] += seconds[0]
            if not finished[encoder, k]:
                progress.done("run", seconds[0] if seconds[1] else None)

    table: list[dict[str, Any]] = []
    for encoder in ENCODERS:
        progress.say(
            "evaluate", f"{encoder}: linear probe, zero-shot and retrieval, pooled over folds"
        )
        t0 = time.perf_counter()
        if _evaluate(demo, encoder, records, fold, levels):
            progress.done("eval", time.perf_counter() - t0)
        table.extend(_table_rows(demo, encoder, levels, records.levels[-1].name))

    progress.say("compare", "paired patient bootstrap")
    comparisons = _compare(demo, levels, records.levels[-1].name)
    summary = {
        "dataset": dataset,
        "config": _without_split(demo.config("mgll", 0).to_dict()),
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
            f"{records.levels[-1].name} texts of those images are the gallery, ranked by "
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


def write_demo_report(demo: Demo, records: Any, summary: Mapping[str, Any]) -> Path:
    """``OUT/report.html`` from the demo's outputs (see :mod:`mgll.demo.report`)."""
    from PIL import Image

    from mgll.demo.report import EncoderReport, ReportInputs, RetrievalExample, write_report
    from mgll.eval.results import read_predictions
    from mgll.training.run_log import read_metrics

    level = demo.recipe.main_level
    index = [lv.name for lv in records.levels].index(level)
    names = [r.labels[index][0] if r.labels[index] else "(none)" for r in records.records]
    encoders = []
    for encoder in ENCODERS:
        base = demo.out / encoder
        curve: list[tuple[int, float]] = []
        if encoder in PRETRAINED:
            rows = read_metrics(demo.run_dir(encoder, 0))
            curve = [(r["step"], r["loss"]) for r in rows if r.get("kind") == "train"]
        predictions = read_predictions(base / f"probe-{level}")
        data = np.load(base / REPORT_DATA_FILE)
        examples = []
        for q, i in enumerate(data["queries"]):
            with Image.open(records.records[i].image) as picture:
                thumb = np.asarray(picture.convert("RGB").resize((96, 96)))
            shown = [
                (int(j), float(score))
                for j, score in zip(data["top_index"][q], data["top_score"][q], strict=True)
                if j >= 0  # a gallery smaller than RETRIEVAL_TOP leaves places empty
            ]
            examples.append(
                RetrievalExample(
                    image=thumb,
                    truth=f"{names[i]}: {records.records[i].texts[-1][0]}",
                    texts=[
                        (f"{names[j]}: {records.records[j].texts[-1][0]}", score)
                        for j, score in shown
                    ],
                    correct=[names[j] == names[i] for j, _ in shown],
                )
            )
        encoders.append(
            EncoderReport(
                name=encoder,
                loss_curve=curve,
                roc_labels=predictions["y"],
                roc_scores=predictions["scores"],
                classes=predictions["classes"],
                embedding=data["features"],
                embedding_labels=[names[i] for i in data["feature_rows"]],
                retrieval=examples,
            )
        )
    protocol = summary["protocol"]
    inputs = ReportInputs(
        title=f"mgll demo: random vs CLIP vs MGLL on {summary['dataset']}",
        dataset=summary["dataset"],
        table=summary["table"],
        comparisons=summary["comparisons"],
        encoders=encoders,
        main_level=level,
        notes=[
            f"{protocol['n_images']} images of {protocol['n_patient_groups']} patient groups; "
            f"{protocol['split']}.",
            f"Probe: {protocol['probe']}. Confidence intervals: {protocol['bootstrap']}.",
            "Loss curves are fold 1's runs; embedding maps show fold 1's held-out images in the "
            "features of fold 1's model (which never saw them); retrieval examples rank the "
            f"distinct {records.levels[-1].name} texts of the same fold's held-out images.",
            f"Retrieval: {protocol['retrieval']}.",
            "Small public data on one machine: these numbers show what the method does here, "
            "not how it compares at the paper's scale.",
        ],
        extra={
            "seed": demo.seed,
            "quick": demo.quick,
            "pretraining seconds": {k: round(v) for k, v in summary["pretrain_seconds"].items()},
            "total seconds": round(summary["seconds"]),
        },
    )
    return write_report(demo.out / REPORT_FILE, inputs)


def _without_split(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The run config with the per-fold split file replaced by where the folds are."""
    return {**cfg, "data": {**cfg["data"], "split": "per fold: OUT/folds/fold<k>.csv"}}


def check_settings(demo: Demo) -> None:
    """Record the run's settings in its folder; a folder holding other settings is refused."""
    from mgll.io import atomic_write

    path = demo.out / SETTINGS_FILE
    wanted = demo.settings()
    if path.is_file():
        held = json.loads(path.read_text(encoding="utf-8"))
        if held != wanted:
            changed = sorted(k for k in wanted if held.get(k) != wanted[k])
            raise DemoError(
                f"{demo.out} holds a demo run with other settings ({', '.join(changed)}: "
                f"{[held.get(k) for k in changed]} there); use a new --output-dir or the same "
                "options"
            )
        return
    demo.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(wanted, indent=2) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_folds(demo: Demo, records: Any, fold: np.ndarray) -> None:
    """``OUT/folds/fold<k>.csv``: fold k's held-out patients as test, the rest as train."""
    from mgll.data.splits import write_split_file

    for k in range(demo.folds):
        split = {
            "train": [int(i) for i in np.flatnonzero(fold != k)],
            "test": [int(i) for i in np.flatnonzero(fold == k)],
        }
        path = demo.split_file(k)
        if not path.is_file():
            write_split_file(path, records.records, split, root=demo.folder)


def pretrain_run(
    cfg: Any, data_root: Path, run_dir: Path, data_builder: Callable | None = None
) -> tuple[float, bool]:
    """Pretrain (or resume, or skip when finished) one run into ``run_dir``; returns its
    seconds and whether it ran now. The trainer's output goes to ``run_dir/train.log``."""
    from mgll.training import checkpoint as ckpt
    from mgll.training.trainer import SUMMARY_FILE as RUN_SUMMARY
    from mgll.training.trainer import train

    summary_path = run_dir / RUN_SUMMARY
    if summary_path.is_file():
        return float(json.loads(summary_path.read_text(encoding="utf-8"))["seconds"]), False
    resume = "latest" if ckpt.list_checkpoints(run_dir / ckpt.CHECKPOINT_SUBDIR) else None
    run_dir.mkdir(parents=True, exist_ok=True)
    log = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(log):
        train(cfg, data_root, run_dir, resume=resume, data_builder=data_builder)
    (run_dir / "train.log").write_text(log.getvalue(), encoding="utf-8")
    return time.perf_counter() - t0, True


def _fold_models(demo: Demo, encoder: str) -> list[Any]:
    """The encoder's model of every fold: the seeded initial model for ``random`` (the weights
    every pretraining starts from, the same for all folds), else the fold's pretrained run."""
    from mgll.models import create_model
    from mgll.process import seed_everything
    from mgll.training.checkpoint import load_model

    if encoder == "random":
        seed_everything(demo.seed)  # as the trainer does right before building the model
        model = create_model(demo.config("mgll", 0).model)
        return [model.eval()] * demo.folds
    return [load_model(demo.run_dir(encoder, k))[0] for k in range(demo.folds)]


def _eval_data(
    demo: Demo, records: Any, level: str, train_rows: np.ndarray, test_rows: np.ndarray
) -> Any:
    from mgll.eval.data import EvalData, build_task

    task, y, usable = build_task(records, level)
    rows = {
        "train": np.asarray([i for i in train_rows if usable[i]], dtype=np.int64),
        "val": np.zeros(0, dtype=np.int64),
        "test": np.asarray([i for i in test_rows if usable[i]], dtype=np.int64),
    }
    patients = {name: len({records.records[i].patient_id for i in r}) for name, r in rows.items()}
    return EvalData(
        records=records,
        folder=demo.folder,
        task=task,
        y=y,
        rows=rows,
        split_info={
            "from": f"{demo.folds}-fold patient cross-validation, held-out predictions pooled",
            "settings": {"folds": demo.folds, "seed": demo.seed},
            "seed": demo.seed,
            "n_images": {name: len(r) for name, r in rows.items()},
            "n_patients": patients,
        },
        source=str(demo.folder),
        split_indices={"train": [], "val": [], "test": [int(i) for i in test_rows]},
    )


REPORT_DATA_FILE = "report_data.npz"
RETRIEVAL_EXAMPLES = 3  # held-out images shown with their top texts in the report
RETRIEVAL_TOP = 3
RETRIEVAL_KS = (1, 5, 10)
# Chosen before the first retrieval measurement: the comparisons printed and shown first.
RETRIEVAL_HEADLINE = ("i2t_R@5", "i2t_P@5")


def _retrieval_queries(records: Any, candidates: np.ndarray, level: str) -> list[int]:
    """A few held-out images, the same for every encoder: one per class of the main level
    (the first of the retrieval queries ``candidates`` of each class in file order), up to
    :data:`RETRIEVAL_EXAMPLES`."""
    index = [lv.name for lv in records.levels].index(level)
    chosen: dict[str, int] = {}
    for i in sorted(int(c) for c in candidates):
        names = records.records[i].labels[index]
        if names and names[0] not in chosen:
            chosen[names[0]] = i
    return sorted(chosen.values())[:RETRIEVAL_EXAMPLES]


def _save_report_data(
    base: Path,
    fold: np.ndarray,
    queries: Sequence[int],
    fold_scores: Sequence[tuple[np.ndarray, Any]],
    features: np.ndarray,
) -> None:
    """What the report shows of one encoder: the features of fold 1's held-out images from
    fold 1's model (one model, so one feature space) and, for a few held-out images, the
    gallery texts their fold's retrieval ranked highest (each text shown through the first
    image carrying it, for its label)."""
    from mgll.io import atomic_write

    first_fold = np.flatnonzero(fold == 0)
    top_index = np.full((len(queries), RETRIEVAL_TOP), -1, dtype=np.int64)  # -1: no text
    top_score = np.full((len(queries), RETRIEVAL_TOP), np.nan)
    for q, i in enumerate(queries):
        rows, scores = fold_scores[int(fold[i])]
        similarity = scores.similarity[int(np.flatnonzero(rows == i)[0])]
        carrier = {int(t): int(rows[j]) for j, t in reversed(list(enumerate(scores.own_text)))}
        order = np.argsort(-similarity, kind="stable")[:RETRIEVAL_TOP]  # fewer in a tiny gallery
        top_index[q, : len(order)] = [carrier[int(t)] for t in order]
        top_score[q, : len(order)] = similarity[order]
    arrays = {
        "features": features[first_fold],
        "feature_rows": first_fold,
        "queries": np.asarray(queries, dtype=np.int64),
        "top_index": top_index,
        "top_score": top_score,
    }

    def write(tmp: Path) -> None:
        with tmp.open("wb") as handle:
            np.savez(handle, **arrays)

    base.mkdir(parents=True, exist_ok=True)
    atomic_write(base / REPORT_DATA_FILE, write)


def _retrieval(
    demo: Demo,
    encoder: str,
    records: Any,
    fold: np.ndarray,
    models: Sequence[Any],
    embs: Sequence[Any],
) -> list[tuple[np.ndarray, Any]]:
    """Image -> text retrieval of every fold's held-out images among the distinct finest-level
    texts of the same held-out images (the fold's model, which never saw them), pooled over
    folds into ``OUT/<encoder>/retrieval-<finest level>``; returns each fold's (rows, scores)
    (a fold whose held-out images carry no such text has no queries and is left out)."""
    from mgll.eval.retrieve import retrieval_texts, score_retrieval, write_retrieval_outputs

    text_level = len(records.levels) - 1
    text_name = records.levels[text_level].name
    everything = np.arange(len(records.records))
    per_fold, pooled = [], {}
    for k, model in enumerate(models):
        part = _eval_data(
            demo, records, demo.recipe.main_level, everything[fold != k], everything[fold == k]
        )
        rows, texts = retrieval_texts(part, part.rows["test"], text_name)
        if len(rows) == 0:
            continue
        scores = score_retrieval(model, embs[k].features[rows], texts, part.y[rows], text_level)
        per_fold.append((rows, scores))
        pooled[k] = (
            rows,
            texts,
            scores.hits(RETRIEVAL_KS),
            scores.references(RETRIEVAL_KS),
            len(scores.gallery),
        )
    if not pooled:
        raise DemoError(
            f"no image carries a {text_name} text (with a {demo.recipe.main_level} label): "
            "the demo's retrieval needs the finest level's texts"
        )
    data = _eval_data(demo, records, demo.recipe.main_level, everything[:0], everything)
    first = next(iter(pooled.values()))

    def joined(part: int) -> dict[str, np.ndarray]:
        return {key: np.concatenate([p[part][key] for p in pooled.values()]) for key in first[part]}

    write_retrieval_outputs(
        demo.out / encoder / f"retrieval-{text_name}",
        data,
        np.concatenate([p[0] for p in pooled.values()]),
        [t for p in pooled.values() for t in p[1]],
        joined(2),
        joined(3),
        text_level=text_name,
        encoder={"spec": encoder, "kind": "demo", "folds": demo.folds},
        n_texts=sum(p[4] for p in pooled.values()),
        n_resamples=demo.resamples,
        seed=demo.seed,
        details={
            "gallery": f"per fold, the distinct {text_name} texts of the fold's held-out "
            "images; each fold's queries ranked by that fold's model; pooled over folds",
            "labels": f"label-aware P@K judged by the {demo.recipe.main_level} labels",
            "gallery_sizes": [p[4] for p in pooled.values()],
        },
    )
    return per_fold


def _evaluated(demo: Demo, encoder: str, records: Any, levels: Sequence[str]) -> bool:
    """Whether every output of ``encoder``'s evaluation exists (a resumed demo skips it)."""
    from mgll.eval.results import RESULTS_FILE, ResultsError, read_results

    base = demo.out / encoder
    wanted = [base / f"{p}-{lv}" / RESULTS_FILE for lv in levels for p in ("probe", "zeroshot")]
    retrieval = base / f"retrieval-{records.levels[-1].name}"
    if not all(w.is_file() for w in [*wanted, base / REPORT_DATA_FILE]):
        return False
    try:  # retrieval outputs written before the image-blind references are redone
        return "image_blind" in read_results(retrieval)
    except ResultsError:
        return False


def _evaluate(
    demo: Demo, encoder: str, records: Any, fold: np.ndarray, levels: Sequence[str]
) -> bool:
    """Probe and zero-shot outputs of one encoder for every level; False when all existed."""
    from mgll.eval.encoders import encoder_from_model
    from mgll.eval.features import extract_features
    from mgll.eval.results import write_classification_outputs
    from mgll.eval.zeroshot import class_prompts, text_embeddings, zero_shot_scores

    base = demo.out / encoder
    if _evaluated(demo, encoder, records, levels):
        return False
    models = _fold_models(demo, encoder)
    n = len(records.records)
    feats, embs = [], []  # once per fold model, so no feature cache
    for k, model in enumerate(models):
        if k > 0 and model is models[0]:
            feats.append(feats[0])
            embs.append(embs[0])
            continue
        enc = encoder_from_model(model, f"{encoder}/fold{k}")
        feats.append(extract_features(enc, records, demo.folder, cache_dir=False, progress=False))
        embs.append(
            extract_features(
                enc, records, demo.folder, projected=True, cache_dir=False, progress=False
            )
        )
    fold_scores = _retrieval(demo, encoder, records, fold, models, embs)
    candidates = np.concatenate([rows for rows, _ in fold_scores])
    queries = _retrieval_queries(records, candidates, demo.recipe.main_level)
    _save_report_data(base, fold, queries, fold_scores, feats[0].features)
    everything = np.arange(n)
    for level in levels:
        data = _eval_data(demo, records, level, np.zeros(0, dtype=np.int64), everything)
        test = data.rows["test"]
        probe = np.zeros((n, len(data.task.classes)))
        zeroshot = np.zeros_like(probe)
        chosen, sources = [], set()
        level_index = [lv.name for lv in records.levels].index(level)
        for k, model in enumerate(models):
            part = _eval_data(
                demo, records, level, np.flatnonzero(fold != k), np.flatnonzero(fold == k)
            )
            tr, te = part.rows["train"], part.rows["test"]
            scores, c = cv_probe(
                feats[k].features,
                part.y,
                tr,
                te,
                part.task.type,
                part.task.classes,
                groups=part.patients(tr),
                seed=demo.seed,
            )
            probe[te] = scores
            chosen.append(c)
            positive, negative, source = class_prompts(part)
            sources.add(source)
            pos = text_embeddings(model, positive, part.task.classes, level_index)
            neg = (
                text_embeddings(model, negative, part.task.classes, level_index)
                if negative
                else None
            )
            zeroshot[te] = zero_shot_scores(
                embs[k].features[te], pos, neg, float(model.logit_scale.detach())
            )
        common = dict(
            val_rows=None,
            val_scores=None,
            seed=demo.seed,
            n_resamples=demo.resamples,
            progress=False,
            encoder={"spec": encoder, "kind": "demo", "folds": demo.folds},
        )
        write_classification_outputs(
            base / f"probe-{level}",
            data,
            test,
            probe[test],
            protocol="linear_probe",
            details={
                "classifier": "scikit-learn LogisticRegression on standardised "
                "pre-projection features",
                "C_per_fold": chosen,
                "criterion": f"macro AUC, {INNER_FOLDS}-fold patient CV in training",
            },
            **common,
        )
        write_classification_outputs(
            base / f"zeroshot-{level}",
            data,
            test,
            zeroshot[test],
            protocol="zeroshot",
            details={"prompt_source": sorted(sources)},
            **common,
        )
    return True


def cv_probe(
    features: np.ndarray,
    y: np.ndarray,
    train_rows: np.ndarray,
    test_rows: np.ndarray,
    task_type: str,
    classes: Sequence[str],
    *,
    groups: Sequence[str],
    seed: int = 0,
    c_grid: Sequence[float] = C_GRID,
) -> tuple[np.ndarray, float]:
    """Scores of ``test_rows`` from a logistic regression fitted on ``train_rows``, its C the
    best mean macro AUC over an inner patient-grouped CV of the training rows."""
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    from mgll.eval.probe import LinearClassifier
    from mgll.metrics import classification_metrics

    x = features[train_rows]
    mean, std = x.mean(0, keepdims=True), x.std(0, keepdims=True) + 1e-6
    x, x_test = (x - mean) / std, (features[test_rows] - mean) / std
    y_train = y[train_rows].astype(int)
    groups = np.asarray(groups)
    if task_type == "multilabel":
        splitter = GroupKFold(n_splits=INNER_FOLDS)
        inner = list(splitter.split(x, None, groups))
    else:
        splitter = StratifiedGroupKFold(n_splits=INNER_FOLDS, shuffle=True, random_state=seed)
        inner = list(splitter.split(x, y_train.argmax(1), groups))
    best_c, best_auc = c_grid[0], -math.inf
    for c in c_grid:
        aucs = []
        for fit_rows, val_rows in inner:
            model = LinearClassifier(task_type, y_train.shape[1], seed)
            model.fit(x[fit_rows], y_train[fit_rows], c)
            yv = y_train[val_rows]
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
        if auc > best_auc:
            best_c, best_auc = c, auc
    model = LinearClassifier(task_type, y_train.shape[1], seed).fit(x, y_train, best_c)
    return model.predict_scores(x_test), float(best_c)


def _table_rows(
    demo: Demo, encoder: str, levels: Sequence[str], text_level: str
) -> list[dict[str, Any]]:
    from mgll.eval.results import read_results

    rows = []
    for level in levels:
        for protocol in ("probe", "zeroshot"):
            m = read_results(demo.out / encoder / f"{protocol}-{level}")["metrics"]
            rows.append(
                {
                    "encoder": encoder,
                    "level": level,
                    "protocol": "linear_probe" if protocol == "probe" else "zeroshot",
                    "auc_macro": m.get("auc_macro"),
                    "auc_macro_ci95": m.get("auc_macro_ci95"),
                    "map": m.get("map"),
                    "accuracy": m.get("accuracy"),
                }
            )
    results = read_results(demo.out / encoder / f"retrieval-{text_level}")
    row: dict[str, Any] = {
        "encoder": encoder,
        "level": text_level,
        "label_level": results["task"]["label_level"],
        "protocol": "retrieval",
        "n_queries": results["n_test"],
    }
    for key, value in results["metrics"].items():
        if key.startswith(("i2t_R@", "i2t_P@")):
            row[key] = value
    row["chance"] = results["chance"]
    row["image_blind"] = results["image_blind"]
    row["top1_hub"] = results["top1_hub"]
    rows.append(row)
    return rows


def _compare(demo: Demo, levels: Sequence[str], text_level: str) -> list[dict[str, Any]]:
    from mgll.eval.compare import compare_folders

    out = []
    tasks = [(level, p, f"{p}-{level}") for level in levels for p in ("probe", "zeroshot")]
    tasks.append((text_level, "retrieval", f"retrieval-{text_level}"))
    for level, protocol, name in tasks:
        for a, b in COMPARISONS:
            result = compare_folders(
                [demo.out / a / name, demo.out / b / name],
                output_dir=demo.out / "compare" / f"{a}-vs-{b}-{name}",
                n_resamples=demo.resamples,
                seed=demo.seed,
                progress=False,
            )
            stats = result["comparisons"][0]["metrics"]
            metrics = (
                [m for m in stats if m.startswith(("i2t_R@", "i2t_P@"))]
                if protocol == "retrieval"
                else ["auc_macro", "map", "accuracy"]
            )
            for metric in metrics:
                m = stats.get(metric)
                if m is None:
                    continue
                out.append(
                    {
                        "a": a,
                        "b": b,
                        "level": level,
                        "protocol": {"probe": "linear_probe"}.get(protocol, protocol),
                        "metric": metric,
                        "diff": m["diff"],
                        "ci95": m["ci95"],
                        "p": m["p_value"],
                    }
                )
    return out


def _fmt_ci(value: float | None, ci: Sequence[float] | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "undefined"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{value:.3f}"


def format_table(summary: Mapping[str, Any]) -> str:
    """The side-by-side macro-AUC and retrieval tables and the headline comparisons, as
    printed at the end."""
    rows: dict[tuple[str, str], dict[str, str]] = {}
    retrieval: dict[str, Mapping[str, Any]] = {}
    for r in summary["table"]:
        if r["protocol"] == "retrieval":
            retrieval[r["encoder"]] = r
            continue
        cell = _fmt_ci(r["auc_macro"], r["auc_macro_ci95"])
        rows.setdefault((r["level"], r["protocol"]), {})[r["encoder"]] = cell
    width = 24
    lines = [
        f"macro AUC (95% patient-bootstrap CI), {summary['protocol']['n_images']} held-out "
        f"images, {summary['settings']['folds']}-fold patient CV",
        f"{'level':<14}{'protocol':<14}" + "".join(f"{e:<{width}}" for e in ENCODERS),
    ]
    for (level, protocol), cells in rows.items():
        lines.append(
            f"{level:<14}{protocol:<14}" + "".join(f"{cells.get(e, ''):<{width}}" for e in ENCODERS)
        )
    if retrieval:
        first = next(iter(retrieval.values()))
        lines += [
            "",
            f"retrieval: each held-out image ranks the {first['level']} texts of its fold's "
            f"held-out images; R@K = own text in the top K, P@K = top K texts of the same "
            f"{first['label_level']} ({first['n_queries']} queries); chance = a random "
            "ranking, blind = the best ranking that ignores the image",
            f"{'metric':<12}{'chance':<8}{'blind':<8}" + "".join(f"{e:<{width}}" for e in ENCODERS),
        ]
        metrics = [k for k in first if k.startswith(("i2t_R@", "i2t_P@")) and "ci95" not in k]
        for metric in metrics:
            refs = [first.get(name, {}).get(metric) for name in ("chance", "image_blind")]
            lines.append(
                f"{metric:<12}"
                + "".join(f"{'' if v is None else f'{v:.3f}':<8}" for v in refs)
                + "".join(
                    f"{_fmt_ci(r.get(metric), r.get(f'{metric}_ci95')):<{width}}"
                    for r in (retrieval.get(e, {}) for e in ENCODERS)
                )
            )
        hub = [retrieval.get(e, {}).get("top1_hub") for e in ENCODERS]
        hubs = ["" if h is None else f"{h:.0%}" for h in hub]
        lines.append(f"{'top-1 hub':<28}" + "".join(f"{h:<{width}}" for h in hubs))
        lines.append(
            "(top-1 hub: share of images whose first text is the one most often ranked first; "
            "100% = the ranking ignores the image)"
        )
    lines.append("")
    for c in summary["comparisons"]:
        if c["metric"] not in ("auc_macro", *RETRIEVAL_HEADLINE):
            continue
        diff = (
            "undefined"
            if c["diff"] is None
            else (f"{c['diff']:+.3f} [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}], p={c['p']:.3g}")
        )
        what = c["protocol"] if c["metric"] == "auc_macro" else f"retrieval {c['metric']}"
        lines.append(f"{c['a']} - {c['b']} ({c['level']}, {what}): {diff}")
    return "\n".join(lines)
