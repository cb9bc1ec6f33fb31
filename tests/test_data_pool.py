"""Pools: several dataset specs read as one corpus, split, checked, cached and trained on.

Sources are tiny dataset specs written here (a table and a few 24 x 32 PNGs each); expected
records, splits and counts are written out by hand from those tables.
"""

from __future__ import annotations

import csv
import json
from collections import Counter

import numpy as np
import pytest

from data_fixtures import require_shared, write_png
from mgll.cli import main
from mgll.data import PreprocessCache, prepare_data
from mgll.data.build import load_pool, load_records
from mgll.data.cache import default_cache_dir
from mgll.data.pool import PoolError, sampling_weights
from mgll.training.sampling import GlobalBatchSampler

GRADES_SPEC = """
table: grades.csv
image: {column: path, root: images}
patient: patient
levels:
  - {name: grade, label: grade}
  - {name: report, text: report}
"""
MYOPIA_SPEC = """
table: myopia.csv
image: {column: path, root: images}
split: split
levels:
  - {name: diagnosis, label: diagnosis}
"""


def _image(path, value):
    """A PNG whose bytes depend on ``value`` only (equal values: byte-identical files)."""
    ramp = np.full((24, 32), value, dtype=np.uint8)
    ramp[0, :] = np.arange(32, dtype=np.uint8)
    return write_png(path, ramp)


def _source(folder, table, spec, header, rows):
    """A spec source: ``rows`` are (image name, pixel value, *other columns)."""
    (folder / "images").mkdir(parents=True)
    lines = [header]
    for name, value, *cells in rows:
        _image(folder / "images" / name, value)
        lines.append(",".join([name, *cells]))
    (folder / table).write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "spec.yaml").write_text(spec, encoding="utf-8")


def _sources(root):
    """grades: 6 photos of 3 patients (one photo identical to myopia's test photo m4);
    myopia: 5 photos with a shipped split (train/val/test)."""
    _source(
        root / "grades",
        "grades.csv",
        GRADES_SPEC,
        "path,patient,grade,report",
        [
            ("g1.png", 10, "p1", "Normal", "clear view"),
            ("g2.png", 11, "p1", "Severe", "dense haze"),
            ("g3.png", 12, "p2", "Mild", "slight haze"),
            ("g4.png", 13, "p2", "Normal", ""),
            ("g5.png", 14, "p3", "Mild", "slight haze"),
            ("g6.png", 99, "p3", "Severe", "dense haze"),  # = myopia's m4 (its test photo)
        ],
    )
    _source(
        root / "myopia",
        "myopia.csv",
        MYOPIA_SPEC,
        "path,diagnosis,split",
        [
            ("m1.png", 20, "pathologic", "train"),
            ("m2.png", 21, "normal", "train"),
            ("m3.png", 22, "pathologic", "val"),
            ("m4.png", 99, "normal", "test"),
            ("m5.png", 24, "pathologic", "test"),
        ],
    )


POOL = """
levels: [abnormality, disease, explanation]
sources:
  - name: grades
    source: grades/spec.yaml
    levels: {grade: disease, report: explanation}
    rename: {disease: {Normal: normal, Mild: mild cataract, Severe: severe cataract}}
    split: {train: 0.34, val: 0.33, test: 0.33, seed: 1}
  - name: myopia
    source: myopia/spec.yaml
    levels: {diagnosis: disease}
    prompt: {disease: "A fundus photograph: {label}."}
    weight: 3
derive:
  abnormality: {from: disease, map: {normal: normal, "*": abnormal}, prompt: "{label} eye"}
split: {mode: source}
"""


def _pool(tmp_path, text=POOL):
    _sources(tmp_path)
    path = tmp_path / "pool.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _by_name(records):
    return {r.image.name: r for r in records.records}


def test_pool_maps_levels_renames_derives_prompts_and_namespaces_patients(tmp_path):
    records = load_pool(_pool(tmp_path))
    assert [lv.name for lv in records.levels] == ["abnormality", "disease", "explanation"]
    assert records.levels[1].vocabulary == sorted(
        ["normal", "mild cataract", "severe cataract", "pathologic"]
    )
    r = _by_name(records)
    # grades: disease renamed, explanation from its report, abnormality derived from the disease
    assert r["g2.png"].labels == [["abnormal"], ["severe cataract"], ["dense haze"]]
    assert r["g2.png"].texts == [["abnormal eye"], ["Severe"], ["dense haze"]]
    assert r["g1.png"].labels[0] == ["normal"]
    assert r["g4.png"].labels[2] == []  # an empty report is missing, as in the source
    # myopia: the pool's explanation is missing (MGLL's rule: no labels, not an empty class)
    assert r["m1.png"].labels == [["abnormal"], ["pathologic"], []]
    assert r["m1.png"].texts[1] == ["A fundus photograph: pathologic."]  # the source's prompt
    assert r["m1.png"].texts[2] == [""]
    assert "" not in records.levels[2].vocabulary
    # patients namespaced per source; a photo without a patient id stays its own patient
    assert r["g3.png"].patient_id == "grades:p2"
    assert r["m2.png"].patient_id is None
    assert {x.metadata["source"] for x in records.records} == {"grades", "myopia"}
    pool = records.pool
    assert [(s.name, s.records, s.weight) for s in pool.sources] == [
        ("grades", 6, 1.0),
        ("myopia", 5, 3.0),
    ]
    assert pool.sources[1].levels == ("abnormality", "disease")  # explanation: none labelled


def test_identical_photos_across_sources_are_one_patient_on_the_held_out_side(tmp_path):
    records = load_pool(_pool(tmp_path))
    r = _by_name(records)
    # g6 (grades, patient p3) = m4 (myopia's official test photo): one patient, all in test
    assert records.pool.identical == (
        (str(tmp_path / "grades/images/g6.png"), str(tmp_path / "myopia/images/m4.png")),
    )
    assert r["g6.png"].patient_id == r["m4.png"].patient_id == r["g5.png"].patient_id
    assert r["g5.png"].metadata["split"] == r["g6.png"].metadata["split"] == "test"
    # myopia keeps its shipped split exactly
    shipped = {"m1.png": "train", "m2.png": "train", "m3.png": "val", "m4.png": "test"}
    assert {n: r[n].metadata["split"] for n in shipped} == shipped
    # grades (no shipped split) is split by its own patient fractions: 3 patients, 1 each
    grade_splits = Counter(
        frozenset(x.metadata["split"] for x in records.records if x.patient_id == p)
        for p in ("grades:p1", "grades:p2")
    )
    assert all(len(s) == 1 for s in grade_splits)  # a patient never spans two splits
    assert {x.metadata["split"] for x in records.records if x.metadata["source"] == "grades"} == {
        "train",
        "val",
        "test",
    }


def test_patient_mode_ignores_shipped_splits_and_prepare_data_uses_the_pools_split(tmp_path):
    path = _pool(tmp_path, POOL.replace("split: {mode: source}", "split: {mode: patient}"))
    records = load_pool(path)
    assert any(r.metadata["split"] != r.metadata.get("source_split") for r in records.records)
    prepared = prepare_data({"source": str(path)}, None, seed=0)  # data.split left default
    expected = {name: [] for name in ("train", "val", "test")}
    for i, r in enumerate(prepared.records.records):
        expected[r.metadata["split"]].append(i)
    assert prepared.indices == expected
    seeded = prepare_data({"source": str(path), "split": {"seed": 5}}, None, seed=0)
    assert seeded.indices == expected  # a seed alone keeps the pool's split
    whole = prepare_data(
        {"source": str(path), "split": {"train": 0.5, "val": 0, "test": 0.5}}, None, 0
    )
    assert whole.indices["val"] == [] and whole.indices != expected  # fractions: whole pool


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("levels: {grade: disease,", "levels: {grade: illness,"), "sources[0].levels.grade"),
        (("levels: {diagnosis: disease}", "levels: {dx: disease}"), "has no level 'dx'"),
        (('"*": abnormal', "Mild: abnormal"), "label 'severe cataract' of level 'disease'"),
        (("myopia/spec.yaml", "nowhere/spec.yaml"), "nowhere/spec.yaml not found"),
        (("weight: 3", "wieght: 3"), "key 'sources[1].wieght' (did you mean 'weight'?)"),
        (("name: myopia", "name: grades"), "two sources are named 'grades'"),
        (("split: {mode: source}", "split: {mode: random}"), "split.mode"),
        # read by schema.from_mapping: a key spelled "from" and the file's value types
        (("{from: disease,", "{form: disease,"), "'derive.abnormality.form' (did you mean 'from'"),
        (("seed: 1}", "seed: 1, mode: patient}"), "unknown config key 'sources[0].split.mode'"),
        (("Mild: mild cataract", "Mild: yes"), "'sources[0].rename.disease.Mild' must be a str"),
    ],
)
def test_pool_errors_name_the_file_and_key(tmp_path, edit, message):
    path = _pool(tmp_path, POOL.replace(*edit))
    with pytest.raises(PoolError) as err:
        load_pool(path)
    assert str(path) in str(err.value) and message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_source_folder_is_looked_up_next_to_the_pool_then_under_the_data_root(tmp_path):
    _sources(tmp_path / "data")
    (tmp_path / "pools").mkdir()
    path = tmp_path / "pools" / "pool.yaml"
    path.write_text(POOL, encoding="utf-8")
    with pytest.raises(PoolError, match="--data-root"):
        load_pool(path)
    records, folder = load_records(str(path), None, data_root=tmp_path / "data")
    assert folder == tmp_path / "pools" and len(records.records) == 11


def test_sampling_weights_follow_source_weight_and_temperature(tmp_path):
    records = load_pool(_pool(tmp_path))  # grades 6 records weight 1, myopia 5 weight 3
    weights = sampling_weights(records)
    mass = {"grades": 6 * 1.0, "myopia": 5 * 3.0}  # T = 1: (w * n) ** 1
    share = {s: m / sum(mass.values()) for s, m in mass.items()}
    for r, w in zip(records.records, weights, strict=True):
        n = 6 if r.metadata["source"] == "grades" else 5
        assert w == pytest.approx(share[r.metadata["source"]] / n)
    hot = load_pool(_pool(tmp_path / "t", POOL + "sampling: {temperature: 2}\n"))
    mass = {"grades": 6.0**0.5, "myopia": 15.0**0.5}
    got = Counter()
    for r, w in zip(hot.records, sampling_weights(hot), strict=True):
        got[r.metadata["source"]] += w
    assert got["myopia"] == pytest.approx(mass["myopia"] / sum(mass.values()))
    plain = load_pool(_pool(tmp_path / "u", POOL.replace("weight: 3", "weight: 1")))
    assert sampling_weights(plain) is None  # equal weights, T = 1: plain shuffled epochs


def test_weighted_sampler_draws_sources_in_proportion_and_repeats_per_epoch():
    weights = [0.8 / 10] * 10 + [0.2 / 90] * 90  # source A: 10 samples drawn 80% of the time
    sampler = GlobalBatchSampler(100, 20, seed=3, weights=weights)
    sampler.set_epoch(0)
    first = [key for batch in sampler for key in batch]
    sampler.set_epoch(0, start_step=2)
    assert [key for batch in sampler for key in batch] == first[40:]  # resumes mid-epoch
    counts = Counter()
    for epoch in range(30):
        sampler.set_epoch(epoch)
        counts.update(index < 10 for batch in sampler for index, _, _ in batch)
    assert counts[True] / sum(counts.values()) == pytest.approx(0.8, abs=0.03)


def test_check_reports_sources_and_fails_on_labels_spelled_two_ways(tmp_path, capsys):
    # without the rename, grades says "Normal" and myopia "normal": two classes of one label
    path = _pool(tmp_path, POOL.replace("Normal: normal, ", ""))
    assert (
        main(["data", "check", str(path), "--no-decode", "--output", str(tmp_path / "r.json")]) == 1
    )
    out = capsys.readouterr().out
    assert "disease: 'Normal' (grades 2) vs 'normal' (myopia 2)" in out
    report = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    grades, myopia = report["sources"]
    assert grades["records"] == 6 and myopia["missing_levels"] == ["explanation"]
    assert myopia["levels"][1]["counts"] == {"pathologic": 3, "normal": 2}
    assert myopia["splits"] == {"train": 2, "val": 1, "test": 2}
    # the level myopia never labels is not listed photo by photo; grades' empty report is
    assert report["empty_unlabelled_texts"] == [
        {"image": str(tmp_path / "grades/images/g4.png"), "level": "explanation"}
    ]
    assert report["identical_across_sources"] == [
        [
            f"{tmp_path / 'grades/images/g6.png'} (grades)",
            f"{tmp_path / 'myopia/images/m4.png'} (myopia)",
        ]
    ]
    fixed = _pool(tmp_path / "fixed")
    assert main(["data", "check", str(fixed), "--no-decode"]) == 0
    assert (
        "labels spelled two ways (error; rename one in the pool file): 0" in capsys.readouterr().out
    )


def test_data_split_of_a_pool_writes_its_split_with_sources(tmp_path, capsys):
    path = _pool(tmp_path)
    out = tmp_path / "split.csv"
    assert main(["data", "split", str(path), "--output", str(out)]) == 0
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    records = load_pool(path)
    assert [(r["image"], r["source"], r["split"]) for r in rows] == [
        (
            str(rec.image),  # absolute: each source's evaluation reads it too
            rec.metadata["source"],
            rec.metadata["split"],
        )
        for rec in records.records
    ]


def test_each_source_reads_through_its_own_cache_shared_with_single_source_runs(tmp_path):
    path = _pool(tmp_path)
    cache_root = tmp_path / "cache"
    pooled = prepare_data({"source": str(path), "cache_dir": str(cache_root)}, None, seed=0)
    train = pooled.datasets(image_size=16, mean=(0.5,) * 3, std=(0.5,) * 3)["train"]
    for i in range(len(train)):
        train[i]
    for source in ("grades", "myopia"):
        folder = default_cache_dir(tmp_path / source, cache_root)
        entries = list(folder.rglob("*.npy"))
        expected = [
            r for r in train.records if r.metadata["source"] == source
        ]  # one entry per training photo of that source, in that source's folder
        assert len(entries) == len(expected) > 0
    alone = prepare_data(
        {
            "source": str(tmp_path / "myopia/spec.yaml"),
            "cache_dir": str(cache_root),
            "split": {"mode": "source"},
        },
        None,
        seed=0,
    )
    single = alone.datasets(image_size=16, mean=(0.5,) * 3, std=(0.5,) * 3)["train"]
    for i in range(len(single)):
        single[i]
    assert isinstance(single.cache, PreprocessCache)
    assert (single.cache.hits, single.cache.misses) == (len(single), 0)


def _train_fakes(tmp_path, data, monkeypatch):
    """A one-step run of the test model on ``data`` (a data section); the sampler's weights."""
    from mgll.data import collate_samples
    from mgll.training import loaders, trainer
    from training_fakes import fake_config, fake_model_factory

    seen = []

    class Spy(GlobalBatchSampler):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs.get("weights"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(loaders, "GlobalBatchSampler", Spy)
    cfg = fake_config(
        {
            "data": {**data, "cache_dir": False},
            "train.batch_size": 2,
            "train.epochs": 1,
            "train.max_steps": 1,
        }
    )
    out = tmp_path / "run"
    summary = trainer.train(
        cfg,
        tmp_path,
        out,
        model_factory=fake_model_factory(),
        data_builder=prepare_data,
        collate_fn=collate_samples,
    )
    rows = list(csv.DictReader((out / "split.csv").open(encoding="utf-8")))
    assert json.loads((out / "summary.json").read_text())["sources"] == summary["sources"]
    return summary, rows, seen[0]


def test_pretraining_on_a_pool_writes_split_csv_counts_sources_and_weights_draws(
    tmp_path, monkeypatch
):
    path = _pool(tmp_path)
    summary, rows, weights = _train_fakes(tmp_path, {"source": str(path)}, monkeypatch)
    records = load_pool(path)
    assert rows[0].keys() == {"image", "source", "patient_id", "split"}
    assert [(r["source"], r["patient_id"], r["split"]) for r in rows] == [
        (x.metadata["source"], x.patient_id or "", x.metadata["split"]) for x in records.records
    ]
    expected = Counter((x.metadata["source"], x.metadata["split"]) for x in records.records)
    assert summary["sources"] == {
        s: {split: expected[(s, split)] for split in ("train", "val", "test")}
        for s in ("grades", "myopia")
    }
    # myopia weighs 3: its training photos share 3 * n_myopia / (n_grades + 3 * n_myopia)
    n = {s: expected[(s, "train")] for s in ("grades", "myopia")}
    train = [x for x in records.records if x.metadata["split"] == "train"]
    share = sum(w for x, w in zip(train, weights, strict=True) if x.metadata["source"] == "myopia")
    assert share == pytest.approx(3 * n["myopia"] / (n["grades"] + 3 * n["myopia"]))


def test_a_pool_runs_split_csv_splits_the_evaluation_of_each_source(tmp_path, monkeypatch):
    from mgll.eval.task import load_eval_data

    path = _pool(tmp_path)
    _train_fakes(tmp_path, {"source": str(path)}, monkeypatch)
    pooled = load_pool(path)
    data = load_eval_data(
        str(tmp_path / "grades" / "spec.yaml"),
        "grade",
        split={"file": str(tmp_path / "run" / "split.csv")},
    )
    grades = [r for r in pooled.records if r.metadata["source"] == "grades"]
    assert {name: data.rows[name].tolist() for name in ("train", "val", "test")} == {
        name: [i for i, r in enumerate(grades) if r.metadata["split"] == name]
        for name in ("train", "val", "test")
    }


def test_a_single_dataset_run_writes_split_csv_too(tmp_path, monkeypatch):
    _sources(tmp_path)
    data = {"source": str(tmp_path / "myopia" / "spec.yaml"), "split": {"mode": "source"}}
    summary, rows, weights = _train_fakes(tmp_path, data, monkeypatch)
    assert weights is None  # plain shuffled epochs
    assert [(r["image"], r["source"], r["split"]) for r in rows] == [
        ("images/m1.png", "myopia", "train"),
        ("images/m2.png", "myopia", "train"),
        ("images/m3.png", "myopia", "val"),
        ("images/m4.png", "myopia", "test"),
        ("images/m5.png", "myopia", "test"),
    ]
    assert summary["sources"] == {"myopia": {"train": 2, "val": 1, "test": 2}}


@pytest.mark.shared_data
def test_shipped_fundus_pool_keeps_every_test_photo_out_of_pretraining(tmp_path, capsys):
    root = require_shared("palm").parent
    require_shared("csdi-fundus")
    require_shared("idrid")
    pool = "package:mgll/pools/fundus-pool.yaml"
    assert main(["data", "check", pool, "--data-root", str(root), "--no-decode"]) == 0
    out = capsys.readouterr().out
    assert "labels spelled two ways (error; rename one in the pool file): 0" in out
    records, _ = load_records(pool, None, data_root=root)
    validation = {p.name for p in (root / "palm" / "PALM-Validation400").glob("*.jpg")}
    # P0056 = V0163 and P0057 = V0252 (README): the adapter drops those two test copies
    assert len(validation) == 400
    by_source = Counter(r.metadata["source"] for r in records.records)
    assert by_source == {"csdi-fundus": 187, "palm": 798, "idrid": 515}
    splits = {
        r.image.name: r.metadata["split"]
        for r in records.records
        if r.image.parent.name == "PALM-Validation400"
    }
    assert len(splits) == 398 and set(splits.values()) == {"test"}
    assert set(splits) == validation - {"V0163.jpg", "V0252.jpg"}
    training = [r for r in records.records if r.image.parent.name == "PALM-Training400"]
    assert len(training) == 400 and {r.metadata["split"] for r in training} == {"train", "val"}
    assert [lv.name for lv in records.levels] == ["abnormality", "disease", "explanation"]
    # IDRiD: the testing set is the pool's test split, less the copy of a training photo.
    idrid = {
        (r.image.parent.name, r.image.stem): r.metadata["split"]
        for r in records.records
        if r.metadata["source"] == "idrid"
    }
    testing = {k: v for k, v in idrid.items() if k[0] == "b. Testing Set"}
    assert len(testing) == 102 and set(testing.values()) == {"test"}
    assert ("b. Testing Set", "IDRiD_064") not in testing
    training = [v for k, v in idrid.items() if k[0] == "a. Training Set"]
    assert len(training) == 413 and set(training) == {"train", "val"}
    # The multi-label disease level: a photo with both findings carries both.
    by_disease = Counter(tuple(r.labels[1]) for r in records.records)
    assert by_disease[("diabetic retinopathy", "diabetic macular edema")] > 0
    assert records.levels[1].multi_label


@pytest.mark.shared_data
def test_the_two_source_pool_is_kept_for_the_scratch_recipe():
    root = require_shared("palm").parent
    require_shared("csdi-fundus")
    records, _ = load_records("package:mgll/pools/csdi-palm.yaml", None, data_root=root)
    assert Counter(r.metadata["source"] for r in records.records) == {
        "csdi-fundus": 187,
        "palm": 798,
    }


def test_evaluation_reads_a_pool_with_its_split(tmp_path):
    from mgll.eval.task import load_eval_data

    path = _pool(tmp_path)
    data = load_eval_data(str(path), "disease")
    records = load_pool(path)
    labelled = {
        name: sorted(
            i for i, r in enumerate(records.records) if r.metadata["split"] == name and r.labels[1]
        )
        for name in ("train", "val", "test")
    }
    assert {name: data.rows[name].tolist() for name in labelled} == labelled
    assert data.split_info["settings"] == {"mode": "source"}


def test_a_bad_pool_is_one_line_on_stderr_and_exit_1(tmp_path, capsys):
    path = _pool(tmp_path, POOL.replace("levels: {diagnosis: disease}", "levels: {}"))
    assert main(["data", "check", str(path), "--no-decode"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("mgll data check: error: ") and "\n" not in err
    assert f"{path}: sources[1].levels: must map the source's level names" in err


def test_a_level_derived_from_a_multi_label_level_is_multi_label(tmp_path):
    spec = """
table: t.csv
image: {column: path, root: images}
levels:
  - {name: findings, label: findings, separator: "|"}
"""
    _source(
        tmp_path / "multi",
        "t.csv",
        spec,
        "path,findings",
        [("a.png", 1, "cataract|myopia"), ("b.png", 2, "normal"), ("c.png", 3, "")],
    )
    (tmp_path / "pool.yaml").write_text(
        """
levels: [part, disease]
sources: [{source: multi/spec.yaml, levels: {findings: disease}}]
derive: {part: {from: disease, map: {cataract: lens, myopia: retina, normal: none}}}
""",
        encoding="utf-8",
    )
    records = load_pool(tmp_path / "pool.yaml")
    assert [lv.multi_label for lv in records.levels] == [True, True]
    assert [r.labels[0] for r in records.records] == [["lens", "retina"], ["none"], []]
    assert records.records[0].texts[0] == ["lens, retina"]  # the default prompt: {label}
