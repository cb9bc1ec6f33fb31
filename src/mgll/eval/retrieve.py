"""``mgll retrieve``: image-text retrieval on the test split.

Queries and gallery are the test images and the distinct texts they carry at the chosen level
(``Record.texts[level]``; identical strings are one gallery entry, as many images share a class
prompt). Similarity is the cosine of the normalised projected image embedding and the text
embedding.

- image -> text R@K: the share of image queries whose own text is among the K most similar;
- text -> image R@K: the share of text queries with at least one of their images in the top K;
- label-aware P@K (both directions): the share of the top K whose labels at the level overlap
  the query's (a text's labels are the union of the labels of the images carrying it), so a
  different wording of the right finding counts as right; a K beyond the gallery size counts
  the whole gallery.

95% CIs: image queries are resampled by patient (all images of a patient together), text
queries one text at a time. ``OUT/retrieval.csv`` has one row per image query (rank of its own
text, hits); ``OUT/recall.png`` plots R@K.
"""

from __future__ import annotations

import argparse
import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEFAULT_KS = (1, 5, 10)


def _ci(values: np.ndarray, groups: list[np.ndarray], n_resamples: int, seed: int) -> list[float]:
    from mgll.metrics import bootstrap_indices

    means = [float(values[rows].mean()) for rows in bootstrap_indices(groups, n_resamples, seed)]
    low, high = np.percentile(means, [2.5, 97.5])
    return [float(low), float(high)]


def retrieval_metrics(
    similarity: np.ndarray,
    own_text: np.ndarray,
    image_labels: np.ndarray,
    text_labels: np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, np.ndarray]:
    """Per-query hit arrays (float, one entry per query) of every retrieval metric.

    ``similarity`` (I, T) images x texts; ``own_text`` (I,) the gallery index of each image's
    text; ``image_labels`` (I, C) and ``text_labels`` (T, C) 0/1 label matrices.
    """
    n_images, n_texts = similarity.shape
    out: dict[str, np.ndarray] = {}
    i2t = np.argsort(-similarity, axis=1, kind="stable")
    rank_of_own = np.argmax(i2t == own_text[:, None], axis=1)  # 0-based
    t2i = np.argsort(-similarity.T, axis=1, kind="stable")
    owner = np.zeros((n_texts, n_images), dtype=bool)
    owner[own_text, np.arange(n_images)] = True
    first_own_image = np.array([np.argmax(owner[t, t2i[t]]) for t in range(n_texts)])
    overlap = (image_labels @ text_labels.T) > 0  # (I, T)
    for k in ks:
        out[f"i2t_R@{k}"] = (rank_of_own < k).astype(float)
        out[f"t2i_R@{k}"] = (first_own_image < k).astype(float)
        kk_t, kk_i = min(k, n_texts), min(k, n_images)
        out[f"i2t_P@{k}"] = np.take_along_axis(overlap, i2t[:, :kk_t], axis=1).mean(1)
        out[f"t2i_P@{k}"] = np.take_along_axis(overlap.T, t2i[:, :kk_i], axis=1).mean(1)
    out["i2t_rank"] = rank_of_own.astype(float) + 1
    return out


def retrieval(
    model: Any,
    data: Any,
    output_dir: str | Path,
    *,
    name: str,
    run_config: dict[str, Any] | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    seed: int = 0,
    n_resamples: int = 1000,
    cache_dir: str | Path | bool | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    precision: str = "fp32",
    progress: bool = True,
) -> dict[str, Any]:
    """Retrieval on ``data``'s test split with ``model`` (an ``MGLLModel``); writes
    ``results.json``, ``retrieval.csv``, ``recall.png`` and ``split.csv``; returns results."""
    from mgll.eval.encoders import encoder_from_model
    from mgll.eval.features import extract_features
    from mgll.eval.results import write_json
    from mgll.io import atomic_write
    from mgll.metrics import patient_groups

    model = model.eval()
    encoder = encoder_from_model(model, name, run_config)
    features = extract_features(
        encoder,
        data.records,
        data.folder,
        projected=True,
        batch_size=batch_size,
        num_workers=num_workers,
        cache_dir=cache_dir,
        precision=precision,
        progress=progress,
    )
    rows = data.rows["test"]
    rows = rows[~features.unreadable[rows]]
    level = [lv.name for lv in data.records.levels].index(data.task.level)
    texts = [data.records.records[int(i)].texts[level][0] for i in rows]
    gallery = list(dict.fromkeys(texts))
    index = {t: j for j, t in enumerate(gallery)}
    own_text = np.array([index[t] for t in texts])
    image_labels = data.y[rows].astype(int)
    text_labels = np.zeros((len(gallery), image_labels.shape[1]), dtype=int)
    for i, j in enumerate(own_text):
        text_labels[j] |= image_labels[i]

    tower_level = level if model.text_per_level and level < len(model.text_towers) else 0
    with torch.no_grad():
        text_emb = torch.cat(
            [
                model.encode_text(gallery[s : s + batch_size], level=tower_level).float().cpu()
                for s in range(0, len(gallery), batch_size)
            ]
        )
    text_emb = torch.nn.functional.normalize(text_emb, dim=-1)
    image_emb = torch.nn.functional.normalize(
        torch.from_numpy(features.features[rows]).float(), dim=-1
    )
    similarity = (image_emb @ text_emb.T).numpy()
    hits = retrieval_metrics(similarity, own_text, image_labels, text_labels, ks)

    image_groups = patient_groups(data.patients(rows))
    text_groups = [np.array([j]) for j in range(len(gallery))]
    metrics: dict[str, Any] = {}
    for key, values in hits.items():
        if key == "i2t_rank":
            continue
        groups = image_groups if key.startswith("i2t") else text_groups
        metrics[key] = float(values.mean())
        metrics[f"{key}_ci95"] = _ci(values, groups, n_resamples, seed)
    metrics["i2t_median_rank"] = float(np.median(hits["i2t_rank"]))

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    columns = [k for k in hits if k.startswith("i2t") and k != "i2t_rank"]
    writer.writerow(["image", "patient", "text", "rank_of_own_text", *columns])
    images, patients = data.image_ids(rows), data.patient_ids(rows)
    for i in range(len(rows)):
        writer.writerow(
            [
                images[i],
                patients[i],
                texts[i],
                int(hits["i2t_rank"][i]),
                *(f"{hits[c][i]:.6g}" for c in columns),
            ]
        )
    atomic_write(out / "retrieval.csv", lambda tmp: tmp.write_text(buffer.getvalue()))
    data.write_split(out / "split.csv")
    _plot_recall(out / "recall.png", hits, len(gallery), len(rows))
    results = {
        "version": 1,
        "task": {"data": data.source, "level": data.task.level, "classes": data.task.classes},
        "encoder": encoder.describe(),
        "protocol": "retrieval",
        "n_test": len(rows),
        "n_patients_test": len(image_groups),
        "n_texts": len(gallery),
        "metrics": metrics,
        "bootstrap": {
            "unit": "patient (image queries), text (text queries)",
            "resamples": n_resamples,
            "seed": seed,
        },
        "split": {**data.split_info, "file": "split.csv"},
        "seed": seed,
        "notes": (
            [f"{int(features.unreadable.sum())} unreadable image(s) left out"]
            if features.unreadable.any()
            else []
        ),
    }
    write_json(out / "results.json", results)
    return results


def _plot_recall(path: Path, hits: dict[str, np.ndarray], n_texts: int, n_images: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mgll.io import atomic_write

    ranks = hits["i2t_rank"]
    ks = np.arange(1, n_texts + 1)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(ks, [(ranks <= k).mean() for k in ks], label=f"image -> text ({n_images} queries)")
    ax.plot(ks, ks / n_texts, color="grey", linestyle=":", label="chance")
    ax.set(xlabel="K", ylabel="recall@K", title="retrieval (test)", xscale="log")
    ax.legend(fontsize="small")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def format_retrieval(results: dict[str, Any]) -> str:
    """Markdown table of the retrieval metrics."""
    lines = ["| metric | value | 95% CI |", "|---|---|---|"]
    for key, value in results["metrics"].items():
        if key.endswith("_ci95"):
            continue
        ci = results["metrics"].get(f"{key}_ci95")
        interval = "" if ci is None else f"[{ci[0]:.4f}, {ci[1]:.4f}]"
        lines.append(f"| {key} | {value:.4f} | {interval} |")
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``retrieve`` sub-command."""
    from mgll.eval.cli import add_run_arguments, add_task_arguments
    from mgll.eval.zeroshot import add_model_arguments

    parser = subparsers.add_parser(
        "retrieve",
        help="image-text retrieval (R@K, label-aware P@K)",
        description="Image->text and text->image retrieval on the test split with the texts "
        "of one level: R@K and label-aware P@K with bootstrap 95% CIs.",
    )
    add_model_arguments(parser)
    add_task_arguments(parser)
    add_run_arguments(parser)
    parser.add_argument(
        "--k", default="1,5,10", metavar="K[,K...]", help="cut-offs K (default 1,5,10)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``mgll retrieve``."""
    from mgll.eval.cli import run_safely

    def body() -> int:
        from mgll.eval.cli import load_task, resolve_device, run_options
        from mgll.eval.zeroshot import load_run_model

        try:
            ks = [int(k) for k in args.k.split(",") if k.strip()]
        except ValueError:
            raise ValueError(f"--k: {args.k!r} is not a list of integers") from None
        if not ks or min(ks) < 1:
            raise ValueError(f"--k: {args.k!r}: cut-offs must be positive integers")
        model, config = load_run_model(args.model, resolve_device(args.device))
        data = load_task(args, config)
        results = retrieval(
            model,
            data,
            args.output_dir,
            name=str(args.model),
            run_config=config,
            ks=ks,
            **run_options(args),
        )
        print(format_retrieval(results))
        print(f"wrote {args.output_dir}")
        return 0

    return run_safely("retrieve", body)
