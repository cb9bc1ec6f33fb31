"""Behaviours that only show with real towers or fp16: RNG and loss-scaler resumption, and the
order of unscaling and clipping. Each test fails when its behaviour is removed."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from mgll.errors import DataError
from mgll.schema import ConfigError
from mgll.training import checkpoint as ckpt
from mgll.training.step import Precision, optimizer_step
from mgll.training.trainer import train
from training_fakes import FAKES, FakeModel, fake_config, fake_model_factory


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


# ---- guards of issue 15: weights, resume warnings, signal handlers ---------------------------


def test_the_configs_loss_weights_reach_the_trained_loss(tmp_path):
    """The loss logged at step 1 equals the loop reference of test_losses with the config's
    weights, on the batch and embeddings the step saw (spied): a zero weight leaves its term
    out, a weight of 2 doubles it."""
    from mgll.data import collate_samples
    from mgll.training.run_log import read_metrics
    from test_losses import _reference

    seen: dict[str, object] = {}

    def spy_collate(samples):
        batch = collate_samples(samples)
        seen.setdefault("labels", [lab.clone() for lab in batch["labels"]])
        return batch

    class Spy(FakeModel):
        def forward(self, images, texts):
            out = super().forward(images, texts)
            if "out" not in seen:
                seen["out"] = {
                    "image": out["image_emb"].detach().clone(),
                    "texts": [t.detach().clone() for t in out["text_embs"]],
                    "scale": float(out["logit_scale"].detach()),
                    "bias": float(out["logit_bias"].detach()),
                }
            return out

    weights = {"loss.weights.sclip": 1.0, "loss.weights.pointwise": 0.0, "loss.weights.skl": 2.0}
    cfg = fake_config({"train.max_steps": 1, "eval.every_epochs": 0, **weights})
    fakes = dict(FAKES, collate_fn=spy_collate, model_factory=lambda c, g: Spy(8, 2.0, -2.0))
    train(cfg, ".", tmp_path, **fakes)
    row = next(r for r in read_metrics(tmp_path) if r["kind"] == "train")
    out = seen["out"]
    ref = _reference(
        out["image"], out["texts"], seen["labels"], out["scale"], out["bias"], (1.0, 0.0, 2.0)
    )
    assert {"loss", "sclip", "skl"} <= set(row) and "pointwise" not in row
    assert row["sclip"] == pytest.approx(ref["sclip"], rel=1e-5)
    assert row["skl"] == pytest.approx(ref["skl"], rel=1e-4, abs=1e-6)
    assert row["loss"] == pytest.approx(ref["sclip"] + 2.0 * ref["skl"], rel=1e-5)


def test_a_resume_with_a_changed_config_warns_naming_the_keys(tmp_path, capsys):
    train(_config(**{"train.max_steps": 2}), ".", tmp_path, **FAKES)
    capsys.readouterr()
    # max_steps (like log/checkpoint keys) may change freely: no warning for it alone.
    train(_config(**{"train.max_steps": 3}), ".", tmp_path, resume="latest", **FAKES)
    assert "differs" not in capsys.readouterr().err
    changed = _config(**{"train.max_steps": 4, "train.lr": 1e-3, "loss.weights.skl": 0.5})
    train(changed, ".", tmp_path, resume="latest", **FAKES)
    err = capsys.readouterr().err
    assert "with a config that differs in: loss.weights.skl, train.lr\n" in err, err


def test_signal_handlers_are_restored_after_a_run_and_after_a_failed_one(tmp_path):
    import signal

    def mine(signum, frame):  # a handler the caller had installed
        pass

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGTERM, mine)
        train(_config(**{"train.max_steps": 1}), ".", tmp_path / "a", **FAKES)
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGINT) is before[signal.SIGINT]
        broken = fake_model_factory(nan_after_calls=0)
        with pytest.raises(Exception, match="non-finite loss"):
            train(
                _config(**{"train.max_steps": 1}),
                ".",
                tmp_path / "b",
                **dict(FAKES, model_factory=broken),
            )
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGINT) is before[signal.SIGINT]
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


@pytest.mark.parametrize("error", [DataError("table.csv row 3: no image"), ValueError("a bug")])
def test_a_data_error_gets_its_section_and_a_bug_keeps_its_traceback(tmp_path, error):
    """errors.py's rule: a user error is caught to add context; any other error is a bug and
    reaches the user as itself, with its traceback (before, every ValueError became a
    one-line ConfigError)."""

    def broken_builder(cfg, data_root, seed):
        raise error

    fakes = {**FAKES, "data_builder": broken_builder}
    with pytest.raises(ConfigError if isinstance(error, DataError) else ValueError) as caught:
        train(_config(), "ROOT", tmp_path, **fakes)
    if isinstance(error, DataError):
        assert str(caught.value) == "data section (data root ROOT): table.csv row 3: no image"
    else:
        assert caught.value is error and not isinstance(caught.value, ConfigError)


def test_every_training_command_spells_resume_alike():
    from mgll.cli import parse_args

    for argv in (
        ["pretrain", "cpu-demo", "--output-dir", "o"],
        ["finetune", "--encoder", "e", "--data", "d", "--level", "0", "--output-dir", "o"],
        ["segment", "--encoder", "e", "--data", "d", "--output-dir", "o"],
    ):
        assert parse_args([*argv, "--resume"]).resume == "latest", argv
        assert parse_args([*argv, "--resume", "a.safetensors"]).resume == "a.safetensors"
        assert parse_args(argv).resume is None
