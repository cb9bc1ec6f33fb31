"""``mgll compare``: paired comparison of encoders evaluated on the same test images.

Reads the ``predictions.csv`` and ``results.json`` of two or more output folders (of probe,
fine-tune or zero-shot on the same task and test split), matches rows by image, and for each
folder after the first reports ``first - other`` for every metric with a paired patient
bootstrap 95% CI and a two-sided p-value (:func:`mgll.metrics.paired_bootstrap`): each resample
draws test patients once and scores both prediction sets on them, so the comparison accounts
for both the test-set sampling and the correlation between the two encoders' errors.

Outputs of ``mgll retrieve`` are compared the same way from their ``retrieval.csv`` (one row
per image query): the image -> text R@K and label-aware P@K of both folders on the same
images and texts, paired by patient (:func:`mgll.metrics.paired_mean_bootstrap`). Retrieval
and classification outputs are not compared with each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mgll.errors import UserError
from mgll.eval.results import read_predictions, read_results, write_json
from mgll.eval.retrieve import read_retrieval_hits
from mgll.io import atomic_write
from mgll.metrics import DEFAULT_RESAMPLES, HEADLINE, paired_bootstrap, paired_mean_bootstrap


class CompareError(UserError, ValueError):
    """The folders cannot be compared (different tasks or test sets)."""


def _load(folder: Path) -> dict[str, Any]:
    results = read_results(folder)
    retrieval = results.get("protocol") == "retrieval"
    rows = read_retrieval_hits(folder) if retrieval else read_predictions(folder)
    if len(set(rows["images"])) != len(rows["images"]):
        name = "retrieval.csv" if retrieval else "predictions.csv"
        raise CompareError(f"{folder}/{name} lists an image twice")
    return {"folder": folder, "results": results, "retrieval": retrieval, **rows}


def _aligned(reference: dict[str, Any], other: dict[str, Any]) -> np.ndarray:
    """Row order of ``other`` matching ``reference``'s images (CompareError when they differ)."""
    a, b = reference["folder"], other["folder"]
    if reference["retrieval"] != other["retrieval"]:
        raise CompareError(
            f"{a} and {b}: one is a retrieval output and the other a classification output; "
            "compare outputs of the same protocol kind"
        )
    ta, tb = reference["results"]["task"], other["results"]["task"]
    for key in ("level", "label_level", "type", "classes"):
        if ta.get(key) != tb.get(key):
            raise CompareError(
                f"{a} and {b} evaluate different tasks ({key}: {ta.get(key)!r} vs "
                f"{tb.get(key)!r}); compare outputs of the same level and classes"
            )
    position = {image: i for i, image in enumerate(other["images"])}
    missing = [img for img in reference["images"] if img not in position]
    extra = len(other["images"]) - (len(reference["images"]) - len(missing))
    if missing or extra:
        raise CompareError(
            f"{a} and {b} were evaluated on different test sets ({len(missing)} image(s) only "
            f"in the first, e.g. {missing[:2]}; {extra} only in the second); evaluate both with "
            "the same data and split (split.csv in each folder)"
        )
    order = np.array([position[img] for img in reference["images"]], dtype=np.int64)
    if reference["retrieval"]:
        if reference["texts"] != [other["texts"][i] for i in order]:
            raise CompareError(f"{a} and {b} disagree on the texts of the same test images")
    elif not np.array_equal(reference["y"], other["y"][order]):
        raise CompareError(f"{a} and {b} disagree on the labels of the same test images")
    return order


def _retrieval_stats(
    reference: dict[str, Any],
    other: dict[str, Any],
    order: np.ndarray,
    patients: list[str],
    n_resamples: int,
    seed: int,
) -> dict[str, dict[str, Any]]:
    return {
        name: paired_mean_bootstrap(
            values,
            other["hits"][name][order],
            patients,
            n_resamples=n_resamples,
            seed=seed,
        )
        for name, values in reference["hits"].items()
        if name in other["hits"]
    }


def compare_folders(
    folders: Sequence[str | Path],
    *,
    output_dir: str | Path | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Compare each folder after the first with the first; writes ``comparison.json`` and
    ``comparison.md`` into ``output_dir`` when given. Returns the comparison dict."""
    if len(folders) < 2:
        raise CompareError("give at least two output folders to compare")
    loaded = [_load(Path(f)) for f in folders]
    reference = loaded[0]
    task = reference["results"]["task"]
    patients = [
        p if p else f"image:{img}"
        for p, img in zip(reference["patients"], reference["images"], strict=True)
    ]
    comparisons = []
    for other in loaded[1:]:
        order = _aligned(reference, other)
        if reference["retrieval"]:
            stats = _retrieval_stats(reference, other, order, patients, n_resamples, seed)
            comparisons.append(_pair(reference, other, stats))
            continue
        thresholds = [
            [r["results"]["thresholds"][c] for c in task["classes"]] for r in (reference, other)
        ]
        stats = paired_bootstrap(
            reference["y"],
            reference["scores"],
            other["scores"][order],
            patients,
            task["type"],
            classes=task["classes"],
            thresholds_a=thresholds[0],
            thresholds_b=thresholds[1],
            ordinal=bool(task.get("ordinal")),
            n_resamples=n_resamples,
            seed=seed,
            progress=progress,
        )
        comparisons.append(_pair(reference, other, stats))
    result = {
        "task": task,
        "n_test": len(reference["images"]),
        "n_patients_test": len(set(patients)),
        "bootstrap": {"unit": "patient", "paired": True, "resamples": n_resamples, "seed": seed},
        "comparisons": comparisons,
    }
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "comparison.json", result)
        text = format_comparison(result) + "\n"
        atomic_write(out / "comparison.md", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return result


def _pair(
    reference: dict[str, Any], other: dict[str, Any], stats: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    return {
        "a": str(reference["folder"]),
        "b": str(other["folder"]),
        "encoder_a": reference["results"].get("encoder", {}).get("spec"),
        "encoder_b": other["results"].get("encoder", {}).get("spec"),
        "protocol_a": reference["results"].get("protocol"),
        "protocol_b": other["results"].get("protocol"),
        "metrics": stats,
    }


def _fmt(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.4f}"


def format_comparison(result: dict[str, Any]) -> str:
    """The comparison as Markdown: one table per pair, headline metrics as rows."""
    blocks = []
    for pair in result["comparisons"]:
        lines = [
            f"A = {pair['encoder_a']} [{pair['protocol_a']}] ({pair['a']}), "
            f"B = {pair['encoder_b']} [{pair['protocol_b']}] ({pair['b']}); "
            f"{result['n_test']} test images of {result['n_patients_test']} patients, "
            f"{result['bootstrap']['resamples']} paired patient-bootstrap resamples",
            "",
            "| metric | A | B | A - B | 95% CI | p |",
            "|---|---|---|---|---|---|",
        ]
        names = [n for n in HEADLINE if n in pair["metrics"]]
        names += [n for n in pair["metrics"] if n.startswith(("i2t_R@", "i2t_P@"))]
        for name in names:
            m = pair["metrics"][name]
            ci = "" if m["ci95"] is None else f"[{m['ci95'][0]:+.4f}, {m['ci95'][1]:+.4f}]"
            diff = "undefined" if m["diff"] is None else f"{m['diff']:+.4f}"
            p = "" if m["p_value"] is None else f"{m['p_value']:.3g}"
            lines.append(f"| {name} | {_fmt(m['a'])} | {_fmt(m['b'])} | {diff} | {ci} | {p} |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
