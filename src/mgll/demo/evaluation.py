"""The demo's evaluation of one encoder, through :mod:`mgll.eval`: per fold, the linear probe
(C by inner patient CV, :func:`mgll.eval.probe.fit_probe`), zero-shot
(:func:`mgll.eval.zeroshot.build_zero_shot_classifier`) and retrieval
(:func:`mgll.eval.retrieve.score_retrieval`) with the fold's model on the fold's held-out
images, the held-out outputs pooled into ordinary ``mgll.eval`` folders
(``OUT/<encoder>/probe-<level>``, ``zeroshot-<level>``, ``retrieval-<finest level>``), and what
the report shows (``OUT/<encoder>/report_data.npz``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mgll.data.records import RecordSet
from mgll.demo.folds import fold_models, fold_task, retrieval_level
from mgll.demo.progress import Progress
from mgll.demo.settings import C_GRID, Demo, DemoError
from mgll.eval.encoders import encoder_from_model
from mgll.eval.features import extract_features
from mgll.eval.options import EvalOptions
from mgll.eval.probe import INNER_FOLDS, fit_probe
from mgll.eval.results import RESULTS_FILE, ResultsError, read_results, write_classification_outputs
from mgll.eval.retrieve import retrieval_texts, score_retrieval, write_retrieval_outputs
from mgll.eval.zeroshot import build_zero_shot_classifier
from mgll.io import atomic_write

REPORT_DATA_FILE = "report_data.npz"
RETRIEVAL_EXAMPLES = 3  # held-out images shown with their top texts in the report
RETRIEVAL_TOP = 3
RETRIEVAL_KS = (1, 5, 10)
# Chosen before the first retrieval measurement: the comparisons printed and shown first.
RETRIEVAL_HEADLINE = ("i2t_R@5", "i2t_P@5")


def _retrieval_queries(records: RecordSet, candidates: np.ndarray, level: str) -> list[int]:
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
    records: RecordSet,
    fold: np.ndarray,
    models: Sequence[Any],
    embs: Sequence[Any],
) -> list[tuple[np.ndarray, Any]]:
    """Image -> text retrieval of every fold's held-out images among the distinct texts of the
    retrieved level (:func:`~mgll.demo.folds.retrieval_level`) of the same held-out images
    (the fold's model, which never saw them), pooled over folds into
    ``OUT/<encoder>/retrieval-<level>``; returns each fold's (rows, scores) (a fold whose
    held-out images carry no such text has no queries and is left out)."""
    text_name = retrieval_level(records, demo.folds)
    text_level = [lv.name for lv in records.levels].index(text_name)
    everything = np.arange(len(records.records))
    per_fold, pooled = [], {}
    for k, model in enumerate(models):
        part = fold_task(
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
    data = fold_task(demo, records, demo.recipe.main_level, everything[:0], everything)
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


def evaluated(demo: Demo, encoder: str, records: RecordSet, levels: Sequence[str]) -> bool:
    """Whether every output of ``encoder``'s evaluation exists (a resumed demo skips it)."""
    base = demo.out / encoder
    wanted = [base / f"{p}-{lv}" / RESULTS_FILE for lv in levels for p in ("probe", "zeroshot")]
    retrieval = base / f"retrieval-{retrieval_level(records, demo.folds)}"
    if not all(w.is_file() for w in [*wanted, base / REPORT_DATA_FILE]):
        return False
    try:  # retrieval outputs written before the image-blind references are redone
        return "image_blind" in read_results(retrieval)
    except ResultsError:
        return False


def _fold_features(
    demo: Demo, encoder: str, records: RecordSet, models: Sequence[Any]
) -> tuple[list[Any], list[Any]]:
    """Per fold model, the pre-projection features and the projected embeddings of every
    image (a model shared by all folds, such as CLIP's, is read once)."""
    options = EvalOptions(cache_dir=False, quiet=True)  # once per fold model: no cache
    feats, embs = [], []
    for k, model in enumerate(models):
        if k > 0 and model is models[0]:
            feats.append(feats[0])
            embs.append(embs[0])
            continue
        enc = encoder_from_model(model, f"{encoder}/fold{k}")
        feats.append(extract_features(enc, records, demo.folder, options))
        embs.append(extract_features(enc, records, demo.folder, options, projected=True))
    return feats, embs


def _held_out_scores(
    demo: Demo,
    records: RecordSet,
    level: str,
    n_classes: int,
    fold: np.ndarray,
    models: Sequence[Any],
    feats: Sequence[Any],
    embs: Sequence[Any],
) -> tuple[np.ndarray, np.ndarray, list[float], set[str]]:
    """Probe and zero-shot scores of every image at ``level``, each from the model of the
    fold that held it out; the C each fold's probe chose and the prompt sources used."""
    everything = np.arange(len(records.records))
    probe = np.zeros((len(everything), n_classes))
    zeroshot = np.zeros_like(probe)
    chosen, sources = [], set()
    for k, model in enumerate(models):
        part = fold_task(demo, records, level, everything[fold != k], everything[fold == k])
        held_out = part.rows["test"]
        fitted = fit_probe(
            feats[k].features,
            part,
            part.rows["train"],
            selection="cv",
            c_grid=C_GRID,
            seed=demo.seed,
        )
        probe[held_out] = fitted.scores(feats[k].features[held_out])
        chosen.append(fitted.selection["C"])
        classifier = build_zero_shot_classifier(model, part)
        sources.add(classifier.source)
        zeroshot[held_out] = classifier.scores(embs[k].features[held_out])
    return probe, zeroshot, chosen, sources


def evaluate_encoder(
    demo: Demo,
    encoder: str,
    records: RecordSet,
    fold: np.ndarray,
    levels: Sequence[str],
    progress: Progress,
) -> bool:
    """Probe, zero-shot and retrieval outputs of one encoder for every level, each step said
    and timed by ``progress`` (:class:`~mgll.demo.progress.Progress`); False when all existed
    (a resumed demo)."""
    base = demo.out / encoder
    if evaluated(demo, encoder, records, levels):
        return False
    text = retrieval_level(records, demo.folds)
    with progress.step("retrieval", f"{encoder}: features of each fold model, {text} retrieval"):
        models = fold_models(demo, encoder)
        feats, embs = _fold_features(demo, encoder, records, models)
        fold_scores = _retrieval(demo, encoder, records, fold, models, embs)
        candidates = np.concatenate([rows for rows, _ in fold_scores])
        queries = _retrieval_queries(records, candidates, demo.recipe.main_level)
        _save_report_data(base, fold, queries, fold_scores, feats[0].features)
    everything = np.arange(len(records.records))
    for level in levels:
        data = fold_task(demo, records, level, everything[:0], everything)
        test = data.rows["test"]
        with progress.step(level, f"{encoder}: {level} linear probe and zero-shot, per fold"):
            probe, zeroshot, chosen, sources = _held_out_scores(
                demo, records, level, len(data.task.classes), fold, models, feats, embs
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
