"""Run folders written before the typed config sections still resume and export.

Each test makes its own small "old" folder: a checkpoint whose config (config.yaml, the state
file and the weights' header) is in the earlier layout, where model/data held only the keys
a recipe wrote and ``model.grad_checkpointing`` existed.
"""

from __future__ import annotations

import json

import torch
import yaml
from safetensors.torch import load_file, save_file, save_model

from mgll.cli import main
from mgll.models import create_model, load_image_encoder
from mgll.training import checkpoint as ckpt
from mgll.training.trainer import train
from training_fakes import FAKES, fake_config

# The trainer sections exactly as the earlier code wrote them into config.yaml.
OLD_TRAINER_SECTIONS = {
    "loss": {
        "name": "mgll",
        "weights": {"sclip": 0.5, "pointwise": 1.0, "skl": 1.0},
        "clip_level": -1,
        "local_loss": False,
    },
    "train": {
        "epochs": 2,
        "batch_size": 16,
        "accum_steps": 1,
        "lr": 0.005,
        "min_lr": 0.0,
        "warmup_epochs": 0.5,
        "weight_decay": 0.0001,
        "betas": [0.9, 0.95],
        "eps": 1.0e-08,
        "grad_clip": 10.0,
        "precision": "fp32",
        "grad_checkpointing": False,
        "compile": False,
        "device": "cpu",
        "seed": 0,
        "deterministic": True,
        "max_steps": None,
    },
    "eval": {"every_epochs": 1, "batch_size": 64, "recall_at": [1, 5], "precision_at": [1, 5]},
    "log": {"every_steps": 1, "progress_bar": False, "tensorboard": False},
    "checkpoint": {"every_steps": 2, "keep_last": 2},
}


def _rewrite_as_old(weights, old_config, extra):
    """Put ``old_config`` where the earlier code kept the config: header, state, config.yaml."""
    state_file = ckpt.state_path_for(weights)
    state = torch.load(state_file, weights_only=True)
    state["config"] = old_config
    torch.save(state, state_file)
    tensors = load_file(weights)
    metadata = {
        "format": "mgll-pretrain",
        "step": str(state["step"]),
        "epoch": str(state["epoch"]),
        "config": json.dumps(old_config),
        "extra": json.dumps(extra),
    }
    save_file(tensors, weights, metadata=metadata)
    (weights.parent.parent / "config.yaml").write_text(yaml.safe_dump(old_config, sort_keys=False))


def test_an_old_run_folder_resumes_to_the_same_weights(tmp_path, capsys):
    settings = {"train.deterministic": True}
    full, old = tmp_path / "full", tmp_path / "old"
    train(fake_config(settings), ".", full, **FAKES)
    train(fake_config({**settings, "train.max_steps": 4}), ".", old, **FAKES)
    old_config = {
        "model": {
            "image": {"arch": "fake"},
            "embed_dim": 8,
            "init_logit_scale": 2.0,
            "init_logit_bias": -2.0,
            "grad_checkpointing": False,
        },
        "data": {"options": {"train_size": 48, "val_size": 12}, "num_workers": 0},
        **OLD_TRAINER_SECTIONS,
    }
    _rewrite_as_old(ckpt.resolve_checkpoint("latest", old), old_config, {"image.quick_gelu": None})
    capsys.readouterr()

    train(fake_config(settings), ".", old, resume="latest", **FAKES)
    # The old config means the same run: no spurious "config differs" warning.
    assert "differs" not in capsys.readouterr().err
    a = load_file(ckpt.resolve_checkpoint("latest", full))
    b = load_file(ckpt.resolve_checkpoint("latest", old))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_old_checkpoint_exports_its_image_encoder(tmp_path):
    model_section = {
        "image": {"arch": "mgll-vit-test-32", "pretrained": None},
        "text": {"type": "open_clip"},
        "embed_dim": None,
        "init_logit_scale": 2.6593,
        "init_logit_bias": -10.0,
        "grad_checkpointing": False,
    }
    old_config = {"model": model_section, "data": {"path": "covid-cxr"}, **OLD_TRAINER_SECTIONS}
    torch.manual_seed(0)
    model = create_model({k: v for k, v in model_section.items() if k != "grad_checkpointing"})
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    weights = ckpt.weights_path(folder, 3)
    save_model(model, str(weights))
    torch.save({"step": 3, "epoch": 0}, ckpt.state_path_for(weights))
    _rewrite_as_old(weights, old_config, {"image.quick_gelu": False})

    out = tmp_path / "encoder.safetensors"
    assert main(["export", str(tmp_path / "run"), "--output", str(out)]) == 0
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(load_image_encoder(out)(images), model.eval().encode_image(images))
    _, config = ckpt.load_model(tmp_path / "run")
    assert config == old_config  # the config as saved, a plain dict
