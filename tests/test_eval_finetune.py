"""``mgll finetune``: trains, keeps the best validation epoch, resumes from its checkpoint."""

from __future__ import annotations

import pytest

from eval_fixtures import make_downstream
from mgll.cli import main
from mgll.eval.encoders import load_encoder
from mgll.eval.finetune import FineTuneModel, parameter_groups
from mgll.eval.results import read_results


def test_finetune_writes_outputs_and_resumes(tmp_path, capsys):
    data = make_downstream(tmp_path / "grades", per_split={"Train": 12, "Val": 6, "Test": 6})
    out = tmp_path / "ft"
    argv = [
        "finetune",
        "--encoder",
        "random:mgll-vit-test-32:0",
        "--data",
        str(data),
        "--level",
        "grade",
        "--output-dir",
        str(out),
        "--num-workers",
        "0",
        "--bootstrap",
        "20",
        "--no-progress",
        "--batch-size",
        "4",
    ]
    assert main([*argv, "--epochs", "1"]) == 0
    first = read_results(out)
    assert first["protocol"] == "finetune" and first["details"]["best_epoch"] == 1
    assert first["details"]["lr"] == 1.25e-4 and first["details"]["weight_decay"] == 1e-3
    assert (out / "checkpoints" / "step_00000003.safetensors").is_file()
    assert (out / "best.safetensors").is_file() and (out / "predictions.csv").is_file()

    capsys.readouterr()
    assert main([*argv, "--epochs", "2", "--resume"]) == 0
    assert "settings that differ in: epochs\n" in capsys.readouterr().err  # named, and only it
    second = read_results(out)
    history = second["details"]["history"]
    assert [row["epoch"] for row in history] == [1, 2]
    assert history[0] == first["details"]["history"][0]  # epoch 1 was not re-run
    assert (out / "checkpoints" / "step_00000006.safetensors").is_file()
    capsys.readouterr()
    assert main([*argv[:-2], "--output-dir", str(tmp_path / "none"), "--resume"]) == 1
    assert "no complete checkpoint" in capsys.readouterr().err
    _check_the_fine_tuned_tower_is_an_encoder(out, data, tmp_path, capsys)


def _check_the_fine_tuned_tower_is_an_encoder(out, data, tmp_path, capsys):
    """A fine-tuning folder as --encoder: the tower of its best epoch, rebuilt by hand from
    the encoder it started from and best.safetensors; as a pretraining run, a one-line error."""
    import torch
    from safetensors.torch import load_model

    loaded = load_encoder(out)
    assert loaded.kind == "finetune"
    by_hand = FineTuneModel(load_encoder("random:mgll-vit-test-32:0"), 3)
    load_model(by_hand, str(out / "best.safetensors"))
    start = load_encoder("random:mgll-vit-test-32:0")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(images), by_hand.encoder.encode(images))
        assert not torch.allclose(loaded.encode(images), start.encode(images))
    assert loaded.weights_digest() != start.weights_digest()  # its own feature-cache entries
    probe = ["probe", "--encoder", str(out), "--data", str(data), "--level", "grade"]
    quiet = ["--bootstrap", "20", "--no-progress", "--cache-dir", str(tmp_path / "f")]
    assert main([*probe, *quiet, "--output-dir", str(tmp_path / "probe")]) == 0
    assert read_results(tmp_path / "probe")["encoder"]["kind"] == "finetune"
    zeroshot = ["zeroshot", "--model", str(out), "--data", str(data), "--level", "grade"]
    capsys.readouterr()
    assert main([*zeroshot, *quiet, "--output-dir", str(tmp_path / "zs")]) == 1
    err = capsys.readouterr().err.strip()
    assert "is a finetune checkpoint, not a pretraining run's" in err and "\n" not in err


def test_layer_decay_scales_blocks_geometrically():
    encoder = load_encoder("random:mgll-vit-test-32:0")  # 2 transformer blocks
    model = FineTuneModel(encoder, 3)
    groups = parameter_groups(model, 1e-3, 0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    scale = {names[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    assert scale["head.weight"] == 1.0
    assert scale["encoder.tower.transformer.resblocks.1.mlp.c_fc.weight"] == pytest.approx(0.5)
    assert scale["encoder.tower.transformer.resblocks.0.mlp.c_fc.weight"] == pytest.approx(0.25)
    assert scale["encoder.tower.conv1.weight"] == pytest.approx(0.125)
    assert "encoder.tower.proj" not in scale  # frozen: the head reads pre-projection features


def test_a_folder_written_before_the_engine_resumes(tmp_path):
    """A checkpoint in the layout `mgll finetune` wrote before the epoch engine (one RNG state,
    no running loss, the flat settings of its day, no `kind` stamp) resumes to the next epoch."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    from mgll.training import checkpoint as ckpt

    data = make_downstream(tmp_path / "d", per_split={"Train": 8, "Val": 4, "Test": 4})
    out = tmp_path / "ft"
    argv = ["finetune", "--encoder", "random:mgll-vit-test-32:0", "--data", str(data)]
    argv += ["--level", "grade", "--output-dir", str(out), "--num-workers", "0"]
    argv += ["--bootstrap", "10", "--no-progress", "--batch-size", "4"]
    assert main([*argv, "--epochs", "1"]) == 0
    ((step, weights),) = ckpt.list_checkpoints(out / "checkpoints")
    state = ckpt.load_state(weights)
    old_config = {"protocol": "finetune", "encoder": "random:mgll-vit-test-32:0", "epochs": 1}
    old_config |= {"batch_size": 4, "lr": 1.25e-4, "weight_decay": 1e-3, "layer_decay": None}
    old_state = {k: state[k] for k in ckpt.STATE_KEYS if k not in ("rng", "config")}
    old_state |= {"rng": state["rng"][0], "config": old_config, "best": state["best"]}
    old_state["history"] = state["history"]
    torch.save(old_state, ckpt.state_path_for(weights))
    meta = {"format": "mgll-pretrain", "step": str(step), "epoch": "1"}
    save_file(
        load_file(str(weights)), str(weights), metadata=meta | {"config": json.dumps(old_config)}
    )

    assert main([*argv, "--epochs", "2", "--resume"]) == 0
    history = read_results(out)["details"]["history"]
    assert [row["epoch"] for row in history] == [1, 2] and history[0] == state["history"][0]
    assert read_results(out)["encoder"]["spec"] == "random:mgll-vit-test-32:0"
