"""save_pretrained / from_pretrained: the folder rebuilds the same model and carries a card."""

from __future__ import annotations

import json

import pytest
import torch

import mgll
from mgll.cli import main
from mgll.models import create_model
from mgll.models.hub import NOT_FOR_CLINICAL_USE
from mgll.training.checkpoint import save_checkpoint

RUN_CONFIG = {
    "model": {
        "image": {"arch": "mgll-vit-test-32", "pretrained": None},
        "text": {"type": "open_clip"},
    },
    "data": {"source": "covid-cxr", "path": "covid-cxr", "split": {"train": 0.8, "seed": 0}},
    "loss": {"name": "mgll", "weights": {"sclip": 0.5}},
    "train": {"epochs": 3, "batch_size": 32, "lr": 5e-4, "seed": 0},
}


@pytest.fixture(scope="module")
def trained_model():
    torch.manual_seed(0)
    model = create_model(RUN_CONFIG["model"])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        model.logit_scale.fill_(3.0)
    return model.eval()


def test_round_trip_gives_the_same_embeddings_and_a_model_card(tmp_path, trained_model):
    folder = trained_model.save_pretrained(
        tmp_path / "m", RUN_CONFIG, {"split": "val", "step": 7, "loss": 1.25}
    )
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    loaded = mgll.from_pretrained(folder)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), trained_model.encode_image(images))
        assert torch.equal(
            loaded.encode_text(["a", "b c"]), trained_model.encode_text(["a", "b c"])
        )
    assert loaded.logit_scale.item() == 3.0
    card = (folder / "README.md").read_text()
    assert NOT_FOR_CLINICAL_USE in card
    assert "Dataset: `covid-cxr`" in card and "| loss | 1.25 |" in card and "step 7" in card
    assert "Loss: `mgll`" in card and "lr 0.0005" in card
    # Re-saving a loaded model needs no config: it remembers its own.
    again = loaded.save_pretrained(tmp_path / "again")
    assert json.loads((again / "config.json").read_text())["run_config"] == RUN_CONFIG


def test_save_without_config_and_load_of_a_foreign_folder_fail_clearly(tmp_path, trained_model):
    fresh = create_model(RUN_CONFIG["model"])
    with pytest.raises(ValueError, match="needs the run config"):
        fresh.save_pretrained(tmp_path / "x")
    assert not (tmp_path / "x").exists()
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "clip_vision_model"}')
    with pytest.raises(ValueError, match="not an mgll model folder"):
        mgll.from_pretrained(tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match=r"config\.json: missing"):
        mgll.from_pretrained(tmp_path / "nothing")


def test_export_command_writes_a_run_with_its_last_validation_metrics(tmp_path, trained_model):
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints", 4, trained_model, {"step": 4}, RUN_CONFIG, keep_last=1)
    rows = [
        {"kind": "train", "step": 2, "loss": 9.0},
        {"kind": "val", "split": "val", "step": 2, "loss": 5.5},
        {"kind": "val", "split": "val", "step": 4, "loss": 4.5, "levels": {"type": {"R@1": 0.25}}},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "pretrained"
    assert main(["export", str(run), "--format", "mgll-pretrained", "--output-dir", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert "| loss | 4.5 |" in card and "| levels/type/R@1 | 0.25 |" in card and "5.5" not in card
    assert mgll.from_pretrained(out).embed_dim == trained_model.embed_dim
    assert main(["export", str(run), "--format", "mgll-pretrained", "--output-dir", str(out)]) == 1
