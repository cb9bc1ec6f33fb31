"""Golden files (``tests/golden/*.json``): what the quick demo and the quick ablation produce,
compared so that they hold on any machine of this kind and still catch a change to the pipeline.

A golden is a JSON tree. Its structure (keys, list lengths, order), strings, integers, booleans
and the floats computed from the data alone (the config, counts, the folds' sizes, the
learning-rate schedule, retrieval's chance and image-blind baselines) must be equal; floats to a
relative 1e-12, i.e. float64 rounding only. Numbers that come out of a model (trained, or the
random initialisation's features through scikit-learn's probe) move with the floating-point
path of the machine (CPU kernels, thread count), so they are compared with a tolerance:

- ``SCORE_TOL`` = 0.006, absolute, for scores in [0, 1] (AUC, mAP, accuracy, R@K, P@K, their
  CIs, paired differences, hubness);
- ``P_TOL`` = 0.05, absolute, for bootstrap p-values (counts of resamples: 2/201 apart);
- ``LOSS_TOL`` = 3e-3, relative, for each pretraining run's last logged losses and logit
  scale (the ``pretraining`` entries: the loss weights show there first).

Measured with ``benchmarks/golden_spread.py`` (the quick demo and ablation re-run under
``torch.set_num_threads(1)``, 2, and 2 with oneDNN off, i.e. other convolution kernels and
reduction orders; plus the numbers the old goldens held, recorded on another machine of this
kind), the largest deviation of any number of each kind from this machine's 2-thread run:
scores 1.36e-3 (the other machine; 5.7e-4 for oneDNN off; AUC point values 3.1e-4), p-values
0.020 (two resamples), losses 3.4e-4 relative. So ``SCORE_TOL`` is 4.4 x the largest score
spread and above one changed decision among the demo's 187 images (1/187 = 0.0053, seen
nowhere); ``P_TOL`` is 5 resample steps; ``LOSS_TOL`` is 9 x the loss spread. Planted changes
shift them far more (docs/demo.md, "The goldens", has the table): another seed moves scores by
up to 0.23 (AUC 0.086), one patient moved to the other fold by 0.17 (AUC 0.026, fold sizes
exactly); a loss weight moves the AUC of these five-step runs by 3.5e-3 at most, and is caught
by the other scores (soft CLIP at 2 x: 0.036) or by the losses (smooth KL at 0.9 x: 1.65e-2,
5.5 x ``LOSS_TOL``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

GOLDEN = Path(__file__).parent / "golden"

SCORE_TOL = 0.006
P_TOL = 0.05
LOSS_TOL = 3e-3
EXACT_REL = 1e-12

# Subtrees computed from the data alone (texts and labels, no model): exact.
CLOSED_FORM = frozenset({"chance", "image_blind"})
SCORE_KEYS = frozenset({"auc_macro", "map", "accuracy", "top1_hub", "diff", "ci95"})
LOSS_KEYS = frozenset({"loss", "clip", "sclip", "pointwise", "skl", "logit_scale"})


def kind_of(path: tuple[str | int, ...]) -> str:
    """How the number at ``path`` is compared: ``exact``, ``score``, ``p`` or ``loss``."""
    keys = [k for k in path if isinstance(k, str)]
    if not keys or CLOSED_FORM.intersection(keys):
        return "exact"
    leaf = keys[-1]
    if keys[0] == "pretraining":
        return "loss" if leaf in LOSS_KEYS else "exact"
    if leaf == "p":
        return "p"
    if leaf in SCORE_KEYS or leaf.startswith("i2t_") or leaf.endswith("_ci95"):
        return "score"
    return "exact"


def close(kind: str, got: float, expected: float) -> bool:
    """Whether a number of this kind is within its tolerance of the golden one."""
    if kind == "score":
        return abs(got - expected) <= SCORE_TOL
    if kind == "p":
        return abs(got - expected) <= P_TOL
    if kind == "loss":
        return abs(got - expected) <= LOSS_TOL * abs(expected)
    return got == pytest.approx(expected, rel=EXACT_REL, abs=0.0)


def differences(got: Any, expected: Any, path: tuple[str | int, ...] = ()) -> list[str]:
    """Every place where ``got`` differs from ``expected`` beyond its kind's tolerance."""
    where = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path) or "."
    if isinstance(expected, dict):
        if not isinstance(got, dict) or set(got) != set(expected):
            return [f"{where}: keys {sorted(got) if isinstance(got, dict) else got!r}"]
        return [d for k in expected for d in differences(got[k], expected[k], (*path, k))]
    if isinstance(expected, list):
        if not isinstance(got, list) or len(got) != len(expected):
            return [f"{where}: {got!r} is not a list of {len(expected)}"]
        return [
            d
            for i, (a, b) in enumerate(zip(got, expected, strict=True))
            for d in differences(a, b, (*path, i))
        ]
    if isinstance(expected, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        kind = kind_of(path)
        return [] if close(kind, got, expected) else [f"{where} ({kind}): {got!r} != {expected!r}"]
    return (
        []
        if got == expected and type(got) is type(expected)
        else [f"{where}: {got!r} != {expected!r}"]
    )


def deviations(
    got: Any, expected: Any, path: tuple[str | int, ...] = ()
) -> dict[str, tuple[float, str]]:
    """The largest deviation per kind of number (absolute; relative for losses) and where."""
    out: dict[str, tuple[float, str]] = {}
    if isinstance(expected, dict) and isinstance(got, dict):
        pairs = [(got[k], expected[k], (*path, k)) for k in expected if k in got]
    elif isinstance(expected, list) and isinstance(got, list):
        pairs = [(a, b, (*path, i)) for i, (a, b) in enumerate(zip(got, expected, strict=False))]
    else:
        pairs = []
        if isinstance(expected, float) and isinstance(got, (int, float)):
            kind = kind_of(path)
            size = abs(got - expected) / (
                abs(expected) if kind in ("loss", "exact") and expected else 1.0
            )
            out[kind] = (size, "/".join(map(str, path)))
    for a, b, p in pairs:
        for kind, found in deviations(a, b, p).items():
            if kind not in out or found[0] > out[kind][0]:
                out[kind] = found
    return out


def matches_golden(got: Any, name: str) -> None:
    """``got`` equals the JSON recorded in ``tests/golden/<name>`` by the rules above.

    After an intended change to the pipeline, re-record with ``MGLL_RECORD_GOLDEN=1 python -m
    pytest tests/test_demo.py tests/test_demo_ablate.py`` and say in the commit why the numbers
    moved.
    """
    path = GOLDEN / name
    if os.environ.get("MGLL_RECORD_GOLDEN") == "1":
        path.write_text(json.dumps(got, indent=1) + "\n", encoding="utf-8")
    found = differences(got, json.loads(path.read_text(encoding="utf-8")))
    assert not found, f"{name}: {len(found)} difference(s):\n" + "\n".join(found[:20])


def pretraining(out: Path) -> dict[str, dict[str, Any]]:
    """Each pretraining run under ``out`` (a folder holding ``metrics.jsonl``): its steps,
    samples per split, and the last logged training row's losses, learning rate and logit scale."""
    runs = {}
    for log in sorted(out.rglob("metrics.jsonl")):
        summary = json.loads((log.parent / "summary.json").read_text(encoding="utf-8"))
        row = {k: v for k, v in summary["train"].items() if k not in ("kind", "samples_per_s")}
        row.pop("grad_norm", None)
        runs[log.parent.relative_to(out).as_posix()] = {
            "steps": summary["steps"],
            "samples": summary["samples"],
            "train": row,
        }
    return runs


def demo_view(out: Path) -> dict[str, Any]:
    """What ``demo-quick-summary.json`` holds of a ``mgll demo --quick`` folder: the summary
    (without the machine's data path) and each pretraining run."""
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    kept = ("dataset", "config", "protocol", "table", "comparisons")
    settings = {k: v for k, v in summary["settings"].items() if k != "data"}
    return {**{k: summary[k] for k in kept}, "settings": settings, "pretraining": pretraining(out)}


def ablation_view(out: Path) -> dict[str, Any]:
    """What ``ablate-quick.json`` holds of a ``mgll ablate --quick --seeds 1`` folder: each
    variant's macro AUC per seed and each pretraining run."""
    summary = json.loads((out / "ablation.json").read_text(encoding="utf-8"))
    rows = [{"variant": r["variant"], "auc_macro": r["auc_macro"]} for r in summary["rows"]]
    return {"rows": rows, "pretraining": pretraining(out)}
