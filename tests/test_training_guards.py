"""Behaviours that only show with real towers or fp16: RNG and loss-scaler resumption, and the
order of unscaling and clipping. Each test fails when its behaviour is removed."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from mgll.training import checkpoint as ckpt
from mgll.training.step import Precision, optimizer_step
from mgll.training.trainer import train
from test_training_fakes import FAKES, fake_config, fake_model_factory


def _config(**extra):
    # 48 samples / batch 16 = 3 steps per epoch, 2 epochs = 6 steps; no validation.
    settings = {
        "train.epochs": 2,
        "eval.every_epochs": 0,
        "train.deterministic": True,
        "checkpoint.every_steps": 2,
        "checkpoint.keep_last": 10,
    }
    settings.update(extra)
    return fake_config(settings)


def _full_and_resumed(tmp_path, fakes=FAKES, **extra):
    full, split = tmp_path / "full", tmp_path / "split"
    train(_config(**extra), ".", full, **fakes)
    train(_config(**extra, **{"train.max_steps": 4}), ".", split, **fakes)
    train(_config(**extra), ".", split, resume="latest", **fakes)
    return full, split


def _assert_same_weights(a_dir, b_dir):
    a = load_file(ckpt.resolve_checkpoint("latest", a_dir))
    b = load_file(ckpt.resolve_checkpoint("latest", b_dir))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_resume_restores_the_global_rng_that_dropout_draws_from(tmp_path):
    # Real text towers use dropout in training; its masks come from the global torch RNG,
    # which only the checkpoint's RNG state puts back where the interrupted run left it.
    fakes = dict(FAKES, model_factory=fake_model_factory(dropout=0.3))
    full, split = _full_and_resumed(tmp_path, fakes=fakes)
    _assert_same_weights(full, split)


def test_resume_of_an_fp16_run_restores_the_loss_scale(tmp_path):
    full, split = _full_and_resumed(tmp_path, **{"train.precision": "fp16"})
    at_4 = ckpt.load_state(ckpt.weights_path(split / "checkpoints", 4))["scaler"]
    # The scale has backed off from its start (65536): a fresh scaler would skip other steps.
    assert at_4["scale"] < 65536.0
    _assert_same_weights(full, split)
    last = [ckpt.load_state(ckpt.resolve_checkpoint("latest", d))["scaler"] for d in (full, split)]
    assert last[0] == last[1]


def test_fp16_unscales_gradients_before_clipping():
    # d/dw (w . x) = x = (3, 4): norm 5. Clipped to 1 and stepped with SGD(lr=1), w moves by
    # x / 5; a norm measured on scaled gradients would be 5 * 65536 and the step far smaller.
    w = torch.nn.Parameter(torch.zeros(2))
    x = torch.tensor([3.0, 4.0])
    precision = Precision("fp16", torch.device("cpu"))
    optimizer = torch.optim.SGD([w], lr=1.0)
    precision.scaler.scale((w * x).sum()).backward()
    assert w.grad[0].item() == pytest.approx(3.0 * precision.scaler.get_scale())
    norm = optimizer_step(optimizer, precision, [w], grad_clip=1.0)
    assert norm.item() == pytest.approx(5.0)
    torch.testing.assert_close(w.detach(), torch.tensor([-0.6, -0.8]))
