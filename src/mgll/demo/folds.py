"""The demo's data and folds: records with patient groups, patient-level folds, one
pretraining run per encoder and fold (and what each fold trained on), the fold models and
each fold's task.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mgll.data.records import RecordSet
from mgll.data.splits import write_split_file
from mgll.demo.progress import Progress
from mgll.demo.settings import PRETRAINED, Demo, DemoError
from mgll.eval.task import EvalData, build_task, scorable_classes
from mgll.models import create_model
from mgll.process import seed_everything
from mgll.training import checkpoint as ckpt
from mgll.training.checkpoint import load_model
from mgll.training.trainer import SUMMARY_FILE as RUN_SUMMARY
from mgll.training.trainer import train


def level_kinds(records: RecordSet, folds: int) -> dict[str, str]:
    """What each level is to the demo, from its distinct values against the images a fold holds
    out: ``label`` (2 to :func:`~mgll.eval.task.scorable_classes` classes: probed and
    zero-shot), ``text`` (more classes than a fold's held-out images can score: free text, for
    retrieval) or ``single`` (one class: nothing to score)."""
    kinds = {}
    for g, level in enumerate(records.levels):
        labelled = sum(1 for r in records.records if r.labels[g])
        classes = len(level.vocabulary)
        if classes > scorable_classes(labelled // folds):
            kinds[level.name] = "text"
        else:
            kinds[level.name] = "label" if classes >= 2 else "single"
    return kinds


def classification_levels(records: RecordSet, folds: int = 5) -> list[str]:
    """The levels the demo probes (and scores zero-shot): its ``label`` levels."""
    return [name for name, kind in level_kinds(records, folds).items() if kind == "label"]


def retrieval_level(records: RecordSet, folds: int = 5) -> str:
    """The level whose texts the demo retrieves: the finest free-text level, else the finest."""
    texts = [name for name, kind in level_kinds(records, folds).items() if kind == "text"]
    return texts[-1] if texts else records.levels[-1].name


def check_main_level(records: RecordSet, level: str, folds: int) -> None:
    """DemoError (one line) unless ``level`` is a label the demo can probe and fold on."""
    g = [lv.name for lv in records.levels].index(level)
    kind = level_kinds(records, folds)[level]
    if kind == "label":
        return
    labels = ", ".join(classification_levels(records, folds)) or "none of them"
    classes = len(records.levels[g].vocabulary)
    held_out = sum(1 for r in records.records if r.labels[g]) // folds
    why = (
        f"{classes} distinct values for {held_out} held-out images per fold: more classes "
        f"than a classifier can score (at most {scorable_classes(held_out)}); it is free text, "
        "which the demo scores by retrieval"
        if kind == "text"
        else "a single class: nothing to probe"
    )
    raise DemoError(f"--level {level!r}: {why}; give a label level to probe ({labels})")


def patient_folds(records: RecordSet, level: str, k: int, seed: int) -> np.ndarray:
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


def write_folds(demo: Demo, records: RecordSet, fold: np.ndarray) -> None:
    """``OUT/folds/fold<k>.csv``: fold k's held-out patients as test, the rest as train."""
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


def fold_models(demo: Demo, encoder: str) -> list[Any]:
    """The encoder's model of every fold: the seeded initial model for the start encoder
    (``random`` or ``imagenet``: the weights every pretraining starts from, the same for all
    folds), else the fold's pretrained run."""
    if encoder not in PRETRAINED:
        seed_everything(demo.seed)  # as the trainer does right before building the model
        model = create_model(demo.config("mgll", 0).model)
        return [model.eval()] * demo.folds
    return [load_model(demo.run_dir(encoder, k))[0] for k in range(demo.folds)]


def fold_task(
    demo: Demo, records: RecordSet, level: str, train_rows: np.ndarray, test_rows: np.ndarray
) -> Any:
    """The task of ``level`` on one fold (or, ``train_rows`` empty, on every held-out image
    pooled): the usable rows of ``train_rows`` and ``test_rows``, no validation part."""
    task, y, usable = build_task(records, level)
    rows = {
        "train": np.asarray([i for i in train_rows if usable[i]], dtype=np.int64),
        "test": np.asarray([i for i in test_rows if usable[i]], dtype=np.int64),
    }
    return EvalData.from_rows(
        records,
        demo.folder,
        task,
        y,
        rows,
        source=str(demo.folder),
        split_info={
            "from": f"{demo.folds}-fold patient cross-validation, held-out predictions pooled",
            "settings": {"folds": demo.folds, "seed": demo.seed},
            "seed": demo.seed,
        },
        split_indices={"test": [int(i) for i in test_rows]},
    )


def pretrain_folds(demo: Demo, encoders: tuple[str, ...], progress: Progress) -> dict[str, float]:
    """Pretrain (or resume, or keep) every encoder once per fold, each on its fold's training
    patients only (``OUT/folds/fold<k>.csv``); returns each encoder's seconds over folds."""
    seconds: dict[str, float] = {}
    for encoder in encoders:
        seconds[encoder] = 0.0
        for k in range(demo.folds):
            finished = (demo.run_dir(encoder, k) / RUN_SUMMARY).is_file()
            what = f"{encoder} fold {k + 1}/{demo.folds}"
            progress.say("pretrain", what + (" (finished earlier)" if finished else ""))
            took, ran = pretrain_run(
                demo.config(encoder, k), demo.data_root, demo.run_dir(encoder, k)
            )
            seconds[encoder] += took
            if not finished:
                progress.done("run", took if ran else None)
    return seconds
