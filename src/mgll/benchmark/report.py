"""The benchmark's page: one self-contained HTML file (plots embedded as PNG) that opens offline.

It shows the table (tasks x encoders, the paper's numbers beside), the paired comparisons, one
plot per (task, protocol) of each encoder's value against the label fraction with its pooled
95% interval and every seed's own value, what was not run and why, and the run settings.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mgll.metrics import comparison_verdict

STYLE = """
body { font-family: sans-serif; margin: 2em auto; padding: 0 1.5em; max-width: 1400px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 4px 8px; text-align: left; }
th { background: #f3f3f3; }
img.plot { max-width: 100%; }
.note { color: #555; }
.better { color: #1a7f37; } .worse { color: #a40e26; }
"""


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def _interval(entry: Mapping[str, Any], key: str) -> str:
    value = entry.get(key)
    if value is None:
        return "n/a"
    ci = entry.get("ci95")
    return f"{_pct(value)} [{_pct(ci[0])}, {_pct(ci[1])}]" if ci else _pct(value)


def _table(rows: Sequence[Mapping[str, Any]], encoders: Sequence[str]) -> str:
    index = {(r["task"], r["protocol"], r["label_fraction"], r["encoder"]): r for r in rows}
    keys = list(dict.fromkeys((r["task"], r["protocol"], r["label_fraction"]) for r in rows))
    head = "".join(f"<th>{html.escape(e)}</th>" for e in encoders)
    lines = []
    for task, protocol, fraction in keys:
        cells = [index.get((task, protocol, fraction, e)) for e in encoders]
        some = next(c for c in cells if c is not None)
        shown = "".join(
            f"<td>{html.escape(_interval(c, 'value'))} (n={len(c['seeds'])})</td>"
            if c and c["seeds"]
            else f"<td>{'skipped' if c else ''}</td>"
            for c in cells
        )
        lines.append(
            f"<tr><td>{html.escape(task)}</td><td>{html.escape(protocol)}</td>"
            f"<td>{fraction:g}</td><td>{html.escape(some['metric'])}</td>{shown}"
            f"<td>{_pct(some['paper'])}</td>"
            f"<td>{_pct(some['paper_other'].get('CLIP'))}</td></tr>"
        )
    return (
        "<table><tr><th>task</th><th>protocol</th><th>labels</th><th>metric</th>"
        f"{head}<th>paper MGLL</th><th>paper CLIP</th></tr>{''.join(lines)}</table>"
    )


def _comparisons(comparisons: Sequence[Mapping[str, Any]]) -> str:
    if not comparisons:
        return ""
    lines = []
    for c in comparisons:
        said = comparison_verdict(c["a"], c["b"], c.get("ci95"))
        style = {f"{c['a']} better": "better", f"{c['b']} better": "worse"}.get(said or "")
        verdict = html.escape(said or "")
        if style:
            verdict = f"<span class='{style}'>{verdict}</span>"
        lines.append(
            f"<tr><td>{html.escape(c['task'])}</td><td>{html.escape(c['protocol'])}</td>"
            f"<td>{c['label_fraction']:g}</td>"
            f"<td>{html.escape(c['a'])} - {html.escape(c['b'])}</td>"
            f"<td>{html.escape(_interval(c, 'diff'))}</td>"
            f"<td>{'' if c.get('p') is None else format(c['p'], '.3f')}</td>"
            f"<td>{len(c['seeds'])}</td><td>{verdict}</td></tr>"
        )
    return (
        "<h2>Paired comparisons (same test images, same seeds)</h2><table><tr><th>task</th>"
        "<th>protocol</th><th>labels</th><th>difference</th><th>points [95%]</th><th>p</th>"
        f"<th>seeds</th><th></th></tr>{''.join(lines)}</table>"
    )


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _paper_marks(ax: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    """The paper's numbers (full labels only) as marks at label fraction 1."""
    full = next((r for r in rows if r["label_fraction"] >= 1 and r.get("paper") is not None), None)
    if full is None:
        return
    marks = {
        "paper MGLL": full["paper"],
        **{f"paper {m}": v for m, v in full["paper_other"].items()},
    }
    for (name, value), marker in zip(marks.items(), ("*", "x", "+"), strict=False):
        ax.scatter([1.0], [100 * value], marker=marker, s=70, color="black", label=name, zorder=3)


def _fraction_plot(rows: Sequence[Mapping[str, Any]], title: str) -> str:
    """Value against label fraction per encoder: pooled mean, 95% interval, each seed."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    encoders = list(dict.fromkeys(r["encoder"] for r in rows))
    for k, encoder in enumerate(encoders):
        mine = sorted(
            (r for r in rows if r["encoder"] == encoder and r["value"] is not None),
            key=lambda r: r["label_fraction"],
        )
        if not mine:
            continue
        shift = 1 + 0.06 * (k - (len(encoders) - 1) / 2)  # side by side on the log axis
        x = [r["label_fraction"] * shift for r in mine]
        y = [100 * r["value"] for r in mine]  # percent, as the tables
        # a mean over seeds can sit just outside its percentile interval: no negative bar
        low = [max(0.0, 100 * (r["value"] - r["ci95"][0])) if r["ci95"] else 0 for r in mine]
        high = [max(0.0, 100 * (r["ci95"][1] - r["value"])) if r["ci95"] else 0 for r in mine]
        line = ax.errorbar(x, y, yerr=[low, high], marker="o", capsize=3, label=encoder)
        for xi, r in zip(x, mine, strict=True):
            seeds = [100 * v for v in r["per_seed"] if v is not None]
            ax.scatter([xi] * len(seeds), seeds, s=8, alpha=0.4, color=line[0].get_color())
    _paper_marks(ax, rows)
    ax.set_xscale("log")
    ax.set_xlabel("label fraction")
    ax.set_ylabel(f"{rows[0]['metric']} (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _png(fig)


def render_report(summary: Mapping[str, Any]) -> str:
    """The page as one HTML string (``summary`` is benchmark.json's dict)."""
    encoders = list(summary["encoders"])
    rows = summary["rows"]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>mgll benchmark</title><style>{STYLE}</style></head><body>",
        "<h1>mgll benchmark</h1>",
        "<p>Encoders: "
        + ", ".join(
            f"<b>{html.escape(n)}</b> = {html.escape(s)}" for n, s in summary["encoders"].items()
        )
        + "</p>",
        f"<p class='note'>Percent. {html.escape(summary['interval'])}.</p>",
        _table(rows, encoders),
        _comparisons(summary["comparisons"]),
    ]
    for task, protocol in dict.fromkeys((r["task"], r["protocol"]) for r in rows):
        mine = [r for r in rows if r["task"] == task and r["protocol"] == protocol]
        if any(r["value"] is not None for r in mine):
            alt = html.escape(f"{task}, {protocol}")
            parts.append(
                f"<h2>{alt}</h2><img class='plot' alt='{alt}' src='{_fraction_plot(mine, alt)}'>"
            )
    if summary["missing"]:
        items = "".join(
            f"<li><b>{html.escape(m['task'])}</b>: {html.escape(m['reason'])}; get it: "
            f"{html.escape(m['get'])}</li>"
            for m in summary["missing"]
        )
        parts.append(f"<h2>Not run</h2><ul>{items}</ul>")
    for line in summary.get("notes", []):
        parts.append(f"<p class='note'>{html.escape(line)}.</p>")
    skipped = [u for u in summary["units"] if u.get("status") == "skipped"]
    if skipped:
        parts.append(
            f"<p class='note'>{len(skipped)} run(s) skipped: "
            + html.escape("; ".join(sorted({f"{u['reason']}" for u in skipped})))
            + " (listed in benchmark.json).</p>"
        )
    parts.append("<p class='note'>Research benchmark: not for clinical use.</p></body></html>")
    return "\n".join(parts)


def write_report(path: str | Path, summary: Mapping[str, Any]) -> Path:
    """Write :func:`render_report` atomically to ``path`` (``O/report.html``)."""
    from mgll.io import atomic_write

    path = Path(path)
    text = render_report(summary)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path
