"""``mgll retrieve``: image-text retrieval on the test split.

Queries and gallery are the test images and the distinct texts they carry at the text level
(``Record.texts[level]``, ``--text-level``, default the task's ``--level``; identical strings
are one gallery entry, as many images share a class prompt). Similarity is the cosine of the
normalised projected image embedding and the text embedding.

- image -> text R@K: the share of image queries whose own text is among the K most similar;
- text -> image R@K: the share of text queries with at least one of their images in the top K;
- label-aware P@K (both directions): the share of the top K whose labels at the task's level
  overlap the query's (a text's labels are the union of the labels of the images carrying it),
  so a different wording of the right finding counts as right; a K beyond the gallery size
  counts the whole gallery. With free-text reports as the texts and a class level as the task
  (``--text-level notes --level organism``), P@K asks whether the retrieved report was written
  for an image of the same class.

95% CIs: image queries are resampled by patient (all images of a patient together), text
queries one text at a time. Beside the metrics, results.json has what rankings that ignore the
image score: ``chance`` (a random ranking) and ``image_blind`` (the best ranking that is the
same for every image: the texts most images carry, or share a label with, first), and
``top1_hub`` (the share of queries that rank the most often top-ranked text first). When many
images share a text (a class prompt, a note written for several images of a patient) the
image-blind ranking beats chance by far; an encoder has shown that it reads the image only
where it beats the image-blind ranking.
``OUT/retrieval.csv`` has one row per image query (rank of its own text, gallery size, hits),
which ``mgll compare`` pairs by image; ``OUT/recall.png`` plots R@K.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mgll.eval.encoders import text_tower_level
from mgll.eval.features import projected_features
from mgll.eval.options import DEFAULT_OPTIONS, EvalOptions
from mgll.eval.results import ResultsError, write_json
from mgll.eval.task import EvalData, TaskError
from mgll.io import atomic_write
from mgll.metrics import DEFAULT_RESAMPLES, mean_with_ci, retrieval_hits

DEFAULT_KS = (1, 5, 10)
RETRIEVAL_FILE = "retrieval.csv"


@dataclass
class RetrievalScores:
    """Image queries against the gallery of their distinct texts, as one similarity matrix."""

    similarity: np.ndarray  # (I, T) cosine of image and text embeddings
    gallery: list[str]  # the T distinct texts, in order of first appearance
    own_text: np.ndarray  # (I,) gallery index of each image's own text
    image_labels: np.ndarray  # (I, C) 0/1 labels the label-aware P@K is judged by
    text_labels: np.ndarray  # (T, C) union of the labels of the images carrying each text

    def hits(self, ks: Sequence[int] = DEFAULT_KS) -> dict[str, np.ndarray]:
        """Per-query hits of every metric and ``i2t_rank``
        (:func:`mgll.metrics.retrieval_hits`). P@K is NaN (not applicable) for a query without
        a label at the task's level (e.g. a multi-label row whose findings were all left out
        by ``--classes``); the means and CIs leave those queries out, as validation does."""
        out = retrieval_hits(
            self.similarity, self.own_text, self.image_labels, self.text_labels, ks
        )
        unlabelled = {
            "i2t": self.image_labels.sum(axis=1) == 0,
            "t2i": self.text_labels.sum(axis=1) == 0,
        }
        for key, values in out.items():
            if "_P@" in key:
                values[unlabelled[key[:3]]] = np.nan
        return out

    def references(self, ks: Sequence[int] = DEFAULT_KS) -> dict[str, np.ndarray]:
        """What rankings that ignore the image score, per image query, to read the hits against:

        - ``gallery``: the gallery size (a random ranking's R@K is K / size);
        - ``chance_P``: the share of the gallery whose labels overlap the query's (a random
          ranking's expected P@K);
        - ``blind_R@K`` / ``blind_P@K``: the hits of the best ranking that is the same for
          every image: texts ordered by how many queries carry them (for R@K) or share a label
          with them (for P@K). When many images share a text, this beats chance by far, and an
          encoder that ranks the common texts first for every image scores as well;
        - ``top1_hub``: the share of the gallery's queries that rank the most often top-ranked
          text first (1.0: the same text is ranked first for every image).
        """
        n_images, n_texts = self.similarity.shape
        overlap = (self.image_labels @ self.text_labels.T) > 0  # (I, T)
        unlabelled = self.image_labels.sum(axis=1) == 0
        out = {
            "gallery": np.full(n_images, float(n_texts)),
            "chance_P": np.where(unlabelled, np.nan, overlap.mean(axis=1)),
        }
        by_own = np.argsort(-np.bincount(self.own_text, minlength=n_texts), kind="stable")
        position = np.empty(n_texts, dtype=np.int64)
        position[by_own] = np.arange(n_texts)
        by_overlap = np.argsort(-overlap.sum(axis=0), kind="stable")
        for k in ks:
            out[f"blind_R@{k}"] = (position[self.own_text] < k).astype(float)
            blind = overlap[:, by_overlap[: min(k, n_texts)]].mean(axis=1)
            out[f"blind_P@{k}"] = np.where(unlabelled, np.nan, blind)
        top1 = np.bincount(self.similarity.argmax(axis=1), minlength=n_texts)
        out["top1_hub"] = np.full(n_images, top1.max() / max(n_images, 1))
        return out


def score_retrieval(
    model: Any,
    image_emb: np.ndarray,
    texts: Sequence[str],
    labels: np.ndarray,
    text_level: int,
    batch_size: int = 64,
) -> RetrievalScores:
    """Rank the distinct ``texts`` for every image: ``image_emb`` (I, D) projected image
    embeddings, ``texts`` each image's own text, embedded with ``model``'s text tower of level
    ``text_level`` (its only tower when it has one), ``labels`` (I, C) the images' labels."""
    if not texts:
        raise TaskError("no image query carries a text: nothing to retrieve")
    gallery = list(dict.fromkeys(texts))
    index = {t: j for j, t in enumerate(gallery)}
    own_text = np.array([index[t] for t in texts], dtype=np.int64)
    image_labels = np.asarray(labels).astype(int)
    text_labels = np.zeros((len(gallery), image_labels.shape[1]), dtype=int)
    for i, j in enumerate(own_text):
        text_labels[j] |= image_labels[i]

    tower_level = text_tower_level(model, text_level)
    with torch.no_grad():
        text = torch.cat(
            [
                model.encode_text(gallery[s : s + batch_size], level=tower_level).float().cpu()
                for s in range(0, len(gallery), batch_size)
            ]
        )
    text = torch.nn.functional.normalize(text, dim=-1)
    image = torch.nn.functional.normalize(torch.from_numpy(np.asarray(image_emb)).float(), dim=-1)
    return RetrievalScores(
        similarity=(image @ text.T).numpy(),
        gallery=gallery,
        own_text=own_text,
        image_labels=image_labels,
        text_labels=text_labels,
    )


def retrieval_texts(
    data: EvalData, rows: np.ndarray, text_level: str
) -> tuple[np.ndarray, list[str]]:
    """The rows that carry a text at ``text_level`` and those texts (a row without one is
    neither a query nor in the gallery)."""
    level = [lv.name for lv in data.records.levels].index(text_level)
    kept = [int(i) for i in rows if data.records.records[int(i)].texts[level]]
    texts = [data.records.records[i].texts[level][0] for i in kept]
    return np.asarray(kept, dtype=np.int64), texts


def _mean_defined(values: np.ndarray) -> float | None:
    """Mean over the queries where ``values`` is defined (None when it is nowhere)."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None


def write_retrieval_outputs(
    output_dir: str | Path,
    data: EvalData,
    rows: np.ndarray,
    texts: Sequence[str],
    hits: dict[str, np.ndarray],
    references: dict[str, np.ndarray],
    *,
    text_level: str,
    encoder: dict[str, Any],
    n_texts: int,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    notes: Sequence[str] = (),
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``results.json`` (each metric with its 95% CI, beside a random and the best image-blind
    ranking), ``retrieval.csv`` (one row per image query), ``recall.png`` and ``split.csv`` of
    retrieval over the image queries ``rows`` (their texts ``texts``); ``hits`` and
    ``references`` as :meth:`RetrievalScores.hits` / :meth:`RetrievalScores.references` give
    them (or their concatenation over galleries); ``n_texts`` is the number of gallery texts in
    all. Returns the results. Image-query CIs resample patients; text-query CIs resample texts."""
    patients = data.patients(rows)
    metrics = _retrieval_metrics(hits, patients, n_resamples, seed)
    chance, blind = _retrieval_baselines(hits, references)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_retrieval_csv(out / RETRIEVAL_FILE, data, rows, texts, hits, references["gallery"])
    data.write_split(out / "split.csv")
    _plot_recall(out / "recall.png", hits["i2t_rank"], references["gallery"])
    results = {
        "version": 1,
        "task": {
            "data": data.source,
            "level": text_level,
            "label_level": data.task.level,
            "classes": data.task.classes,
        },
        "encoder": encoder,
        "protocol": "retrieval",
        "n_test": len(rows),
        "n_patients_test": len(set(patients)),
        "n_texts": n_texts,
        "metrics": metrics,
        "chance": chance,
        "image_blind": blind,
        "top1_hub": float(np.mean(references["top1_hub"])),
        "details": dict(details or {}),
        "bootstrap": {
            "unit": "patient (image queries), text (text queries)",
            "resamples": n_resamples,
            "seed": seed,
        },
        "split": {**data.split_info, "file": "split.csv"},
        "seed": seed,
        "notes": list(notes),
    }
    write_json(out / "results.json", results)
    return results


def _retrieval_metrics(
    hits: dict[str, np.ndarray], patients: Sequence[Any], n_resamples: int, seed: int
) -> dict[str, Any]:
    """Each hit metric's mean with its 95% CI (image queries resample patients, text queries
    resample texts) and the median rank of an image's own text."""
    metrics: dict[str, Any] = {}
    for key, values in hits.items():
        if key == "i2t_rank":
            continue
        groups = patients if key.startswith("i2t") else list(range(len(values)))  # texts
        value, ci = mean_with_ci(values, groups, n_resamples=n_resamples, seed=seed)
        metrics[key], metrics[f"{key}_ci95"] = value, ci
    metrics["i2t_median_rank"] = float(np.median(hits["i2t_rank"]))
    return metrics


def _retrieval_baselines(
    hits: dict[str, np.ndarray], references: dict[str, np.ndarray]
) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """Per image-query metric: a random ranking's expected value and the image-blind one's."""
    gallery = references["gallery"]
    chance, blind = {}, {}
    for key in hits:
        if key.startswith("i2t_R@"):
            k = int(key.split("@")[1])
            chance[key] = float(np.mean(np.minimum(k, gallery) / gallery))
        elif key.startswith("i2t_P@"):
            chance[key] = _mean_defined(references["chance_P"])
        else:
            continue
        blind[key] = _mean_defined(references[key.replace("i2t_", "blind_")])
    return chance, blind


def _write_retrieval_csv(
    path: Path,
    data: EvalData,
    rows: np.ndarray,
    texts: Sequence[str],
    hits: dict[str, np.ndarray],
    gallery: np.ndarray,
) -> None:
    """``retrieval.csv``: one row per image query with its own text's rank and its hits."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    columns = [k for k in hits if k.startswith("i2t") and k != "i2t_rank"]
    writer.writerow(["image", "patient", "text", "rank_of_own_text", "gallery_size", *columns])
    images, patient_ids = data.image_ids(rows), data.patient_ids(rows)
    for i in range(len(rows)):
        writer.writerow(
            [
                images[i],
                patient_ids[i],
                texts[i],
                int(hits["i2t_rank"][i]),
                int(gallery[i]),
                *(f"{hits[c][i]:.6g}" for c in columns),
            ]
        )
    atomic_write(path, lambda tmp: tmp.write_text(buffer.getvalue(), encoding="utf-8"))


def read_retrieval_hits(folder: str | Path) -> dict[str, Any]:
    """A retrieval folder's per-image-query rows: images, patients, texts and the hit
    columns (``i2t_R@K``, ``i2t_P@K``) as float arrays."""
    path = Path(folder) / RETRIEVAL_FILE
    if not path.is_file():
        raise ResultsError(f"{path}: missing; is {folder} an output folder of mgll retrieve?")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or header[:3] != ["image", "patient", "text"]:
            raise ResultsError(f"{path}: the header must start with image,patient,text")
        rows = list(reader)
    columns = [h for h in header if h.startswith(("i2t_R@", "i2t_P@"))]
    try:
        hits = {c: np.array([float(r[header.index(c)]) for r in rows]) for c in columns}
    except (ValueError, IndexError):
        raise ResultsError(f"{path}: a row has a missing or non-numeric hit value") from None
    return {
        "images": [r[0] for r in rows],
        "patients": [r[1] for r in rows],
        "texts": [r[2] for r in rows],
        "hits": hits,
    }


def retrieval(
    model: Any,
    data: EvalData,
    output_dir: str | Path,
    options: EvalOptions = DEFAULT_OPTIONS,
    *,
    name: str,
    text_level: str | None = None,
    run_config: dict[str, Any] | None = None,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, Any]:
    """Retrieval on ``data``'s test split with ``model`` (an ``MGLLModel``): the texts of
    ``text_level`` (default: the task's level), label-aware P@K judged by the task's labels;
    writes ``results.json``, ``retrieval.csv``, ``recall.png`` and ``split.csv``."""
    encoder, features = projected_features(model, data, options, name=name, run_config=run_config)
    text_level = text_level or data.task.level
    names = [lv.name for lv in data.records.levels]
    if text_level not in names:
        raise TaskError(f"text level {text_level!r} is not a level of the data ({names})")
    rows = data.rows["test"]
    unreadable = int(features.unreadable[rows].sum())
    rows, texts = retrieval_texts(data, rows[~features.unreadable[rows]], text_level)
    if len(rows) == 0:
        raise TaskError(f"no test image carries a text at level {text_level!r}")
    scores = score_retrieval(
        model,
        features.features[rows],
        texts,
        data.y[rows],
        names.index(text_level),
        options.batch_size,
    )
    return write_retrieval_outputs(
        output_dir,
        data,
        rows,
        texts,
        scores.hits(ks),
        scores.references(ks),
        text_level=text_level,
        encoder=encoder.describe(),
        n_texts=len(scores.gallery),
        n_resamples=options.n_resamples,
        seed=options.seed,
        notes=[f"{unreadable} unreadable image(s) left out"] if unreadable else [],
    )


def _plot_recall(path: Path, ranks: np.ndarray, gallery: np.ndarray) -> None:
    """Image -> text R@K against K, and chance (K / gallery size, per query's gallery)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = np.arange(1, int(gallery.max()) + 1)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(ks, [(ranks <= k).mean() for k in ks], label=f"image -> text ({len(ranks)} queries)")
    chance = [float(np.mean(np.minimum(k, gallery) / gallery)) for k in ks]
    ax.plot(ks, chance, color="grey", linestyle=":", label="chance")
    ax.set(xlabel="K", ylabel="recall@K", title="retrieval (test)", xscale="log")
    ax.legend(fontsize="small")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def format_retrieval(results: dict[str, Any]) -> str:
    """Markdown table of the retrieval metrics, beside a random and the best image-blind
    ranking, and how often one text is ranked first."""
    chance = results.get("chance", {})
    blind = results.get("image_blind", {})
    lines = ["| metric | value | 95% CI | chance | image-blind |", "|---|---|---|---|---|"]
    for key, value in results["metrics"].items():
        if key.endswith("_ci95"):
            continue
        ci = results["metrics"].get(f"{key}_ci95")
        interval = "" if ci is None else f"[{ci[0]:.4f}, {ci[1]:.4f}]"
        refs = [f"{r[key]:.4f}" if r.get(key) is not None else "" for r in (chance, blind)]
        shown = "undefined" if value is None else f"{value:.4f}"
        lines.append(f"| {key} | {shown} | {interval} | {refs[0]} | {refs[1]} |")
    if "top1_hub" in results:
        lines.append(
            f"\nThe most often top-ranked text is first for {results['top1_hub']:.1%} of the "
            "image queries (100%: the ranking ignores the image)."
        )
    return "\n".join(lines)
