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
# The paper's table as METHOD.md section 6 writes it: (CLIP, best other, MGLL) in percent per
# protocol, None where it gives no number; COVIDx accuracy and the segmentation Dice are issue
# 18's (fine-tuning, MGLL only). Copied by hand, not from the registry.
METHOD_TABLE = {
    "palm": {"probe": (93.94, 97.12, 99.66), "finetune": (99.51, 98.67, 99.72)},
    "idrid-dr": {"finetune": (76.74, 80.72, 82.57)},
    "idrid-dme": {"finetune": (73.34, 77.95, 86.17)},
    "rfmid": {"probe": (44.66, 63.38, 79.62), "finetune": (65.10, 86.12, 92.83)},
    "refuge": {"probe": (65.33, 84.59, 92.42), "finetune": (86.96, 90.46, 93.90)},
    "adam": {"probe": (52.41, 79.33, 90.02), "finetune": (86.70, 93.27, 96.30)},
    "rim-one": {"probe": (65.96, 89.79, 94.39), "finetune": (88.38, 94.93, 97.05)},
    "oia-ddr": {"finetune": (85.29, 85.96, 88.85)},
    "covidx": {"finetune": (None, None, 39.0)},
    "covid-xray-seg": {"finetune": (None, None, 81.69)},
}


def _task_file(folder: Path, **extra: object) -> Path:
    """A task file over a two-class mgll-downstream set mgll has no registry entry for."""
    make_downstream(folder / "grades", classes=("0", "1"))
    body = {"name": "grades", "data": "grades", "level": "grade", "metric": "auc_macro"}
    body.update(extra)
    path = folder / "grades.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in body.items()))
    return path


def test_registry_holds_the_papers_ten_rows_with_each_protocols_numbers():
    assert set(PAPER_TASKS) == set(METHOD_TABLE)
    assert [t.name for t in resolve_tasks("paper")] == list(PAPER_TASKS)
    for name, table in METHOD_TABLE.items():
        task = PAPER_TASKS[name]
        assert task.get and task.rule and task.layout
        for protocol in ("probe", "finetune", "zeroshot"):
            numbers = table.get(protocol, (None, None, None))
            for method, number in zip(("CLIP", "best other", "MGLL"), numbers, strict=True):
                expected = None if number is None else pytest.approx(number / 100)
                assert task.paper_value(protocol, method) == expected, (name, protocol, method)
        assert task.paper_value("paper-finetune") == task.paper_value("finetune")
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


def test_a_task_on_a_spec_loads_without_a_data_path_warning(tmp_path):
    """The user set no data.path: a task whose data is a spec (its level by index, too) loads
    without the pretraining config's advice to set data.path to null."""
    import warnings

    from test_demo_seeds import _my_dataset

    _my_dataset(tmp_path / "mine")
    path = tmp_path / "mine.yaml"
    path.write_text(
        "name: mine\ndata: mine/spec.yaml\nlevel: 0\n"
        "split: {train: 0.6, val: 0.2, test: 0.2, seed: 0}\n"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = protocols.load_task_data(load_task_file(path), None)
    assert data.task.level == "grade" and len(data.records.records) == 40
    assert not [w for w in caught if "data.path" in str(w.message)]


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


def test_comparisons_pair_each_seed_of_a_with_the_same_seed_of_b():
    """Hand-made predictions of two encoders over three seeds, B's units listed in reverse seed
    order and its images in another order: each per-seed difference is A's seed s minus B's
    seed s (scikit-learn), and the interval is the paired bootstrap in that pairing."""
    from mgll.benchmark.summary import build_comparisons, build_rows
    from mgll.benchmark.tasks import BenchmarkTask

    rng = np.random.default_rng(4)
    truth = np.arange(30) % 2
    images = [f"i{k:02d}.png" for k in range(30)]
    patients = [f"p{k // 2}" for k in range(30)]
    spread = {"a": (0.3, 0.7, 1.1), "b": (1.5, 1.0, 0.5)}  # each seed its own quality
    scores = {
        (e, s): np.clip(truth + rng.normal(0, sd, 30), 0, 1)
        for e, sds in spread.items()
        for s, sd in enumerate(sds)
    }
    units, predictions = [], {}
    listing = {"a": ((0, 1, 2), np.arange(30)), "b": ((2, 1, 0), rng.permutation(30))}
    for encoder, (seeds, order) in listing.items():
        for s in seeds:
            folder = f"t/{encoder}/probe/seed-{s}"
            unit = {"task": "t", "encoder": encoder, "protocol": "probe", "label_fraction": 1.0}
            units.append({**unit, "seed": s, "folder": folder, "status": "done"})
            p1 = scores[(encoder, s)][order]
            predictions[folder] = {
                "images": [images[k] for k in order], "patients": [patients[k] for k in order],
                "y": np.eye(2)[truth[order]], "scores": np.stack([1 - p1, p1], 1),
                "classes": ["0", "1"], "task_type": "binary",
            }  # fmt: skip
    tasks = {"t": BenchmarkTask(name="t", data="t", level="grade")}
    rows, aligned = build_rows(units, predictions, tasks, n_resamples=40)
    (pair,) = build_comparisons(rows, aligned, ["a", "b"], tasks, n_resamples=40)
    auc = {key: roc_auc_score(truth, value) for key, value in scores.items()}
    expected = [auc[("a", s)] - auc[("b", s)] for s in range(3)]
    assert pair["seeds"] == [0, 1, 2]
    assert pair["per_seed_diff"] == pytest.approx(expected)
    assert pair["diff"] == pytest.approx(np.mean(expected))
    by_hand = _interval_by_hand(
        truth, [scores[("a", s)] for s in range(3)], patients, 40, 0,
        baseline=[scores[("b", s)] for s in range(3)],
    )  # fmt: skip
    assert pair["ci95"] == pytest.approx(by_hand)


def _read_predictions(folder: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Truth, class-1 score and patient per image of a unit's predictions.csv, by image name."""
    with (folder / "predictions.csv").open(newline="") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda r: r["image"])
    return (
        np.array([int(r["label:1"]) for r in rows]),
        np.array([float(r["score:1"]) for r in rows]),
        [r["patient"] for r in rows],
    )


# A task file's paper numbers: each protocol's own, so a row showing another's is caught.
TASK_PAPER = {"probe": {"MGLL": 97.5, "CLIP": 61.25}, "finetune": {"MGLL": 88.5, "CLIP": 70.0}}


def _table_line(table: str, task: str, protocol: str, labels: str) -> list[str]:
    """The cells of table.md's row (task, protocol, labels)."""
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[:3] == [task, protocol, labels]:
            return cells
    raise AssertionError(f"no row {task} {protocol} {labels} in\n{table}")


def _split_images(folder: Path, split: str) -> list[str]:
    """The image column of an mgll-downstream split file, sorted."""
    with (folder / f"grade_{split}.csv").open(newline="") as handle:
        return sorted(row["image"] for row in csv.DictReader(handle))


def _hand_draw(images: list[str], fraction: float, seed: int) -> list[str]:
    """A label-fraction draw of ``images`` (each its own patient): the sorted patients in the
    order of numpy's permutation for the seed, the first ceil(fraction * n) kept."""
    order = np.random.default_rng(seed).permutation(len(images))
    return sorted(images[i] for i in order[: int(np.ceil(fraction * len(images)))])


def _report_row(page: str, task: str, protocol: str, labels: str) -> str:
    """report.html's table row (task, protocol, labels), up to its closing tag."""
    start = f"<tr><td>{task}</td><td>{protocol}</td><td>{labels}</td>"
    found = re.search(re.escape(start) + r"(.*?)</tr>", page)
    assert found, f"no report row {start}"
    return start + found.group(1)


def test_benchmark_on_a_task_file_writes_rows_comparisons_tables_and_resumes(tmp_path, monkeypatch):
    import mgll.eval.probe as probe_module

    task_file = _task_file(tmp_path, paper=TASK_PAPER)
    out = tmp_path / "out"
    trained_on: list[tuple[int, list[str]]] = []  # (seed, training images) of every probe fit
    real_fit = probe_module.fit_probe

    def spy_fit(features, data, train_rows, **kw):
        trained_on.append((kw["seed"], sorted(data.image_ids(train_rows))))
        return real_fit(features, data, train_rows, **kw)

    monkeypatch.setattr(probe_module, "fit_probe", spy_fit)
    kwargs = dict(
        seeds=2,
        draws=2,
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
    # Each fraction-0.5 unit fitted on its seed's draw of half the training patients (by hand:
    # each image its own patient, sorted, shuffled by the seed's generator); full labels on all.
    train_images = _split_images(tmp_path / "grades", "Train")
    half = {s: _hand_draw(train_images, 0.5, s) for s in (0, 1)}
    assert half[0] != half[1] and len(half[0]) == 12
    draws = [(s, images) for s, images in trained_on if images != train_images]
    assert sorted(draws) == sorted([(0, half[0]), (1, half[1])] * 2)  # encoders a and b
    for name in ("a", "b"):
        half_row = rows[(name, "probe", 0.5)]
        assert half_row["seeds"] == [0, 1]
        assert half_row["results"] == [f"grades/{name}/probe/fraction-0.5/seed-{s}" for s in (0, 1)]
        aucs = [roc_auc_score(*_read_predictions(out / f)[:2]) for f in half_row["results"]]
        assert half_row["per_seed"] == pytest.approx(aucs, abs=1e-6)
    # Zero-shot needs a text tower: skipped with the reason, not silently.
    zero = rows[("a", "zeroshot", 1.0)]
    assert zero["value"] is None and "image-text model" in zero["skipped"][0]["reason"]
    pair = next(
        c for c in summary["comparisons"] if c["protocol"] == "probe" and c["label_fraction"] == 1
    )
    # a (no {seed} in its spec) is probed once at full labels: that run stands for both seeds
    a_full = rows[("a", "probe", 1.0)]
    assert a_full["results"] == ["grades/a/probe/seed-0"] and a_full["fixed"]
    assert not (out / "grades/a/probe/seed-1").exists()
    assert (pair["a"], pair["b"], pair["seeds"]) == ("a", "b", [0, 1])
    a_runs = [_read_predictions(out / a_full["results"][0])[1]] * 2
    per_seed_diff = [
        roc_auc_score(truth, a) - roc_auc_score(truth, b) for a, b in zip(a_runs, runs, strict=True)
    ]
    assert pair["per_seed_diff"] == pytest.approx(per_seed_diff, abs=1e-6)
    assert pair["diff"] == pytest.approx(np.mean(per_seed_diff), abs=1e-6)
    paired = _interval_by_hand(truth, a_runs, patients, 50, 0, baseline=runs)
    assert pair["ci95"] == pytest.approx(paired, abs=1e-6)
    saved = json.loads((out / "benchmark.json").read_text())
    assert {"rows", "comparisons", "missing", "settings"} <= set(saved)  # as docs/benchmark.md
    assert saved["settings"]["bootstrap"] == 50 and saved["settings"]["data_root"] == str(tmp_path)
    table = (out / "table.md").read_text()
    # said in benchmark.json, table.md and on the terminal
    assert [n.split(" at full")[0] for n in saved["notes"]] == ["probe of a", "zeroshot of a"]
    assert saved["notes"][0].startswith("probe of a at full labels runs once, not 2 times")
    assert all(f"- {note}" in table for note in saved["notes"])
    assert f"{100 * full['value']:.2f}" in table
    assert (
        "| covidx | not run |  | accuracy | - | - | -/39.00 | -/- |" in table
    )  # the paper's row stays
    with (out / "table.csv").open(newline="") as handle:
        table_rows = list(csv.DictReader(handle))
    (csv_row,) = [r for r in table_rows if r["protocol"] == "probe" and r["label_fraction"] == "1"]
    assert float(csv_row["b"]) == pytest.approx(full["value"], abs=1e-6)
    # The paper's numbers are the probe's own (not fine-tuning's) and stand beside the
    # full-label row alone: the paper reports no label fraction below 1.
    assert full["paper"] == pytest.approx(0.975)
    assert full["paper_other"] == {"CLIP": pytest.approx(0.6125)}
    assert rows[("b", "probe", 0.5)]["paper"] is None
    assert rows[("b", "probe", 0.5)]["paper_other"] == {}
    assert rows[("a", "zeroshot", 1.0)]["paper"] is None  # the paper has no zero-shot number
    assert _table_line(table, "grades", "probe", "1")[-2:] == ["97.50", "61.25"]
    assert _table_line(table, "grades", "probe", "0.5")[-2:] == ["", ""]
    assert (csv_row["paper_mgll"], csv_row["paper_clip"]) == ("0.9750", "0.6125")
    (csv_half,) = [
        r for r in table_rows if r["protocol"] == "probe" and r["label_fraction"] == "0.5"
    ]
    assert (csv_half["paper_mgll"], csv_half["paper_clip"]) == ("", "")
    page = (out / "report.html").read_text()
    assert _report_row(page, "grades", "probe", "1").endswith("<td>97.50</td><td>61.25</td>")
    assert _report_row(page, "grades", "probe", "0.5").endswith("<td></td><td></td>")

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


def test_fine_tuning_trains_on_the_label_fraction_draw(tmp_path, monkeypatch):
    """A spy on the epoch engine: the images each fine-tuning unit's training set holds are
    its seed's draw of half the training patients, the same draw the probe fits on."""
    import mgll.eval.finetune as finetune

    task_file = _task_file(tmp_path)
    folder = tmp_path / "grades"
    trained_on: dict[int, list[str]] = {}
    real_fit = finetune.fit

    def spy_fit(scope, task, settings):
        images = [
            Path(r.image).relative_to(folder).as_posix() for r in task.train_set.images.records
        ]
        trained_on[settings.seed] = sorted(images)
        return real_fit(scope, task, settings)

    monkeypatch.setattr(finetune, "fit", spy_fit)
    summary = run_benchmark(
        [ENCODER], str(task_file), "finetune", tmp_path / "out",
        draws=2, label_fractions="0.5", epochs=1, n_resamples=10, echo=lambda s: None,
    )  # fmt: skip
    train_images = _split_images(folder, "Train")
    assert trained_on == {s: _hand_draw(train_images, 0.5, s) for s in (0, 1)}
    (row,) = summary["rows"]
    assert row["seeds"] == [0, 1] and row["value"] is not None
    for s in (0, 1):
        results = json.loads((tmp_path / "out" / row["results"][s] / "results.json").read_text())
        assert results["details"]["n_train"] == 12


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
        | ({} if f == 1 else {"paper": None, "paper_other": {}})  # the paper: full labels only
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
    assert "90.00 [90.00, 99.00] (n=3)" in text
    assert _report_row(text, "palm", "probe", "1").endswith("<td>99.66</td><td>93.94</td>")
    assert _report_row(text, "palm", "probe", "0.1").endswith("<td></td><td></td>")
    assert "mgll better" in text and "amd.grand-challenge.org" in text
    assert "runs/&lt;s{seed}&gt;" in text  # escaped, not markup


def test_report_plot_is_in_percent_with_the_papers_numbers_at_full_labels(monkeypatch):
    import mgll.benchmark.report as report

    axes = []
    monkeypatch.setattr(report, "_png", lambda fig: axes.append(fig.axes[0]) or "data:,")
    report.render_report(_summary())
    (ax,) = axes
    assert ax.get_ylabel() == "auc_macro (%)"
    means = {bars.get_label(): list(bars.lines[0].get_ydata()) for bars in ax.containers}
    assert means["mgll"] == pytest.approx([70.0, 80.0, 90.0])  # the table's 70.00, 80.00, 90.00
    marks = {c.get_label(): c.get_offsets().tolist() for c in ax.collections}
    assert marks["paper MGLL"][0] == pytest.approx([1.0, 99.66])  # one mark, at full labels
    assert marks["paper CLIP"][0] == pytest.approx([1.0, 93.94])
    assert len(marks["paper MGLL"]) == len(marks["paper CLIP"]) == 1


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


def test_zero_shot_and_full_label_probes_run_per_seed_only_when_the_encoder_changes():
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
        ("fixed", "probe", 0.1): 5,  # each seed draws other training labels
        ("fixed", "probe", 1.0): 1,  # the same features and labels every seed: run once
    }
    fixed = {(u["encoder"], u["protocol"], u["label_fraction"]) for u in plan if u["fixed"]}
    assert fixed == {("fixed", "zeroshot", 1.0), ("fixed", "probe", 1.0)}
    finetune = plan_units([task], encoders, ["finetune"], [1.0], seeds=3, draws=5, first_seed=0)
    assert len(finetune) == 6  # a seed changes fine-tuning's initialisation and order
    seeds = sorted(
        u["seed"] for u in plan if u["encoder"] == "mgll" and u["protocol"] == "zeroshot"
    )
    assert seeds == [2, 3, 4]
