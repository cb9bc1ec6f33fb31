"""Run control: finished and refused resumes change nothing, validation of short runs, CUDA
asked for but absent, one run per folder, and a clean stop on Ctrl-C that resumes exactly."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from data_fixtures import write_png
from mgll.errors import DataError, UserError
from mgll.schema import ConfigError
from mgll.training import checkpoint as ckpt
from mgll.training.run_log import read_metrics
from mgll.training.trainer import train
from training_fakes import FAKES, fake_config

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_resuming_a_finished_run_changes_nothing_and_says_so(tmp_path, capsys):
    train(fake_config({"train.max_steps": 2}), ".", tmp_path, **FAKES)
    before = _files(tmp_path)
    capsys.readouterr()
    summary = train(fake_config({"train.max_steps": 2}), ".", tmp_path, resume="latest", **FAKES)
    assert "is complete" in capsys.readouterr().out
    assert summary["steps"] == 2  # the run's own summary
    assert _files(tmp_path) == before  # summary.json, config.yaml, checkpoints: byte-identical


def test_a_refused_resume_leaves_the_run_folder_untouched(tmp_path):
    train(fake_config({"train.max_steps": 2}), ".", tmp_path, **FAKES)
    before = _files(tmp_path)
    # CLIP freezes the logit bias: the optimizer state of the MGLL run does not fit.
    changed = fake_config({"train.max_steps": 4, "loss.name": "clip"})
    with pytest.raises(ckpt.CheckpointError, match="optimizer state does not fit"):
        train(changed, ".", tmp_path, resume="latest", **FAKES)
    assert _files(tmp_path) == before


def test_resuming_an_older_step_reports_the_checkpoint_this_run_wrote(tmp_path):
    settings = {"checkpoint.keep_last": 10, "eval.every_epochs": 0}
    train(fake_config(settings), ".", tmp_path, **FAKES)  # checkpoints up to step 6
    older = ckpt.weights_path(tmp_path / "checkpoints", 4)
    summary = train(
        fake_config({**settings, "train.max_steps": 5}), ".", tmp_path, resume=str(older), **FAKES
    )
    assert Path(summary["checkpoint"]).name == "step_00000005.safetensors"


def test_max_steps_inside_the_first_epoch_validates_once_at_the_end(tmp_path):
    summary = train(fake_config({"train.max_steps": 2}), ".", tmp_path, **FAKES)  # 3 steps/epoch
    rows = [r for r in read_metrics(tmp_path) if r["kind"] == "val"]
    assert [r["step"] for r in rows] == [2]
    assert summary["val"]["step"] == 2 and "once, at the end" in summary["validation"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_config_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.device='cuda' but this machine has no CUDA"):
        train(fake_config({"train.device": "cuda"}), ".", tmp_path, **FAKES)
    assert not tmp_path.joinpath("config.yaml").exists()


# ---- real processes --------------------------------------------------------------------------

SLOW_RUN = """
import sys, time
from mgll.training.trainer import train
from training_fakes import FAKES, FakeModel, fake_config

class Slow(FakeModel):
    def forward(self, images, texts):
        time.sleep(0.05)
        return super().forward(images, texts)

factory = lambda cfg, levels: Slow()
cfg = fake_config({"train.max_steps": int(sys.argv[2]), "train.epochs": 100})
resume = sys.argv[3] if len(sys.argv) > 3 else None
train(cfg, ".", sys.argv[1], resume, **dict(FAKES, model_factory=factory))
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)])}


def _wait_for(predicate, process, seconds: float = 600.0) -> None:
    end = time.monotonic() + seconds
    while not predicate():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_second_run_into_the_same_folder_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-c", SLOW_RUN, str(out), "400"],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(lambda: ckpt.list_checkpoints(out / "checkpoints"), first)
        second = subprocess.run(
            [sys.executable, "-c", SLOW_RUN, str(out), "1"],
            env=_env(),
            capture_output=True,
            text=True,
        )
        assert second.returncode != 0
        assert f"in use by another run (process {first.pid} on" in second.stderr
    finally:
        first.kill()  # SIGKILL: no chance to remove its lock
        first.wait()
    # The dead process's lock is taken over with a warning (the folder has its checkpoints).
    stale = subprocess.run(
        [sys.executable, "-c", SLOW_RUN, str(out), "3", "latest"],
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert "taking over the lock of process" in stale.stderr, stale.stderr
    assert stale.returncode == 0, stale.stderr


MID_EPOCH_RUN = """
import sys, time
from mgll.training.trainer import train
from training_fakes import FAKES, FakeModel, fake_config

class Slow(FakeModel):
    def forward(self, images, texts):
        time.sleep(0.05)
        return super().forward(images, texts)

settings = {"data.options.train_size": 800, "train.epochs": 1, "eval.every_epochs": 0,
            "checkpoint.every_steps": 1000, "checkpoint.every_minutes": None}
train(fake_config(settings), ".", sys.argv[1], **dict(FAKES, model_factory=lambda c, g: Slow()))
"""


@pytest.mark.slow
def test_ctrl_c_mid_epoch_checkpoints_the_step_reached(tmp_path):
    """50 steps per epoch, no checkpoint due: the only checkpoint is the one the stop writes,
    at the step the stop message names, inside the epoch."""
    out = tmp_path / "run"
    run = subprocess.Popen(
        [sys.executable, "-c", MID_EPOCH_RUN, str(out)],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = out / "metrics.jsonl"
    _wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3, run)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=600)
    found = re.search(r"stopped by SIGINT at step (\d+)", err)
    assert found, err
    step = int(found.group(1))
    assert 3 <= step < 50
    saved = ckpt.list_checkpoints(out / "checkpoints")
    assert [s for s, _ in saved] == [step]
    state = ckpt.load_state(saved[0][1])
    assert state["step"] == step
    assert (state["epoch"], state["epoch_step"]) == (0, step)
    assert max(r["step"] for r in read_metrics(out)) == step


def _tiny_dataset(folder: Path) -> Path:
    """16 patients with 8x8 images and two levels, as a dataset spec."""
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = ["path,patient,finding,detail"]
    for i in range(16):
        write_png(folder / "images" / f"{i}.png", rng.integers(0, 255, (8, 8), dtype=np.uint8))
        rows.append(f"{i}.png,p{i},{['normal', 'mass'][i % 2]},{['left', 'right', 'both'][i % 3]}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    (folder / "spec.yaml").write_text(
        "table: labels.csv\nimage: {column: path, root: images}\npatient: patient\nlevels:\n"
        "  - {name: finding, label: finding, prompt: 'x-ray: {label}'}\n"
        "  - {name: detail, label: detail, prompt: 'side: {label}'}\n"
    )
    config = {
        "model": {"image": {"arch": "mgll-vit-test-32"}, "text": {"type": "open_clip"}},
        "data": {
            "source": "spec.yaml",
            "split": {"train": 1.0, "val": 0.0, "test": 0.0},
            "cache_dir": False,
        },
        "train": {"epochs": 6, "batch_size": 4, "warmup_epochs": 1.0, "device": "cpu"},
        "log": {"every_steps": 1, "progress_bar": False},
        "checkpoint": {"every_steps": 1000, "every_minutes": None, "keep_last": 2},
    }
    (folder / "run.yaml").write_text(yaml.safe_dump(config))
    return folder


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path):
    data = _tiny_dataset(tmp_path / "data")

    def pretrain(out: Path, *extra: str, **kwargs) -> subprocess.Popen:
        argv = [
            sys.executable,
            "-m",
            "mgll",
            "pretrain",
            str(data / "run.yaml"),
            "--data-root",
            str(data),
            "--output-dir",
            str(out),
            "--deterministic",
            *extra,
        ]
        return subprocess.Popen(
            argv, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kwargs
        )

    full = pretrain(tmp_path / "full")
    stopped = pretrain(tmp_path / "stopped")
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    _wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3, stopped)
    stopped.send_signal(signal.SIGINT)
    _, err = stopped.communicate(timeout=600)
    assert stopped.returncode == 128 + signal.SIGINT
    assert "stopped by SIGINT at step" in err and "--resume latest" in err, err
    step = ckpt.load_state(ckpt.resolve_checkpoint("latest", tmp_path / "stopped"))["step"]
    assert 3 <= step < 24  # interrupted mid-run: 16 / 4 = 4 steps per epoch, 6 epochs

    resumed = pretrain(tmp_path / "stopped", "--resume", "latest")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert full.wait(timeout=600) == 0
    a = load_file(ckpt.resolve_checkpoint("latest", tmp_path / "full"))
    b = load_file(ckpt.resolve_checkpoint("latest", tmp_path / "stopped"))
    assert ckpt.read_metadata(ckpt.resolve_checkpoint("latest", tmp_path / "full"))["step"] == 24
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_refused_by_its_data_leaves_no_folder_and_no_config(tmp_path):
    def refusing_data(cfg, data_root, seed):
        raise DataError("data.path: the shards hold 32 px images but the model takes 64 px")

    new = tmp_path / "new" / "run"
    fakes = {**FAKES, "data_builder": refusing_data}
    with pytest.raises(UserError, match="32 px"):  # as the config's data section says it
        train(fake_config({"train.max_steps": 2}), ".", new, **fakes)
    assert not (tmp_path / "new").exists()  # the folders the run made are gone
    held = tmp_path / "held"
    held.mkdir()
    (held / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="32 px"):
        train(fake_config({"train.max_steps": 2}), ".", held, **fakes)
    assert [p.name for p in held.iterdir()] == ["notes.txt"]  # no config.yaml, no lock


@pytest.mark.parametrize(
    "command",
    [
        ["probe", "--encoder", "random:mgll-rn-tiny-64", "--data", "palm", "--level", "myopia"],
        ["zeroshot", "--model", "runs/x", "--data", "palm", "--level", "myopia"],
        ["retrieve", "--model", "runs/x", "--data", "palm", "--level", "myopia"],
        ["benchmark", "--encoder", "random:mgll-rn-tiny-64", "--tasks", "palm"],
        ["demo", "--data-root", "."],
        ["ablate", "--data-root", "."],
    ],
)
def test_an_evaluation_into_a_folder_another_process_holds_is_refused(tmp_path, capsys, command):
    import json
    import socket

    from mgll.cli import main
    from mgll.training.run_control import LOCK_FILE

    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = out / LOCK_FILE
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid}))
        assert main([*command, "--output-dir", str(out)]) == 1
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"in use by another run (process {holder.pid}" in err, err
        assert [p.name for p in out.iterdir()] == [LOCK_FILE]  # the holder's lock, nothing else
    finally:
        holder.kill()
        holder.wait()
