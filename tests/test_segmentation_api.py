"""mgll segment's config, mask-format registry, library entry point and command-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mgll.cli import main, parse_args
from mgll.schema import ConfigError
from mgll.segmentation.cli import config_from_args, data_path, split_overrides
from mgll.segmentation.config import (
    SegmentationConfig,
    SegSplitConfig,
    load_segmentation_config,
)
from mgll.segmentation.data import SegDataError
from mgll.segmentation.sources import detect_format, format_names, get_format, load_source
from seg_fixtures import covid_seg_folder, write_toy_folder

ENCODER = "random:mgll-vit-test-32"


def test_config_from_yaml_with_overrides_over_the_defaults(tmp_path):
    path = tmp_path / "seg.yaml"
    path.write_text(
        "epochs: 3\nfreeze_encoder: true\nsplit:\n  train: 0.5\n  test: 0.4\n  seed: 5\n"
    )
    cfg = load_segmentation_config(path, ["lr=1e-2", "split.train=0.6", "split.val=0.0"])
    assert (cfg.epochs, cfg.freeze_encoder, cfg.lr) == (3, True, 0.01)
    assert cfg.split.fractions() == {"train": 0.6, "val": 0.0, "test": 0.4}
    assert cfg.split_seed == 5 and cfg.batch_size == SegmentationConfig().batch_size
    # results.json's config reads back as the same config
    assert SegmentationConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert load_segmentation_config(None, ["seed=4"]).split_seed == 4  # split.seed null: seed


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("epoch: 3\n", "unknown config key 'epoch' (did you mean 'epochs'?)"),
        ("split:\n  tset: 0.4\n", "unknown config key 'split.tset' (did you mean 'test'?)"),
        ("epochs: three\n", "config key 'epochs' must be an integer"),
        ("resize: squash\n", "resize: 'squash' is not one of pad, crop, stretch"),
        ("batch_size: 0\n", "batch_size must be >= 1"),
        ("split: {test: 0.5}\n", "fractions must be >= 0 and sum to 1, got (0.6, 0.1, 0.5)"),
        ("device: gpu\n", "device: 'gpu' is not auto, cpu, mps, cuda or cuda:N"),
    ],
)
def test_a_bad_config_file_is_one_error_naming_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "seg.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_segmentation_config(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_flags_win_over_overrides_which_win_over_the_file(tmp_path):
    path = tmp_path / "seg.yaml"
    path.write_text("epochs: 3\nbootstrap: 50\n")
    base = ["segment", "--encoder", ENCODER, "--data", "d", "--output-dir", "o"]
    args = parse_args([*base, "--config", str(path), "epochs=4", "--split-fractions", "0.5,0,0.5"])
    cfg = config_from_args(args)
    assert (cfg.epochs, cfg.bootstrap) == (4, 50)
    assert cfg.split.fractions() == {"train": 0.5, "val": 0.0, "test": 0.5}
    cfg = config_from_args(parse_args([*base, "--config", str(path), "epochs=4", "--epochs", "5"]))
    assert cfg.epochs == 5


def test_each_format_is_detected_and_loaded_through_the_registry(tmp_path):
    covid = covid_seg_folder(tmp_path / "covid")  # also has images/ and masks/: order matters
    folder = write_toy_folder(tmp_path / "toy", n=2)
    table = tmp_path / "toy" / "t.csv"
    table.write_text("image,mask\nimages/t0.png,masks/t0.png\n")
    assert [detect_format(p).name for p in (covid, folder, table)] == format_names()
    assert load_source(covid).format == "covid-cxr-seg"
    loaded = load_source(folder)
    assert loaded.format == "mask-folder" and len(loaded.samples) == 2
    assert loaded.samples[1].masks[0][0].path == folder / "masks" / "t1.png"
    assert load_source(table).classes == ["foreground"]
    # a name (or an old alias) overrides detection
    assert load_source(folder, "folder").format == "mask-folder"
    with pytest.raises(SegDataError, match="needs images/ and masks/"):
        load_source(covid / "images", "mask-folder")


def test_an_unknown_folder_or_format_is_one_error_listing_the_formats(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "notes.csv").write_text("a,b\n1,2\n")
    for path in (tmp_path / "plain", tmp_path / "notes.csv"):
        with pytest.raises(SegDataError) as err:
            load_source(path)
        text = str(err.value)
        assert text.startswith(f"--data: {path} is not a segmentation dataset")
        assert all(name in text for name in format_names()) and "\n" not in text
    with pytest.raises(SegDataError, match=r"does not exist"):
        load_source(tmp_path / "absent")
    with pytest.raises(SegDataError, match=r"unknown mask format 'nifti'.*mask-table"):
        get_format("nifti")


def test_segment_as_a_library_writes_outputs_that_match_its_masks(tmp_path):
    from mgll.segmentation.run import segment

    data = write_toy_folder(tmp_path / "toy", n=6)
    out = tmp_path / "out"
    split = SegSplitConfig(train=0.5, val=0.0, test=0.5)
    cfg = SegmentationConfig(
        epochs=1,
        batch_size=4,
        bootstrap=10,
        device="cpu",
        cache_dir=str(tmp_path / "c"),
        split=split,
    )
    lines: list[str] = []
    results = segment(ENCODER, data, out, cfg, log=lines.append)
    assert json.loads((out / "results.json").read_text()) == results
    assert results["data"]["source"] == "mask-folder" and results["data"]["split"]["test"] == 3
    assert SegmentationConfig.from_dict(results["config"]) == cfg
    assert (out / "training_curve.png").stat().st_size > 0 and any("3 train" in x for x in lines)
    # Independent: each written prediction PNG against its ground-truth mask file (32 px images
    # on a 32 px tower: no resizing), Dice counted here with numpy.
    for i, row in enumerate(results["per_image"]):
        name = Path(row["image"]).stem
        predicted = np.asarray(Image.open(out / "predictions" / f"{i:03d}_{name}_foreground.png"))
        truth = np.asarray(Image.open(data / "masks" / f"{name}.png")) > 0
        overlap = (predicted > 0) & truth
        dice = 2 * overlap.sum() / ((predicted > 0).sum() + truth.sum())
        assert row["dice"][0] == pytest.approx(dice, abs=1e-6)
    first = Path(results["per_image"][0]["image"]).stem
    assert (out / "predictions" / f"000_{first}_overlay.png").is_file()


def test_bad_input_to_segment_writes_nothing(tmp_path):
    from mgll.segmentation.run import segment

    out = tmp_path / "out"
    with pytest.raises(SegDataError, match="does not exist"):
        segment(ENCODER, tmp_path / "absent", out, SegmentationConfig(device="cpu"))
    assert not out.exists()


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_command_line_bad_input_is_one_line_and_exit_1(tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    base = ["segment", "--encoder", ENCODER, "--output-dir", str(tmp_path / "out")]
    assert main([*base, "--data", "plain", "--data-root", str(tmp_path)]) == 1
    err = _one_line_error(capsys)
    assert err.startswith(f"mgll segment: error: --data: {tmp_path / 'plain'} is not a seg")
    assert main([*base, "--data", str(tmp_path / "missing")]) == 1
    assert f"--data: {tmp_path / 'missing'} does not exist" in _one_line_error(capsys)
    (tmp_path / "seg.yaml").write_text("epoch: 2\n")
    config = ["--data", str(tmp_path / "plain"), "--config", str(tmp_path / "seg.yaml")]
    assert main([*base, *config]) == 1
    assert "unknown config key 'epoch' (did you mean 'epochs'?)" in _one_line_error(capsys)
    assert main([*base, "--data", "plain", "--split", "source"]) == 2
    assert "mask sources carry no split" in _one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_old_flags_still_work_with_a_warning(tmp_path):
    write_toy_folder(tmp_path / "toy", n=1)
    old = ["segment", "--encoder", ENCODER, "--output-dir", "o", "--data", "folder"]
    with pytest.warns(FutureWarning, match="--data folder"):
        path, name = data_path(parse_args([*old, "--data-root", str(tmp_path / "toy")]))
    assert (path, name) == (tmp_path / "toy", "mask-folder")
    with pytest.warns(FutureWarning, match="--split-fractions"):
        pairs = split_overrides(parse_args([*old, "--split", "0.5,0.2,0.3"]))
    assert pairs == [("split.train", 0.5), ("split.val", 0.2), ("split.test", 0.3)]


def test_the_documented_keys_and_defaults_are_the_configs():
    import yaml

    text = (Path(__file__).parent.parent / "docs" / "transfer.md").read_text()
    block = text.split("**Settings.**", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    assert SegmentationConfig.from_dict(yaml.safe_load(block)) == SegmentationConfig()
    assert set(yaml.safe_load(block)) == set(SegmentationConfig().to_dict())
