"""`mgll demo` over several seeds and on a user's own data: the interval over seeds and
patients checked by hand, and a --quick two-seed run on a spec dataset mgll never saw."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mgll.cli import main
from mgll.metrics import seed_mean_interval


def test_the_interval_carries_the_seed_to_seed_spread():
    patients = [[f"p{i}" for i in range(20)]] * 3
    constant = [lambda rows, c=c: c for c in (0.0, 1.0, 2.0)]  # no patient spread at all
    out = seed_mean_interval(constant, patients, n_resamples=2000, seed=0)
    assert out["value"] == 1.0 and out["per_seed"] == [0.0, 1.0, 2.0]
    # the mean of 3 seeds drawn with replacement from {0, 1, 2}: 0 and 2 each have
    # probability 1/27 > 2.5%, so they are the interval's ends
    assert out["ci95"] == [0.0, 2.0]


def test_identical_seeds_give_the_patient_bootstrap_interval():
    """Repeating a seed adds no information: one patient draw serves every seed of a
    resample, so the interval is the patient bootstrap's, whatever the row order per seed."""
    from mgll.metrics import mean_with_ci

    rng = np.random.default_rng(0)
    values = (rng.random(90) < 0.6).astype(float)
    patients = [f"p{i // 3}" for i in range(90)]
    order = rng.permutation(90)  # seed 2 lists the same images in another order

    def stat(v):
        return lambda rows: float(v[rows].mean())

    out = seed_mean_interval(
        [stat(values), stat(values), stat(values[order])],
        [patients, patients, [patients[i] for i in order]],
        n_resamples=4000,
        seed=0,
    )
    value, ci = mean_with_ci(values, patients, n_resamples=4000, seed=1)
    assert out["value"] == pytest.approx(value)
    assert out["ci95"] == pytest.approx(ci, abs=0.015)


def test_across_seed_comparisons_pair_each_seed_of_a_with_the_same_seed_of_b(monkeypatch):
    """Hand-made outputs of three seeds, each encoder a different quality per seed: every
    comparison's per-seed difference is A's seed s minus B's seed s (scikit-learn's AUC, the
    hit rates' means), never another seed's."""
    from sklearn.metrics import roc_auc_score

    import mgll.demo.seeds as seeds

    rng = np.random.default_rng(2)
    truth = np.arange(24) % 2
    images = [f"i{k}.png" for k in range(24)]
    patients = [f"p{k // 2}" for k in range(24)]
    spread = {"mgll": (0.2, 0.6, 1.0), "clip": (1.4, 0.3, 0.8), "random": (2.0, 0.5, 1.2)}
    scores = {
        (e, s): np.clip(truth + rng.normal(0, sd, 24), 0, 1)
        for e, sds in spread.items()
        for s, sd in enumerate(sds)
    }
    hits = {key: (rng.random(24) < 0.3 + 0.1 * key[1]).astype(float) for key in scores}
    outs = [Path(f"/nowhere/seed{s}") for s in range(3)]

    def key_of(folder: Path) -> tuple[str, int]:
        return folder.parent.name, int(folder.parent.parent.name.removeprefix("seed"))

    def classification(folder):
        p1 = scores[key_of(folder)]
        return {
            **{"images": images, "patients": patients, "y": np.eye(2)[truth]},
            **{"scores": np.stack([1 - p1, p1], 1), "classes": ["0", "1"], "type": "binary"},
        }

    def retrieval(folder):
        h = hits[key_of(folder)]
        hit_rates = {"i2t_R@5": h, "i2t_P@5": h / 5}
        return {"images": images, "patients": patients, "texts": images, "hits": hit_rates}

    monkeypatch.setattr(seeds, "_classification", classification)
    monkeypatch.setattr(seeds, "read_retrieval_hits", retrieval)  # imported at the top
    _, comparisons = seeds.across_seeds(outs, ["grade"], "note", n_resamples=20)
    auc = {key: roc_auc_score(truth, v) for key, v in scores.items()}
    checked = 0
    for c in comparisons:
        a, b = c["a"], c["b"]
        if c["protocol"] == "retrieval":
            scale = 1 if c["metric"] == "i2t_R@5" else 1 / 5
            expected = [scale * (hits[a, s].mean() - hits[b, s].mean()) for s in range(3)]
        else:
            expected = [auc[a, s] - auc[b, s] for s in range(3)]
        assert c["per_seed"] == pytest.approx(expected), (a, b, c["protocol"], c["metric"])
        checked += 1
    assert checked == 2 * 4  # (mgll - clip, mgll - random) x (probe, zero-shot, R@5, P@5)


SPEC = """
table: labels.csv
image: {column: path, root: images}
patient: patient
levels:
  - name: grade
    label: grade
    prompt: "An eye with a {label} grade."
  - name: note
    text: note
"""


def _my_dataset(
    folder: Path,
    n: int = 40,
    spec: str = SPEC,
    columns: Callable[[int], dict[str, str]] = lambda i: {"note": f"note number {i}"},
) -> Path:
    """A spec dataset mgll never saw: ``n`` distinct noise images of ``n / 2`` patients, a
    3-class grade (brightness) and the ``columns`` of image i (by default one free-text note
    per image)."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    lines = [",".join(["path", "patient", "grade", *columns(0)])]
    for i in range(n):
        grade = ("low", "mid", "high")[(i // 2) % 3]
        level = {"low": 50, "mid": 120, "high": 190}[grade]
        pixels = np.clip(level + rng.normal(0, 25, (48, 48, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / "images" / f"{i}.png")
        lines.append(",".join([f"{i}.png", f"p{i // 2}", grade, *columns(i).values()]))
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    (folder / "spec.yaml").write_text(spec)
    return folder / "spec.yaml"


@pytest.mark.slow
def test_a_two_seed_quick_demo_on_a_dataset_mgll_never_saw(tmp_path, capsys):
    spec = _my_dataset(tmp_path / "mine")
    out = tmp_path / "demo"
    base = ["demo", "--data-root", str(tmp_path), "--data", str(spec), "--output-dir", str(out)]
    assert main([*base, "--level", "stage", "--quick"]) == 1
    err = capsys.readouterr().err.strip()
    assert "--level 'stage'" in err and "'grade'" in err and "\n" not in err
    args = [*base, "--level", "grade", "--quick", "--seeds", "2"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "over 2 seeds" in printed and "mgll - random (grade, linear_probe auc_macro)" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["seeds"] == [0, 1]
    assert [s["folder"] for s in summary["per_seed"]] == ["seed0", "seed1"]
    for seed in (0, 1):
        own = json.loads((out / f"seed{seed}" / "summary.json").read_text())
        assert own["settings"]["seed"] == seed and own["protocol"]["n_images"] == 40
        assert own["settings"]["main_level"] == "grade"
        # each seed's folds differ: the seeds are separate demos, not copies
    folds = [(out / f"seed{s}" / "folds" / "fold0.csv").read_text() for s in (0, 1)]
    assert folds[0] != folds[1]
    probe = {
        (r["encoder"], r["metric"]): r for r in summary["table"] if r["protocol"] == "linear_probe"
    }
    for encoder in ("random", "clip", "mgll"):
        row = probe[encoder, "auc_macro"]
        per_seed = [
            next(
                t["auc_macro"]
                for t in json.loads((out / f"seed{s}" / "summary.json").read_text())["table"]
                if t["encoder"] == encoder and t["protocol"] == "linear_probe"
            )
            for s in (0, 1)
        ]
        assert row["per_seed"] == pytest.approx(per_seed)
        assert row["value"] == pytest.approx(np.mean(per_seed))
    # another number of seeds on the same folder is refused
    assert main([*base, "--level", "grade", "--quick", "--seeds", "3"]) == 1
    assert "other settings" in capsys.readouterr().err
