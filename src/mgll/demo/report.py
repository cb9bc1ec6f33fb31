"""The demo's report: one self-contained HTML file (plots embedded as PNG) that opens offline.

The demo gathers what it measured into :class:`ReportInputs` (plain arrays and dicts, no
file layout assumed) and :func:`write_report` turns it into ``report.html``: the comparison
and retrieval tables with confidence intervals, training loss curves, ROC curves, a 2-D map
of held-out image embeddings coloured by label, and retrieval examples (thumbnail and top
texts with scores).
Nothing in the page refers to another file or the network, so it can be mailed or archived.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mgll.data.records import RecordSet
from mgll.demo.evaluation import REPORT_DATA_FILE
from mgll.demo.settings import PRETRAINED, REPORT_FILE, Demo
from mgll.eval.results import read_predictions
from mgll.io import atomic_write
from mgll.metrics import comparison_verdict
from mgll.training.run_log import read_metrics


@dataclass
class RetrievalExample:
    """One held-out image and the texts an encoder ranked highest for it."""

    image: np.ndarray  # (H, W, 3) or (H, W) uint8 thumbnail
    truth: str  # the image's own text (or label) at the level shown
    texts: Sequence[tuple[str, float]]  # top texts with their similarity scores, best first
    correct: Sequence[bool] = ()  # per text: do its labels overlap the image's?


@dataclass
class EncoderReport:
    """What the report shows of one encoder (``random``, ``clip``, ``mgll``, ...)."""

    name: str
    loss_curve: Sequence[tuple[int, float]] = ()  # (step, training loss); empty: not trained
    roc_labels: np.ndarray | None = None  # (N, C) 0/1 test labels of the main level
    roc_scores: np.ndarray | None = None  # (N, C) the scores the AUC is computed from
    classes: Sequence[str] = ()
    embedding: np.ndarray | None = None  # (N, D) held-out image features
    embedding_labels: Sequence[str] = ()  # (N,) the label each point is coloured by
    retrieval: Sequence[RetrievalExample] = ()


@dataclass
class ReportInputs:
    """Everything the report shows; ``table``/``comparisons`` are the demo summary's rows."""

    title: str
    dataset: str
    table: Sequence[Mapping[str, Any]]
    comparisons: Sequence[Mapping[str, Any]] = ()
    encoders: Sequence[EncoderReport] = ()
    notes: Sequence[str] = ()  # plain sentences: split sizes, seeds, what this can't show
    metrics: Sequence[str] = ("auc_macro", "map", "accuracy")
    main_level: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)  # shown as a key/value list


def _png(fig: Any) -> str:
    """A matplotlib figure as a ``data:`` URI (and the figure closed)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _thumbnail(image: np.ndarray, size: int = 96) -> str:
    from PIL import Image

    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    picture = Image.fromarray(array)
    picture.thumbnail((size, size))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figures():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _format_value(row: Mapping[str, Any], metric: str) -> str:
    value = row.get(metric)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    text = f"{value:.3f}"
    ci = row.get(f"{metric}_ci95")
    if ci and all(c is not None and not math.isnan(c) for c in ci):
        text += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    return text


def _results_table(inputs: ReportInputs) -> str:
    shown = [row for row in inputs.table if row.get("protocol") != "retrieval"]
    head = "".join(  # "(95% CI)" only above a metric that carries one
        f"<th>{html.escape(m)}"
        + (" (95% CI)" if any(row.get(f"{m}_ci95") for row in shown) else "")
        + "</th>"
        for m in inputs.metrics
    )
    rows = []
    for row in shown:
        cells = "".join(f"<td>{html.escape(_format_value(row, m))}</td>" for m in inputs.metrics)
        rows.append(
            f"<tr><td>{html.escape(str(row.get('encoder', '')))}</td>"
            f"<td>{html.escape(str(row.get('level', '')))}</td>"
            f"<td>{html.escape(str(row.get('protocol', '')))}</td>{cells}</tr>"
        )
    return (
        "<table><tr><th>encoder</th><th>level</th><th>protocol</th>"
        f"{head}</tr>{''.join(rows)}</table>"
    )


def _retrieval_table(inputs: ReportInputs) -> str:
    """Retrieval rows (``protocol: retrieval``) as metrics x encoders, beside what a random and
    the best image-blind ranking score, and each encoder's top-1 hub share."""
    shown = [r for r in inputs.table if r.get("protocol") == "retrieval"]
    if not shown:
        return ""
    metrics = [k for k in shown[0] if k.startswith(("i2t_R@", "i2t_P@")) and "ci95" not in k]
    head = "".join(f"<th>{html.escape(str(r.get('encoder', '')))}</th>" for r in shown)
    rows = []
    for metric in metrics:
        refs = "".join(
            f"<td>{'' if v is None else f'{v:.3f}'}</td>"
            for v in (shown[0].get(name, {}).get(metric) for name in ("chance", "image_blind"))
        )
        cells = "".join(f"<td>{html.escape(_format_value(r, metric))}</td>" for r in shown)
        rows.append(f"<tr><td>{html.escape(metric)}</td>{refs}{cells}</tr>")
    if all(r.get("top1_hub") is not None for r in shown):
        hubs = "".join(f"<td>{r['top1_hub']:.0%}</td>" for r in shown)
        rows.append(f"<tr><td>top-1 hub</td><td></td><td></td>{hubs}</tr>")
    first = shown[0]
    return (
        "<h2>Retrieval on held-out patients</h2><p>Image &rarr; text: each held-out image ranks "
        f"the {html.escape(str(first.get('level', '')))} texts of its fold's held-out images. "
        "R@K: its own text is among the top K; P@K: the share of the top K written for images "
        f"of the same {html.escape(str(first.get('label_level', '')))} (95% patient-bootstrap "
        "CIs). Chance: a random ranking; image-blind: the best ranking that is the same for "
        "every image (the texts most images carry first), which an encoder must beat to show "
        "that it reads the image; top-1 hub: the share of images whose first text is the one "
        "most often ranked first (100%: the ranking ignores the image).</p>"
        "<table><tr><th>metric</th><th>chance</th><th>image-blind</th>"
        f"{head}</tr>{''.join(rows)}</table>"
    )


def _comparison_table(comparisons: Sequence[Mapping[str, Any]]) -> str:
    if not comparisons:
        return ""
    rows = []
    for c in comparisons:
        lo, hi = c.get("ci95") or (math.nan, math.nan)
        verdict = comparison_verdict(c["a"], c["b"], c.get("ci95")) or "no clear difference"
        rows.append(
            "<tr>"
            + "".join(
                f"<td>{html.escape(str(v))}</td>"
                for v in (
                    f"{c['a']} − {c['b']}",
                    c.get("level", ""),
                    c.get("protocol", ""),
                    c.get("metric", ""),
                    f"{c['diff']:+.3f}",
                    f"[{lo:+.3f}, {hi:+.3f}]",
                    f"{c['p']:.3g}" if c.get("p") is not None else "n/a",
                    verdict,
                )
            )
            + "</tr>"
        )
    return (
        "<h2>Paired comparisons</h2><p>Differences on the same held-out images, with a paired "
        "bootstrap over patients.</p><table><tr><th>difference</th><th>level</th>"
        "<th>protocol</th><th>metric</th><th>diff</th><th>95% CI</th><th>p</th><th>reading</th>"
        f"</tr>{''.join(rows)}</table>"
    )


def _loss_figure(encoders: Sequence[EncoderReport]) -> str | None:
    curves = [e for e in encoders if len(e.loss_curve) >= 2]  # one logged step is no curve
    if not curves:
        return None
    plt = _figures()
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.0), squeeze=False)
    for ax, enc in zip(axes[0], curves, strict=True):
        steps, losses = zip(*enc.loss_curve, strict=True)
        ax.plot(steps, losses, marker="o" if len(steps) < 20 else None)
        ax.set_title(f"{enc.name}: training loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
    return _png(fig)


def _loss_note(encoders: Sequence[EncoderReport]) -> str:
    """What a run with a single logged loss (a --quick run) shows instead of a one-dot plot."""
    single = [e for e in encoders if len(e.loss_curve) == 1]
    if not single:
        return ""
    logged = "; ".join(
        f"{e.name} {e.loss_curve[0][1]:.4f} at step {e.loss_curve[0][0]}" for e in single
    )
    return (
        "<p class='note'>Training loss logged once per run, too few steps for a curve (a "
        f"--quick run trains one epoch): {html.escape(logged)}.</p>"
    )


def class_colours(classes: Sequence[str]) -> dict[str, str]:
    """One matplotlib colour per class, in the task's class order: the ROC curves and the
    embedding map colour a class alike (a label outside ``classes`` is drawn grey)."""
    return {str(name): f"C{i % 10}" for i, name in enumerate(classes)}


def _roc_figure(encoders: Sequence[EncoderReport]) -> str | None:
    from sklearn.metrics import roc_curve

    shown = [e for e in encoders if e.roc_labels is not None and e.roc_scores is not None]
    if not shown:
        return None
    plt = _figures()
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 4.0), squeeze=False)
    for ax, enc in zip(axes[0], shown, strict=True):
        labels, scores = np.asarray(enc.roc_labels), np.asarray(enc.roc_scores)
        colour = class_colours(enc.classes)
        for c, name in enumerate(enc.classes):
            y = labels[:, c]
            if y.min() == y.max():  # a class absent from the test set has no curve
                continue
            fpr, tpr, _ = roc_curve(y, scores[:, c])
            ax.plot(fpr, tpr, label=str(name), color=colour[str(name)])
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
        ax.set_title(f"{enc.name}: ROC (test)")
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def _embedding_figure(encoders: Sequence[EncoderReport]) -> str | None:
    from sklearn.decomposition import PCA

    shown = [e for e in encoders if e.embedding is not None and len(e.embedding) >= 2]
    if not shown:
        return None
    plt = _figures()
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 4.0), squeeze=False)
    for ax, enc in zip(axes[0], shown, strict=True):
        features = np.asarray(enc.embedding, dtype=np.float64)
        norms = np.linalg.norm(features, axis=1, keepdims=True)
        points = PCA(n_components=2, random_state=0).fit_transform(
            features / np.maximum(norms, 1e-12)
        )
        labels = np.asarray([str(x) for x in enc.embedding_labels])
        colour = class_colours(enc.classes)
        present = set(labels.tolist())
        ordered = [c for c in colour if c in present] + sorted(present - set(colour))
        for name in ordered:
            mask = labels == name
            ax.scatter(
                points[mask, 0], points[mask, 1], s=12, label=name, color=colour.get(name, "grey")
            )
        ax.set_title(f"{enc.name}: held-out images (PCA)")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=7)
    return _png(fig)


def _retrieval_section(encoders: Sequence[EncoderReport]) -> str:
    blocks = []
    for enc in encoders:
        if not enc.retrieval:
            continue
        rows = []
        for example in enc.retrieval:
            marks = list(example.correct) or [None] * len(example.texts)
            items = "".join(
                f"<li class='{'hit' if ok else 'miss' if ok is False else ''}'>"
                f"{score:.3f} — {html.escape(text)}</li>"
                for (text, score), ok in zip(example.texts, marks, strict=True)
            )
            rows.append(
                f"<tr><td><img alt='held-out image' src='{_thumbnail(example.image)}'></td>"
                f"<td><b>truth:</b> {html.escape(example.truth)}<ol>{items}</ol></td></tr>"
            )
        blocks.append(f"<h3>{html.escape(enc.name)}</h3><table>{''.join(rows)}</table>")
    if not blocks:
        return ""
    return (
        "<h2>Retrieval examples</h2><p>Held-out images and the texts each encoder ranks "
        "highest (cosine similarity; green: the text's label matches the image's).</p>"
        + "".join(blocks)
    )


_STYLE = """
body { font-family: sans-serif; margin: 2em auto; padding: 0 1.5em; max-width: 1400px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
li.hit { color: #1a7f37; } li.miss { color: #a40e26; }
img.plot { max-width: 100%; }
.note { color: #555; }
"""


def render_report(inputs: ReportInputs) -> str:
    """The report as one HTML string; every plot and thumbnail is an embedded PNG."""
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(inputs.title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(inputs.title)}</h1>",
        f"<p>Dataset: <b>{html.escape(inputs.dataset)}</b></p>",
    ]
    parts.extend(f"<p class='note'>{html.escape(note)}</p>" for note in inputs.notes)
    parts.append("<h2>Results on held-out patients</h2>")
    parts.append(_results_table(inputs))
    parts.append(_retrieval_table(inputs))
    parts.append(_comparison_table(inputs.comparisons))
    figures = (
        ("Training loss", _loss_figure(inputs.encoders)),
        (
            f"ROC curves{f' ({inputs.main_level})' if inputs.main_level else ''}",
            _roc_figure(inputs.encoders),
        ),
        (
            "Held-out image embeddings, coloured by label",
            _embedding_figure(inputs.encoders),
        ),
    )
    for heading, uri in figures:
        if uri is not None:
            alt = html.escape(heading)
            parts.append(f"<h2>{alt}</h2><img class='plot' alt='{alt}' src='{uri}'>")
    parts.append(_loss_note(inputs.encoders))
    parts.append(_retrieval_section(inputs.encoders))
    if inputs.extra:
        items = "".join(
            f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(plain_value(v))}</td></tr>"
            for k, v in inputs.extra.items()
        )
        parts.append(f"<h2>Run details</h2><table>{items}</table>")
    parts.append("<p class='note'>Research demo on small public data: not for clinical use.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def plain_value(value: Any) -> str:
    """A run detail as a reader writes it: yes/no, ``key value`` pairs, list items by commas
    (never Python's dict or bool syntax)."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {plain_value(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(plain_value(v) for v in value)
    return "" if value is None else str(value)


def write_report(path: str | Path, inputs: ReportInputs) -> Path:
    """Write :func:`render_report` atomically to ``path`` (e.g. ``OUT/report.html``)."""
    path = Path(path)
    text = render_report(inputs)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def _retrieval_examples(
    data: Any, records: Any, names: Sequence[str], text_index: int
) -> list[RetrievalExample]:
    """The report data's query images with the texts (level ``text_index``) ranked highest,
    each text shown with the main-level label ``names`` of the image carrying it."""
    from PIL import Image

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
                truth=f"{names[i]}: {records.records[i].texts[text_index][0]}",
                texts=[
                    (f"{names[j]}: {records.records[j].texts[text_index][0]}", score)
                    for j, score in shown
                ],
                correct=[names[j] == names[i] for j, _ in shown],
            )
        )
    return examples


def write_demo_report(demo: Demo, records: RecordSet, summary: Mapping[str, Any]) -> Path:
    """``OUT/report.html`` from the demo's outputs (see :mod:`mgll.demo.report`)."""
    level = demo.recipe.main_level
    index = [lv.name for lv in records.levels].index(level)
    text_level = next(r["level"] for r in summary["table"] if r["protocol"] == "retrieval")
    shown_text = [lv.name for lv in records.levels].index(text_level)
    names = [r.labels[index][0] if r.labels[index] else "(none)" for r in records.records]
    encoders = []
    for encoder in demo.encoders:
        base = demo.out / encoder
        curve: list[tuple[int, float]] = []
        if encoder in PRETRAINED:
            rows = read_metrics(demo.run_dir(encoder, 0))
            curve = [(r["step"], r["loss"]) for r in rows if r.get("kind") == "train"]
        predictions = read_predictions(base / f"probe-{level}")
        data = np.load(base / REPORT_DATA_FILE)
        examples = _retrieval_examples(data, records, names, shown_text)
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
        title=f"mgll demo: {demo.encoders[0]} vs CLIP vs MGLL on {summary['dataset']}",
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
            f"distinct {text_level} texts of the same fold's held-out images.",
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
