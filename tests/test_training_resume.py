"""Checkpoints and exact resumption: a killed and resumed run equals an uninterrupted one."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from mgll.training import checkpoint as ckpt
from mgll.training.run_log import read_metrics
from mgll.training.trainer import train
from training_fakes import FAKES, fake_config


def _config(**extra):
    # 48 samples / batch 16 = 3 steps per epoch, 3 epochs = 9 steps; validation each epoch.
    settings = {
        "train.epochs": 3,
        "train.deterministic": True,
        "checkpoint.every_steps": 2,
        "checkpoint.keep_last": 3,
    }
    settings.update(extra)
    return fake_config(settings)


def _comparable(rows):
    # Throughput is the only field that may differ between two identical runs.
    return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows]


def _final_weights(out):
    return load_file(ckpt.resolve_checkpoint("latest", out))


@pytest.mark.parametrize("workers", [0, 2])
def test_killed_and_resumed_run_matches_the_uninterrupted_run(tmp_path, workers):
    full, split = tmp_path / "full", tmp_path / "split"
    train(_config(**{"data.num_workers": workers}), ".", full, **FAKES)

    # Killed mid-epoch (--max-steps 4 = epoch 1, step 1), then resumed to the end.
    train(_config(**{"data.num_workers": workers, "train.max_steps": 4}), ".", split, **FAKES)
    assert ckpt.list_checkpoints(split / "checkpoints")[-1][0] == 4
    train(_config(**{"data.num_workers": workers}), ".", split, resume="latest", **FAKES)

    rows_full, rows_split = read_metrics(full), read_metrics(split)
    assert [r["step"] for r in rows_full if r["kind"] == "val"] == [3, 6, 9]
    assert _comparable(rows_split) == _comparable(rows_full)
    a, b = _final_weights(full), _final_weights(split)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_resume_after_a_crash_rewrites_the_rows_logged_after_the_checkpoint(tmp_path):
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    train(_config(**{"train.max_steps": 7}), ".", full, **FAKES)
    train(_config(**{"train.max_steps": 5}), ".", crashed, **FAKES)
    # A crash after step 5 would leave rows up to 5 but only the step-4 checkpoint.
    last = ckpt.weights_path(crashed / "checkpoints", 5)
    ckpt.state_path_for(last).unlink()
    last.unlink()
    assert max(r["step"] for r in read_metrics(crashed)) == 5
    with open(crashed / "metrics.jsonl", "a") as fh:  # killed while writing the step-6 row
        fh.write('{"kind": "train", "step": 6, "lo')
    weights = ckpt.weights_path(crashed / "checkpoints", 4)
    train(_config(**{"train.max_steps": 7}), ".", crashed, resume=str(weights), **FAKES)
    assert _comparable(read_metrics(crashed)) == _comparable(read_metrics(full))
    a, b = _final_weights(full), _final_weights(crashed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_files_are_complete_safe_to_load_and_pruned(tmp_path):
    train(_config(**{"checkpoint.keep_last": 2}), ".", tmp_path, **FAKES)
    assert not torch.are_deterministic_algorithms_enabled()  # the run restored the switch
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    # Saved at 2, 3 (epoch end), 4, 6 (epoch end), 8, 9 (epoch and run end); newest 2 kept.
    assert names == [
        "step_00000008.safetensors",
        "step_00000008.state.pt",
        "step_00000009.safetensors",
        "step_00000009.state.pt",
    ]
    latest = ckpt.resolve_checkpoint("latest", tmp_path)
    state = torch.load(ckpt.state_path_for(latest), weights_only=True)  # no arbitrary objects
    assert (state["step"], state["epoch"], state["epoch_step"]) == (9, 3, 0)
    assert set(state) >= {"optimizer", "scaler", "schedule", "rng", "config"}
    meta = ckpt.read_metadata(latest)
    assert meta["step"] == 9 and meta["config"]["train"]["epochs"] == 3
    assert ckpt.resolve_checkpoint(tmp_path) == latest
    assert ckpt.resolve_checkpoint(ckpt.state_path_for(latest)) == latest


def test_max_steps_is_the_total_also_when_resuming(tmp_path):
    train(_config(**{"train.max_steps": 2}), ".", tmp_path, **FAKES)
    summary = train(_config(**{"train.max_steps": 5}), ".", tmp_path, resume="latest", **FAKES)
    assert (summary["steps"], summary["steps_this_run"]) == (5, 3)
    assert ckpt.list_checkpoints(tmp_path / "checkpoints")[-1][0] == 5


def test_a_fresh_run_refuses_a_folder_with_checkpoints_and_leaves_it_untouched(tmp_path):
    train(_config(**{"train.max_steps": 1}), ".", tmp_path, **FAKES)
    before = {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ckpt.CheckpointError, match="already holds a run"):
        train(_config(**{"train.lr": 1.0}), ".", tmp_path, **FAKES)
    # config.yaml still describes the run that wrote the checkpoints.
    assert {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_resume_errors_name_the_missing_file(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint"):
        train(_config(), ".", tmp_path, resume="latest", **FAKES)
    with pytest.raises(ckpt.CheckpointError, match=r"nope\.safetensors does not exist"):
        train(_config(), ".", tmp_path, resume=str(tmp_path / "nope.safetensors"), **FAKES)


def test_a_checkpoint_of_another_kind_is_refused_and_the_folder_left_untouched(tmp_path):
    """Both engines resume through checkpoint.load_run_state, which checks the kind once:
    pretraining refuses a fine-tuning or segmentation checkpoint before reading it into the
    model (before it failed on whatever did not fit first)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    train(_config(**{"train.max_steps": 2}), ".", tmp_path, **FAKES)
    weights = ckpt.resolve_checkpoint("latest", tmp_path)
    with safe_open(str(weights), framework="pt") as handle:
        header = dict(handle.metadata())
    save_file(load_file(str(weights)), str(weights), metadata={**header, "kind": "segment"})
    before = {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ckpt.CheckpointError, match="is a segment checkpoint; resume it with its"):
        train(_config(), ".", tmp_path, resume="latest", **FAKES)
    assert {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_config_changes_name_saved_keys_only_and_skip_free_ones():
    old = {"train": {"lr": 1e-3, "betas": (0.9, 0.98), "max_steps": 5}, "log": {"every": 1}}
    new = {"train": {"lr": 2e-3, "betas": [0.9, 0.98], "max_steps": 9, "new_key": 1}}
    # a tuple saved as a list is the same value; a key the old mgll did not write is no change
    assert ckpt.config_changes(old, new) == ["train.lr", "train.max_steps"]
    assert ckpt.config_changes(old, new, free_keys=("train.max_steps",)) == ["train.lr"]


class _RunsCode:
    def __reduce__(self):
        return (print, ("unpickled!",))


@pytest.mark.parametrize("damage", ["garbage", "pickled object", "no optimizer"])
def test_a_damaged_or_foreign_state_file_is_refused_naming_it(tmp_path, damage, capsys):
    train(_config(**{"train.max_steps": 1}), ".", tmp_path, **FAKES)
    state_file = ckpt.state_path_for(ckpt.resolve_checkpoint("latest", tmp_path))
    if damage == "garbage":
        state_file.write_bytes(b"not a torch file")
    elif damage == "pickled object":
        torch.save({"step": 1, "payload": _RunsCode()}, state_file)
    else:
        state = torch.load(state_file, weights_only=True)
        del state["optimizer"]
        torch.save(state, state_file)
    with pytest.raises(ckpt.CheckpointError, match=r"step_00000001\.state\.pt"):
        train(_config(), ".", tmp_path, resume="latest", **FAKES)
    assert "unpickled!" not in capsys.readouterr().out


def test_a_damaged_weights_file_is_refused_naming_it(tmp_path):
    train(_config(**{"train.max_steps": 1}), ".", tmp_path, **FAKES)
    weights = ckpt.resolve_checkpoint("latest", tmp_path)
    weights.write_bytes(b"\x00" * 16)
    with pytest.raises(ckpt.CheckpointError, match=r"step_00000001\.safetensors cannot be read"):
        ckpt.read_metadata(weights)
    with pytest.raises(ckpt.CheckpointError, match=r"step_00000001\.safetensors cannot be read"):
        train(_config(), ".", tmp_path, resume="latest", **FAKES)


def test_resume_can_switch_to_fp16_loss_scaling(tmp_path, monkeypatch):
    """A run saved without loss scaling resumes under fp16: the resumed run takes exactly one
    step, from the step-1 weights, with the scaler on; the step-2 state holds its scale."""
    import mgll.training.trainer as trainer

    train(_config(**{"train.max_steps": 1}), ".", tmp_path, **FAKES)
    step_1 = ckpt.resolve_checkpoint("latest", tmp_path)
    assert torch.load(ckpt.state_path_for(step_1), weights_only=True)["scaler"] == {}
    seen = []
    real_step = trainer.train_step

    def spy(run, state, batch, params):
        weights = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
        seen.append((state.step, run.precision.name, run.precision.scaler.is_enabled(), weights))
        return real_step(run, state, batch, params)

    monkeypatch.setattr(trainer, "train_step", spy)
    summary = train(
        _config(**{"train.max_steps": 2, "train.precision": "fp16"}),
        ".",
        tmp_path,
        resume="latest",
        **FAKES,
    )
    assert summary["steps"] == 2
    assert [(step, name, scaling) for step, name, scaling, _ in seen] == [(1, "fp16", True)]
    saved = load_file(step_1)
    assert all(torch.equal(seen[0][3][k], saved[k]) for k in saved)
    state = torch.load(
        ckpt.state_path_for(ckpt.resolve_checkpoint("latest", tmp_path)), weights_only=True
    )
    assert state["step"] == 2 and state["scaler"]["scale"] > 0
