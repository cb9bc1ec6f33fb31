"""`mgll benchmark`: the registry, task files, the harness's outputs checked against
scikit-learn on the predictions it wrote, resume, skipped draws, errors, and the report page."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from browser import rendered_dom
from eval_fixtures import make_downstream
from mgll.benchmark import protocols
from mgll.benchmark.cli import run_benchmark
from mgll.benchmark.report import write_report
from mgll.benchmark.summary import _metric
from mgll.benchmark.tasks import PAPER_TASKS, TaskFileError, load_task_file, resolve_tasks
from mgll.cli import main
from mgll.metrics import seed_mean_interval

ENCODER = "random:mgll-vit-test-32"
PAPER_ROWS = {
    "palm": 99.72,
    "idrid-dr": 82.57,
    "idrid-dme": 86.17,
    "rfmid": 92.83,
    "refuge": 93.90,
    "adam": 96.30,
    "rim-one": 97.05,
    "oia-ddr": 88.85,
    "covidx": 39.0,
    "covid-xray-seg": 81.69,
}  # fmt: skip  (issue 18's list; fine-tuning numbers)


def _task_file(folder: Path, **extra: object) -> Path:
    """A task file over a two-class mgll-downstream set mgll has no registry entry for."""
    make_downstream(folder / "grades", classes=("0", "1"))
    body = {"name": "grades", "data": "grades", "level": "grade", "metric": "auc_macro"}
    body.update(extra)
    path = folder / "grades.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in body.items()))
    return path


def test_registry_holds_the_papers_ten_rows_with_their_numbers():
    assert set(PAPER_TASKS) == set(PAPER_ROWS)
    assert [t.name for t in resolve_tasks("paper")] == list(PAPER_TASKS)
    for name, number in PAPER_ROWS.items():
        task = PAPER_TASKS[name]
        assert task.paper_value("finetune") == pytest.approx(number / 100)
        assert task.get and task.rule and task.layout
    assert PAPER_TASKS["palm"].paper_value("probe", "CLIP") == pytest.approx(0.9394)
    assert PAPER_TASKS["rfmid"].type == "multilabel" and PAPER_TASKS["covidx"].metric == "accuracy"


def test_missing_data_and_the_segmentation_row_say_why(tmp_path):
    from mgll.benchmark.tasks import missing_reason

    assert "no data at" in missing_reason(PAPER_TASKS["adam"], tmp_path)
    (tmp_path / "covid-cxr-seg").mkdir()
    assert "mgll segment" in missing_reason(PAPER_TASKS["covid-xray-seg"], tmp_path)
    (tmp_path / "palm").mkdir()
    assert missing_reason(PAPER_TASKS["palm"], tmp_path) is None


def test_task_file_paths_are_relative_to_it_and_bad_files_are_named(tmp_path):
    task = load_task_file(_task_file(tmp_path, split={"mode": "source"}))
    assert task.data_path("/elsewhere") == tmp_path / "grades"
    assert task.paper_value("probe") is None
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndata: grades\n")
    with pytest.raises(TaskFileError, match=r"bad.yaml: the task file has no 'level'"):
        load_task_file(bad)
    bad.write_text("name: x\ndata: grades\nlevel: grade\nmetrc: auc_macro\n")
    with pytest.raises(TaskFileError, match=r"bad.yaml: unknown key 'metrc'"):
        load_task_file(bad)
    bad.write_text("name: x\ndata: grades\nlevel: grade\nmetric: f2\n")
    with pytest.raises(TaskFileError, match=r"bad.yaml: metric: 'f2' is not one of"):
        load_task_file(bad)
    with pytest.raises(TaskFileError, match="unknown task 'plam'"):
        resolve_tasks("plam")


def _interval_by_hand(truth, runs, patients, n_resamples, seed, baseline=None):
    """The seed-mean bootstrap written out with scikit-learn: per resample one draw of the
    patients (sorted names, with replacement) for every seed, then the seeds with replacement;
    the mean of the drawn seeds' AUC (minus the baseline's on the same seed and rows)."""
    rng = np.random.default_rng(seed)
    universe = sorted(set(patients))
    rows_of = {p: [i for i, q in enumerate(patients) if q == p] for p in universe}
    means = []
    for _ in range(n_resamples):
        drawn = [universe[j] for j in rng.integers(0, len(universe), size=len(universe))]
        rows = [i for p in drawn for i in rows_of[p]]
        values = []
        for k in rng.integers(0, len(runs), size=len(runs)):
            if len(set(truth[rows])) < 2:
                values.append(np.nan)
                continue
            value = roc_auc_score(truth[rows], runs[k][rows])
            if baseline is not None:
                value -= roc_auc_score(truth[rows], baseline[k][rows])
            values.append(value)
        means.append(np.mean(values))
    means = np.asarray(means)
    return list(np.percentile(means[np.isfinite(means)], [2.5, 97.5]))


def test_seed_mean_interval_is_the_hand_written_two_level_bootstrap():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, 24)
    y = np.eye(2)[truth]
    patients = [f"p{i // 2}" for i in range(24)]
    good = np.clip(y + rng.normal(0, 0.4, y.shape), 0, 1)
    bad = np.clip(y + rng.normal(0, 1.5, y.shape), 0, 1)
    task = {"y": y, "classes": ["0", "1"], "task_type": "binary"}
    both = seed_mean_interval(
        [_metric(task, s, "auc_macro") for s in (good, bad)],
        [patients] * 2,
        n_resamples=60,
        seed=3,
    )
    per_seed = [roc_auc_score(truth, s[:, 1]) for s in (good, bad)]
    assert both["value"] == pytest.approx(np.mean(per_seed))
    assert both["per_seed"] == pytest.approx(per_seed)
    expected = _interval_by_hand(truth, [good[:, 1], bad[:, 1]], patients, 60, 3)
    assert both["ci95"] == pytest.approx(expected)
    paired = seed_mean_interval(
        [_metric(task, s, "auc_macro") for s in (good, good)],
        [patients] * 2,
        baseline=[_metric(task, s, "auc_macro") for s in (bad, good)],
        n_resamples=60,
        seed=3,
    )
    assert paired["value"] == pytest.approx((per_seed[0] - per_seed[1]) / 2)
    assert paired["per_seed"] == pytest.approx([per_seed[0] - per_seed[1], 0.0])
    assert paired["value_a"] == pytest.approx(per_seed[0])
    assert paired["value_b"] == pytest.approx(np.mean(per_seed))
    expected = _interval_by_hand(
        truth, [good[:, 1], good[:, 1]], patients, 60, 3, baseline=[bad[:, 1], good[:, 1]]
    )
    assert paired["ci95"] == pytest.approx(expected)


def _read_predictions(folder: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Truth, class-1 score and patient per image of a unit's predictions.csv, by image name."""
    with (folder / "predictions.csv").open(newline="") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda r: r["image"])
    return (
        np.array([int(r["label:1"]) for r in rows]),
        np.array([float(r["score:1"]) for r in rows]),
        [r["patient"] for r in rows],
    )


def test_benchmark_on_a_task_file_writes_rows_comparisons_tables_and_resumes(tmp_path, monkeypatch):
    task_file = _task_file(tmp_path)
    out = tmp_path / "out"
    kwargs = dict(
        seeds=2,
        draws=1,
        label_fractions="0.5,1",
        n_resamples=50,
        cache_dir=tmp_path / "features",
        echo=lambda line: None,
    )
    summary = run_benchmark(
        [f"a={ENCODER}", f"b={ENCODER}:{{seed}}"],
        f"{task_file},covidx",
        "probe,zeroshot",
        out,
        data_root=tmp_path,
        **kwargs,
    )
    # Missing data is listed with where to get it, never silently dropped.
    assert [m["task"] for m in summary["missing"]] == ["covidx"]
    assert "COVID-Net" in summary["missing"][0]["get"]
    rows = {(r["encoder"], r["protocol"], r["label_fraction"]): r for r in summary["rows"]}
    full = rows[("b", "probe", 1.0)]
    assert full["seeds"] == [0, 1] and full["n_test"] == 12
    assert full["results"] == ["grades/b/probe/seed-0", "grades/b/probe/seed-1"]
    per_seed, runs = [], []
    for folder in full["results"]:
        truth, score, patients = _read_predictions(out / folder)
        per_seed.append(roc_auc_score(truth, score))
        runs.append(score)
        assert (out / folder / "results.json").is_file()  # an ordinary mgll.eval folder
    assert full["value"] == pytest.approx(np.mean(per_seed))
    # The interval is the seed-mean bootstrap, recomputed by hand from the written predictions.
    assert full["ci95"] == pytest.approx(_interval_by_hand(truth, runs, patients, 50, 0), abs=1e-6)
    assert (out / "grades/a/probe/fraction-0.5/seed-0/results.json").is_file()
    # Zero-shot needs a text tower: skipped with the reason, not silently.
    zero = rows[("a", "zeroshot", 1.0)]
    assert zero["value"] is None and "image-text model" in zero["skipped"][0]["reason"]
    pair = next(
        c for c in summary["comparisons"] if c["protocol"] == "probe" and c["label_fraction"] == 1
    )
    a_full = rows[("a", "probe", 1.0)]
    assert (pair["a"], pair["b"], pair["seeds"]) == ("a", "b", [0, 1])
    a_runs = [_read_predictions(out / folder)[1] for folder in a_full["results"]]
    per_seed_diff = [
        roc_auc_score(truth, a) - roc_auc_score(truth, b) for a, b in zip(a_runs, runs, strict=True)
    ]
    assert pair["per_seed_diff"] == pytest.approx(per_seed_diff, abs=1e-6)
    assert pair["diff"] == pytest.approx(np.mean(per_seed_diff), abs=1e-6)
    paired = _interval_by_hand(truth, a_runs, patients, 50, 0, baseline=runs)
    assert pair["ci95"] == pytest.approx(paired, abs=1e-6)
    saved = json.loads((out / "benchmark.json").read_text())
    assert {"rows", "comparisons", "missing"} <= set(saved)
    table = (out / "table.md").read_text()
    assert f"{100 * full['value']:.2f}" in table
    assert (
        "| covidx | not run |  | accuracy | - | - | -/39.00 | -/- |" in table
    )  # the paper's row stays
    with (out / "table.csv").open(newline="") as handle:
        table_rows = list(csv.DictReader(handle))
    (csv_row,) = [r for r in table_rows if r["protocol"] == "probe" and r["label_fraction"] == "1"]
    assert float(csv_row["b"]) == pytest.approx(full["value"], abs=1e-6)

    # A rerun resumes: no protocol runs again and the rows are the same.
    def no_run(*args, **kw):
        raise AssertionError("a finished unit ran again")

    monkeypatch.setattr(protocols, "run_protocol", no_run)
    again = run_benchmark(
        [f"a={ENCODER}", f"b={ENCODER}:{{seed}}"],
        f"{task_file},covidx",
        "probe,zeroshot",
        out,
        data_root=tmp_path,
        **kwargs,
    )
    assert [r["value"] for r in again["rows"]] == [r["value"] for r in summary["rows"]]
    with pytest.raises(ValueError, match="encoder 'b' was"):
        run_benchmark([f"b={ENCODER}"], str(task_file), "probe", out, **kwargs)


def test_a_single_class_draw_is_skipped_with_its_reason(tmp_path, monkeypatch):
    task_file = _task_file(tmp_path)
    ran = []
    monkeypatch.setattr(protocols, "run_protocol", lambda *a, **k: ran.append(a))
    # 1/24 of the training images: one image, one class.
    summary = run_benchmark(
        [ENCODER],
        str(task_file),
        "finetune",
        tmp_path / "out",
        draws=2,
        label_fractions="0.04",
        n_resamples=10,
        echo=lambda line: None,
    )
    assert ran == []
    (row,) = summary["rows"]
    assert row["value"] is None and len(row["skipped"]) == 2
    assert row["skipped"][0]["reason"] == "the label-fraction draw holds a single class"


def test_paper_finetune_passes_the_authors_recipe(tmp_path, monkeypatch):
    import mgll.eval.finetune as finetune

    task_file = _task_file(tmp_path)
    seen = {}

    def spy(encoder, data, output_dir, options, cfg, resume=None):
        seen.update(cfg=cfg, n_train=len(data.rows["train"]), resume=resume)
        raise ValueError("stop here")

    monkeypatch.setattr(finetune, "fine_tune", spy)
    with pytest.raises(ValueError, match="stop here"):
        run_benchmark(
            [ENCODER], str(task_file), "paper-finetune", tmp_path / "o", echo=lambda s: None
        )
    cfg = seen["cfg"]
    # Every part of the authors' recipe (issue 18 section 3), written out by hand.
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay) == (50, 32, 1.25e-4, 1e-3)
    assert (cfg.betas, cfg.grad_clip, cfg.warmup_epochs) == ([0.9, 0.95], 10.0, 1.0)
    aug = cfg.augmentation
    assert (aug.hflip, aug.vflip, aug.rotation) == (0.5, 0.5, 30.0)
    assert (aug.brightness, aug.contrast, aug.saturation) == (0.6, 0.6, 0.6)
    assert aug.crop_scale > 0  # random crop on
    assert (cfg.head, cfg.select_by) == ("projected", "accuracy")
    assert seen["n_train"] == 24 and seen["resume"] is None
    # mgll's own finetune keeps its defaults
    assert protocols.finetune_config("finetune") == finetune.FineTuneConfig()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tasks", "plam"], "unknown task 'plam'"),
        (["--tasks", "palm", "--protocol", "probe,lora"], "unknown protocol 'lora'"),
        (["--tasks", "palm", "--encoder", "random:no-such-arch"], "random:no-such-arch"),
        (["--tasks", "palm", "--label-fraction", "0,1"], "--label-fraction"),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, argv, message):
    base = ["benchmark", "--output-dir", str(tmp_path / "o"), "--data-root", str(tmp_path)]
    if "--encoder" not in argv:
        base += ["--encoder", ENCODER]
    assert main([*base, *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("mgll benchmark: error:") and message in err and "\n" not in err
    assert not (tmp_path / "o" / "benchmark.json").exists()


def _summary() -> dict:
    row = {
        "task": "palm",
        "encoder": "mgll",
        "protocol": "probe",
        "metric": "auc_macro",
        "value": 0.95,
        "ci95": [0.9, 0.99],
        "seeds": [0, 1, 2],
        "per_seed": [0.94, 0.95, 0.96],
        "paper": 0.9966,
        "paper_other": {"CLIP": 0.9394},
        "skipped": [],
    }
    rows = [
        {**row, "label_fraction": f, "value": v, "encoder": e, "per_seed": [v - 0.01, v + 0.01]}
        for e, base in (("mgll", 0.9), ("random", 0.8))
        for f, v in ((0.01, base - 0.2), (0.1, base - 0.1), (1.0, base))
    ]
    comparison = {
        "task": "palm",
        "a": "mgll",
        "b": "random",
        "protocol": "probe",
        "label_fraction": 1.0,
        "diff": 0.1,
        "ci95": [0.02, 0.2],
        "p": 0.01,
        "seeds": [0, 1, 2],
    }
    return {
        "encoders": {"mgll": "runs/<s{seed}>", "random": "random:x"},
        "interval": "two-stage bootstrap",
        "rows": rows,
        "comparisons": [comparison],
        "missing": [
            {"task": "adam", "reason": "no data", "get": "https://amd.grand-challenge.org"}
        ],
        "units": [{"status": "skipped", "reason": "a single class"}],
    }


def test_report_is_self_contained_and_its_plots_decode(tmp_path):
    text = write_report(tmp_path / "report.html", _summary()).read_text()
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", text)
    assert len(images) == 1  # one (task, protocol) plot
    with Image.open(io.BytesIO(base64.b64decode(images[0]))) as picture:
        assert picture.width > 100 and picture.height > 100
    assert not re.search(r"(src|href)=['\"](?!data:)", text)
    assert "90.00 [90.00, 99.00] (n=3)" in text and "<td>99.66</td>" in text
    assert "mgll better" in text and "amd.grand-challenge.org" in text
    assert "runs/&lt;s{seed}&gt;" in text  # escaped, not markup


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tmp_path):
    report = write_report(tmp_path / "report.html", _summary())
    dom = rendered_dom(report, tmp_path)
    assert 'data-images="1"' in dom and 'data-broken="0"' in dom
    assert "mgll better" in dom


def test_the_palm_pretraining_recipe_trains_on_the_official_split_only():
    from mgll.training.config import load_config

    cfg = load_config("bench-palm")
    assert (cfg.data.source, cfg.data.path, cfg.data.split.mode) == ("palm", "palm", "source")
    assert cfg.model.image.arch == "mgll-rn-tiny-64"


def test_zero_shot_runs_per_seed_only_when_the_encoder_changes_with_the_seed():
    from mgll.benchmark.cli import plan_units

    task = SimpleNamespace(name="palm")
    encoders = {"mgll": "runs/palm-mgll-s{seed}", "fixed": "runs/palm-mgll-s0"}
    plan = plan_units(
        [task], encoders, ["zeroshot", "probe"], [0.1, 1.0], seeds=3, draws=5, first_seed=2
    )
    count = Counter((u["encoder"], u["protocol"], u["label_fraction"]) for u in plan)
    assert count == {
        ("mgll", "zeroshot", 1.0): 3,  # one pretraining run per seed: each is scored
        ("fixed", "zeroshot", 1.0): 1,  # a fixed model scores the same every seed
        ("mgll", "probe", 0.1): 5,
        ("mgll", "probe", 1.0): 3,
        ("fixed", "probe", 0.1): 5,
        ("fixed", "probe", 1.0): 3,
    }
    seeds = sorted(
        u["seed"] for u in plan if u["encoder"] == "mgll" and u["protocol"] == "zeroshot"
    )
    assert seeds == [2, 3, 4]
