"""The demo's summary: the side-by-side table read back from the evaluation folders, the
paired comparisons (``mgll compare`` on each pair of folders) and the printed table."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from mgll.demo.evaluation import RETRIEVAL_HEADLINE
from mgll.demo.settings import Demo
from mgll.eval.compare import compare_folders
from mgll.eval.results import read_results


def table_rows(
    demo: Demo, encoder: str, levels: Sequence[str], text_level: str
) -> list[dict[str, Any]]:
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


def compare_encoders(demo: Demo, levels: Sequence[str], text_level: str) -> list[dict[str, Any]]:
    out = []
    tasks = [(level, p, f"{p}-{level}") for level in levels for p in ("probe", "zeroshot")]
    tasks.append((text_level, "retrieval", f"retrieval-{text_level}"))
    for level, protocol, name in tasks:
        for a, b in demo.comparisons:
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


def table_encoders(table: Sequence[Mapping[str, Any]]) -> list[str]:
    """The encoders of a summary's table, in the order the demo ran them."""
    return list(dict.fromkeys(row["encoder"] for row in table))


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
    encoders = table_encoders(summary["table"])
    lines = [
        f"macro AUC (95% patient-bootstrap CI), {summary['protocol']['n_images']} held-out "
        f"images, {summary['settings']['folds']}-fold patient CV",
        f"{'level':<14}{'protocol':<14}" + "".join(f"{e:<{width}}" for e in encoders),
    ]
    for (level, protocol), cells in rows.items():
        lines.append(
            f"{level:<14}{protocol:<14}" + "".join(f"{cells.get(e, ''):<{width}}" for e in encoders)
        )
    if retrieval:
        first = next(iter(retrieval.values()))
        lines += [
            "",
            f"retrieval: each held-out image ranks the {first['level']} texts of its fold's "
            f"held-out images; R@K = own text in the top K, P@K = top K texts of the same "
            f"{first['label_level']} ({first['n_queries']} queries); chance = a random "
            "ranking, blind = the best ranking that ignores the image",
            f"{'metric':<12}{'chance':<8}{'blind':<8}" + "".join(f"{e:<{width}}" for e in encoders),
        ]
        metrics = [k for k in first if k.startswith(("i2t_R@", "i2t_P@")) and "ci95" not in k]
        for metric in metrics:
            refs = [first.get(name, {}).get(metric) for name in ("chance", "image_blind")]
            lines.append(
                f"{metric:<12}"
                + "".join(f"{'' if v is None else f'{v:.3f}':<8}" for v in refs)
                + "".join(
                    f"{_fmt_ci(r.get(metric), r.get(f'{metric}_ci95')):<{width}}"
                    for r in (retrieval.get(e, {}) for e in encoders)
                )
            )
        hub = [retrieval.get(e, {}).get("top1_hub") for e in encoders]
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


def without_split(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The run config with the per-fold split file replaced by where the folds are."""
    return {**cfg, "data": {**cfg["data"], "split": "per fold: OUT/folds/fold<k>.csv"}}
