"""mgll segment on the epoch engine: a real SIGINT mid-run and its resume, the run lock, a fresh
run refused in a folder that holds a stopped run, the engine's schedule and precision reached."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mgll.cli import main
from mgll.training import checkpoint as ckpt
from seg_fixtures import write_toy_folder
from stopped_run import stop_after_step


def _argv(data: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    """8 toy images: 4 train (2 steps of 2 per epoch), 2 val, 2 test; 2 epochs."""
    return [
        "segment",
        "--encoder",
        "random:mgll-vit-test-32",
        "--data",
        str(data),
        "--output-dir",
        str(out),
        "--epochs",
        "2",
        "--batch-size",
        "2",
        "--bootstrap",
        "10",
        "--split-fractions",
        "0.5,0.25,0.25",
        "--cache-dir",
        str(cache),
        "--device",
        "cpu",
        *extra,
    ]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.slow
def test_sigint_mid_run_checkpoints_and_resume_equals_an_uninterrupted_run(tmp_path, capsys):
    """SIGINT after step 3 (epoch 2's first step): a checkpoint at step 3, exit 130, the lock
    given back, nothing scored. A fresh run into that folder is refused; ``--resume latest``
    finishes with the results, predictions and weights of a run that never stopped."""
    data, cache = write_toy_folder(tmp_path / "toy"), tmp_path / "cache"
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert main(_argv(data, whole, cache)) == 0

    argv = _argv(data, stopped, cache)
    state = stop_after_step(argv, 3, stopped)
    assert (state["epoch"], state["epoch_step"]) == (1, 1)  # inside the second epoch
    assert state["config"]["protocol"] == "segment"
    assert not (stopped / "predictions").exists()

    capsys.readouterr()
    assert main(argv) == 1  # a fresh run would overwrite the stopped one
    assert "already holds a run with checkpoints; continue it with --resume" in _one_line(capsys)
    assert [step for step, _ in ckpt.list_checkpoints(stopped / "checkpoints")] == [3]

    assert main([*argv, "--resume", "latest"]) == 0
    a, b = (json.loads((d / "results.json").read_text()) for d in (whole, stopped))
    a.pop("train_seconds"), b.pop("train_seconds")
    assert a == b  # history, best epoch, metrics with CIs, per-image Dice
    assert sorted(p.name for p in (whole / "predictions").iterdir()) == sorted(
        p.name for p in (stopped / "predictions").iterdir()
    )
    for png in (whole / "predictions").iterdir():
        assert png.read_bytes() == (stopped / "predictions" / png.name).read_bytes(), png.name
    for name in ("best.safetensors", "checkpoints/step_00000004.safetensors"):
        left, right = load_file(str(whole / name)), load_file(str(stopped / name))
        assert left.keys() == right.keys()
        for key in left:
            assert torch.equal(left[key], right[key]), (name, key)


def test_a_run_into_a_locked_or_used_folder_is_refused(tmp_path, capsys):
    from mgll.training.run_control import RunLock

    data, cache = write_toy_folder(tmp_path / "toy", n=4), tmp_path / "cache"
    out = tmp_path / "seg"
    with RunLock(out):  # held by this (living) process, as a running segmentation holds it
        assert main(_argv(data, out, cache, "--epochs", "1")) == 1
        assert (out / ".mgll-run.lock").is_file()  # the refused run left the lock alone
    assert "is in use by another run" in _one_line(capsys)
    assert sorted(p.name for p in out.iterdir()) == []  # nothing written, the lock given back
    (out / "notes.txt").write_text("mine")
    assert main(_argv(data, out, cache, "--epochs", "1")) == 1
    assert f"--output-dir: {out} exists and is not empty" in _one_line(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_the_engine_schedule_lr_scales_and_precision_reach_each_step(tmp_path, monkeypatch):
    """A spy on the engine's optimizer step: the decoder's lr follows linear warm-up then half
    cosine (computed here), the tower's is ``encoder_lr / lr`` of it, and the precision asked
    for is the step's."""
    import math

    import mgll.training.epochs as epochs

    seen = []
    real_step = epochs.optimizer_step

    def spy(optimizer, precision, params, grad_clip, **kwargs):
        seen.append(([g["lr"] for g in optimizer.param_groups], precision.name))
        return real_step(optimizer, precision, params, grad_clip, **kwargs)

    monkeypatch.setattr(epochs, "optimizer_step", spy)
    data = write_toy_folder(tmp_path / "toy")
    argv = _argv(data, tmp_path / "out", tmp_path / "cache", "--precision", "bf16")
    assert main([*argv, "--lr", "0.01", "--encoder-lr", "0.002", "warmup_epochs=1"]) == 0
    # 2 steps per epoch: warm-up over steps 0-1, then half cosine over steps 2-3 down to 0.
    expected = [0.005, 0.01, 0.01, 0.01 * 0.5 * (1 + math.cos(math.pi / 2))]
    assert [lrs[0] for lrs, _ in seen] == pytest.approx(expected)
    assert [lrs[1] for lrs, _ in seen] == pytest.approx([v * 0.2 for v in expected])
    assert {name for _, name in seen} == {"bf16"}
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["config"]["precision"] == "bf16"
