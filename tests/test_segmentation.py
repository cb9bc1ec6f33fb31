"""mgll segment: mask sources and problems, MONAI metrics against hand counts, decoders, CLI."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from open_clip.model import _build_vision_tower
from PIL import Image

from data_fixtures import require_shared
from mgll.cli import main
from mgll.segmentation.data import (
    MaskCache,
    MaskRef,
    SegSample,
    read_mask,
    report_problems,
    resize_mask,
    seg_split,
    write_pretrain_split,
)
from mgll.segmentation.decoders import SegmentationModel
from mgll.segmentation.sources import load_covid_cxr_seg, load_mask_folder, load_mask_table
from mgll.segmentation.train import per_image_scores, summarize_scores
from seg_fixtures import covid_seg_folder, rgba_mask, write_toy_folder


def test_covid_seg_groups_templates_into_classes_and_patients(tmp_path):
    source = load_covid_cxr_seg(covid_seg_folder(tmp_path / "seg"))
    assert source.classes == ["lungs", "ground_glass_opacity", "consolidation"]
    assert [s.patient_id for s in source.samples] == ["7", "7", "8"]
    first = source.samples[0]
    assert [len(refs) for refs in first.masks] == [2, 1, 0]  # both lungs, one GGO, none
    targets = [MaskCache(None, 20, "stretch").target(s, []) for s in source.samples]
    assert targets[0].shape == (3, 20, 20) and set(np.unique(targets[0])) == {0, 1}
    # Lungs = union of the two boxes: 32 of 40 columns x 26 of 30 rows.
    assert targets[0][0].mean() == pytest.approx(32 / 40 * 26 / 30, abs=0.03)
    assert targets[1][1].sum() == 0 and targets[0][1].sum() > 0
    with pytest.raises(ValueError, match="not covid-cxr-seg classes"):
        load_covid_cxr_seg(tmp_path / "seg", ["lungs", "tumour"])


def test_mask_problems_are_named_counted_and_dropped(tmp_path):
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "img.png")
    good = rgba_mask(tmp_path / "good.png", (0, 0, 10, 10))
    wrong_size = rgba_mask(tmp_path / "big.png", (0, 0, 10, 10), size=(80, 60))
    empty = rgba_mask(tmp_path / "empty.png", (0, 0, 0, 0))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    cache = MaskCache(tmp_path / "cache", 16, "pad")
    problems: list = []

    def sample(*refs: Path) -> SegSample:
        return SegSample(tmp_path / "img.png", "p", [[MaskRef(r) for r in refs]])

    assert cache.target(sample(good, wrong_size), problems) is None
    assert cache.target(sample(broken), problems) is None
    kept = cache.target(sample(good, empty), problems)
    assert kept is not None and kept.sum() > 0  # an empty mask is reported, not fatal
    lines = report_problems(problems)
    assert lines[0].startswith("1 mask(s) cannot be read") and "broken.png" in lines[0]
    assert lines[1].startswith("1 mask(s) differ in size") and "80x60 vs image 40x30" in lines[1]
    assert lines[2].startswith("1 mask(s) are empty") and "empty.png" in lines[2]
    # The usable target was cached; the dropped ones were not.
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 1
    assert np.array_equal(cache.target(sample(good, empty), []), kept)


def test_masks_resize_with_nearest_neighbour_on_the_image_geometry(tmp_path):
    mask = np.zeros((10, 20), bool)
    mask[:, :10] = True  # left half
    padded = resize_mask(mask, 8, "pad")  # 20x10 -> 8x4 pasted in the middle rows
    assert set(np.unique(padded)) <= {0, 1}
    assert padded[:2].sum() == 0 and padded[6:].sum() == 0
    assert padded[2:6, :4].all() and not padded[2:6, 4:].any()
    cropped = resize_mask(mask, 8, "crop")  # 10 rows -> 8, centre crop of the 16 columns
    assert cropped[:, :4].all() and not cropped[:, 4:].any()
    index = np.array([[0, 1], [2, 2]], np.uint8)
    Image.fromarray(index).save(tmp_path / "index.png")
    picked = read_mask(MaskRef(tmp_path / "index.png", 2), (2, 2))
    assert picked.tolist() == [[False, False], [True, True]]


def test_folder_and_table_forms(tmp_path):
    for name in ("images", "masks"):
        (tmp_path / name).mkdir()
    for i in range(2):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / f"a{i}.png")
        Image.fromarray(np.full((8, 8), i + 1, np.uint8)).save(tmp_path / "masks" / f"a{i}.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "lonely.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        source = load_mask_folder(tmp_path, ["a", "b"])
    assert "1 image(s)" in str(caught[0].message) and "lonely.png" in str(caught[0].message)
    assert [[r.value for r in refs] for refs in source.samples[0].masks] == [[1], [2]]
    (tmp_path / "t.csv").write_text(
        "image,mask,class,patient_id\nimages/a0.png,masks/a0.png,b,p1\nimages/a1.png,masks/a1.png,a,p1\n"
    )
    table = load_mask_table(tmp_path / "t.csv")
    assert table.classes == ["b", "a"] and [s.patient_id for s in table.samples] == ["p1", "p1"]
    assert [len(r) for r in table.samples[1].masks] == [0, 1]


def test_monai_dice_and_iou_match_hand_counts_and_skip_empty_ground_truth():
    target = torch.zeros(2, 2, 4, 4)
    target[0, 0, :2] = 1  # 8 pixels
    logits = torch.full((2, 2, 4, 4), -5.0)
    logits[0, 0, :1] = 5  # predicts 4 of the 8
    logits[0, 0, 3, 0] = 5  # and 1 false positive
    dice, iou = per_image_scores(logits, target)
    assert dice[0, 0] == pytest.approx(2 * 4 / (5 + 8))
    assert iou[0, 0] == pytest.approx(4 / 9)
    assert np.isnan(dice[0, 1]) and np.isnan(dice[1]).all()  # no ground truth: not scored
    scores = np.array([[0.5, np.nan], [0.7, 0.2], [0.9, np.nan]])
    out = summarize_scores(scores, ["a", "a", "b"], ["x", "y"], 200, 0)
    assert out["x"]["value"] == pytest.approx(0.7) and out["x"]["n_images"] == 3
    assert out["y"]["value"] == pytest.approx(0.2) and out["y"]["n_images"] == 1
    assert out["mean"]["value"] == pytest.approx(0.45)


def test_dice_ci_resamples_patients_not_images():
    """Each patient's images repeated ten times keep every interval as it was (patients are
    drawn, their images come along); drawing images would narrow them. The intervals equal a
    bootstrap computed here over patient means of the image values."""
    scores = np.array([[0.2, np.nan], [0.9, 0.4], [0.5, 0.8], [0.7, np.nan], [0.1, 0.3]])
    patients = ["a", "b", "c", "d", "e"]
    once = summarize_scores(scores, patients, ["x", "y"], 300, 0)
    many = summarize_scores(
        np.repeat(scores, 10, axis=0), np.repeat(patients, 10), ["x", "y"], 300, 0
    )
    for name in ("x", "y", "mean"):
        assert many[name]["ci95"] == pytest.approx(once[name]["ci95"]), name
    # Independent: draw patients with numpy, average the x values of the drawn images.
    rng = np.random.default_rng(0)
    draws = [scores[rng.integers(0, 5, size=5), 0].mean() for _ in range(300)]
    assert once["x"]["ci95"] == pytest.approx(list(np.percentile(draws, [2.5, 97.5])))


class EpochStub(torch.nn.Module):
    """A segmentation model whose predictions are perfect after epoch ``good`` only (an
    epoch counter in its state, advanced by each ``train()``), wrong after the others."""

    def __init__(self, good: int):
        super().__init__()
        self.good = good
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.register_buffer("epoch", torch.zeros((), dtype=torch.long))

    def param_groups(self, lr, encoder_lr):
        return [{"params": [self.w], "lr": lr}]

    def train(self, mode: bool = True):
        if mode:
            self.epoch += 1
        return super().train(mode)

    def forward(self, images):
        truth = images[:, :1] * 20 - 10  # the image's first channel is its mask
        return (truth if int(self.epoch) == self.good else -truth) + 0 * self.w


def test_the_weights_scored_are_those_of_the_best_validation_epoch():
    from torch.utils.data import TensorDataset

    from mgll.segmentation.config import SegmentationConfig
    from mgll.segmentation.train import fit, predict

    masks = torch.zeros(4, 1, 8, 8)
    masks[:, :, 2:6, 2:6] = 1
    data = TensorDataset(masks.repeat(1, 3, 1, 1), masks)
    model = EpochStub(good=2)
    cfg = SegmentationConfig(epochs=4, batch_size=2, device="cpu")
    result = fit(model, {"train": data, "val": data}, cfg, log=lambda _: None)
    history = result.history
    assert result.best_epoch == 2
    assert [round(r["val_dice"], 3) for r in history] == [0.0, 1.0, 0.0, 0.0]
    assert int(model.epoch) == 2  # the state of epoch 2 is back in the model
    assert int(result.best_state["epoch"]) == 2  # and returned
    logits, truth = predict(model, data, 2, "cpu")
    dice, _ = per_image_scores(logits, truth)
    assert dice == pytest.approx(np.ones((4, 1)))


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_decoders_give_full_resolution_logits_and_respect_freezing(kind):
    torch.manual_seed(0)
    if kind == "vit":
        cfg = {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8}
    else:
        cfg = {"layers": [1, 1, 1, 1], "width": 8, "image_size": 64}
    tower = _build_vision_tower(16, cfg, False)
    size = cfg["image_size"]
    model = SegmentationModel(tower, 3, size, feature_size=8, freeze_encoder=True)
    assert model.skip_strides == ([2, 4] if kind == "vit" else [4, 8, 16])
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 3, size, size)
    out.sum().backward()
    assert all(p.grad is None for p in tower.parameters())
    assert len(model.param_groups(1e-3, 1e-4)) == 1
    model.train()
    assert not tower.training


def test_patient_split_and_pretraining_exclusion(tmp_path):
    from mgll.data.records import Record
    from mgll.data.splits import read_split_file

    samples = [SegSample(Path(f"s{i}.png"), f"p{i // 2}") for i in range(10)]
    split = seg_split(samples, {"train": 0.6, "val": 0.0, "test": 0.4}, 0)
    train_patients = {samples[i].patient_id for i in split["train"]}
    assert not train_patients & {samples[i].patient_id for i in split["test"]}
    records = [Record(tmp_path / f"r{i}.png", [["t"]], [["c"]], f"p{i}") for i in range(8)]
    records.append(Record(tmp_path / "s9.png", [["t"]], [["c"]], "other"))  # same file name
    counts = write_pretrain_split(records, tmp_path, samples, tmp_path / "split.csv")
    assert counts["excluded"] == 5 + 1  # patients p0..p4 and the image named like s9.png
    result = read_split_file(tmp_path / "split.csv", records, root=tmp_path)
    used = [i for idx in result.values() for i in idx]
    assert sorted(used) == [5, 6, 7]


def test_segment_command_writes_results_predictions_and_curve(tmp_path, capsys):
    data = write_toy_folder(tmp_path / "toy")
    out = tmp_path / "out"
    argv = [
        "segment",
        "--encoder",
        "random:mgll-vit-test-32",
        "--data",
        data.name,
        "--data-root",
        str(data.parent),
        "--output-dir",
        str(out),
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--bootstrap",
        "20",
        "--split-fractions",
        "0.5,0.25,0.25",
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| foreground |" in printed and "| mean |" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["split"] == {"train": 4, "val": 2, "test": 2}
    assert results["encoder"]["spec"] == "random:mgll-vit-test-32"
    assert len(results["history"]) == 2
    dices = [row["val_dice"] for row in results["history"]]
    assert results["best_epoch"] == max(range(1, 3), key=lambda e: (dices[e - 1], e))
    dice = results["metrics"]["dice"]["foreground"]
    per_image = [row["dice"][0] for row in results["per_image"]]
    assert dice["value"] == pytest.approx(np.mean(per_image)) and dice["n_images"] == 2
    names = sorted(p.name for p in (out / "predictions").iterdir())
    assert len(names) == 4 and sum(n.endswith("_overlay.png") for n in names) == 2
    mask = np.asarray(Image.open(out / "predictions" / names[0]))
    assert mask.shape == (32, 32) and set(np.unique(mask)) <= {0, 255}
    assert (out / "training_curve.png").stat().st_size > 0
    # A second run into the same folder is refused, and so is a bad encoder.
    assert main(argv) == 1
    assert "exists and is not empty" in capsys.readouterr().err
    bad = [*argv[:2], "random:no-such-arch", *argv[3:], "--output-dir", str(tmp_path / "o2")]
    assert main(bad) == 1
    assert "mgll segment: error: encoder 'random:no-such-arch'" in capsys.readouterr().err


@pytest.mark.shared_data
def test_real_covid_masks_load_with_the_documented_counts(tmp_path):
    folder = require_shared("covid-cxr-seg")
    source = load_covid_cxr_seg(folder)
    assert len(source.samples) == 100
    assert len({s.patient_id for s in source.samples}) == 73
    have = [sum(bool(s.masks[k]) for s in source.samples) for k in range(3)]
    assert have == [100, 93, 32]  # lungs, ground-glass opacity, consolidation
    sample = source.samples[0]
    problems: list = []
    target = MaskCache(tmp_path, 64, "pad").target(sample, problems)
    assert problems == [] and target.shape == (3, 64, 64) and target[0].sum() > 0
