"""Fine-tuning on the epoch engine (mgll.training.epochs): a real SIGINT mid-epoch and its
resume, the run lock, the typed settings, the authors' recipe reaching the optimizer, the
epoch kept by the selection rule, the random crop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from eval_fixtures import make_downstream
from mgll.cli import main
from mgll.eval.encoders import load_encoder
from mgll.eval.results import read_results
from mgll.training import checkpoint as ckpt
from stopped_run import stop_after_step

ENCODER = "random:mgll-vit-test-32:0"


def _argv(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "finetune",
        "--encoder",
        ENCODER,
        "--data",
        str(data),
        "--level",
        "grade",
        "--output-dir",
        str(out),
        "--num-workers",
        "0",
        "--bootstrap",
        "10",
        "--no-progress",
        "--batch-size",
        "4",
        *extra,
    ]


@pytest.mark.slow
def test_sigint_mid_epoch_checkpoints_and_resume_equals_an_uninterrupted_run(tmp_path):
    """10 training images in batches of 4: 3 steps per epoch; SIGINT after step 4 (epoch 2's
    first step). The stop writes a checkpoint at step 4 and exits 130; ``--resume latest``
    finishes with the weights, history and predictions of a run that never stopped."""
    data = make_downstream(tmp_path / "d", per_split={"Train": 10, "Val": 6, "Test": 6})
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert main(_argv(data, whole, "--epochs", "2")) == 0

    argv = _argv(data, stopped, "--epochs", "2")
    state = stop_after_step(argv, 4, stopped)
    assert (state["epoch"], state["epoch_step"]) == (1, 1)  # inside the second epoch

    assert main([*argv, "--resume", "latest"]) == 0
    a, b = read_results(whole), read_results(stopped)
    assert a["details"]["history"] == b["details"]["history"]
    assert a["details"]["best_epoch"] == b["details"]["best_epoch"]
    assert (whole / "predictions.csv").read_text() == (stopped / "predictions.csv").read_text()
    for name in ("best.safetensors", "checkpoints/step_00000006.safetensors"):
        left, right = load_file(str(whole / name)), load_file(str(stopped / name))
        assert left.keys() == right.keys()
        for key in left:
            assert torch.equal(left[key], right[key]), (name, key)


def test_a_second_run_into_a_locked_folder_is_refused(tmp_path, capsys):
    from mgll.training.run_control import RunLock

    data = make_downstream(tmp_path / "d", per_split={"Train": 4, "Val": 2, "Test": 2})
    out = tmp_path / "ft"
    with RunLock(out):  # held by this (living) process, as a running fine-tune holds it
        assert main(_argv(data, out, "--epochs", "1")) == 1
        assert (out / ".mgll-run.lock").is_file()  # the refused run left the lock alone
    err = capsys.readouterr().err.strip()
    assert "is in use by another run" in err and "\n" not in err
    assert not (out / "checkpoints").exists()


@pytest.mark.parametrize(
    ("yaml_text", "overrides", "message"),
    [
        ("lr: 1.0e-4\nlrr: 3\n", [], "unknown config key 'lrr' (did you mean 'lr'?)"),
        ("", ["augmentation.rotaton=3"], "unknown config key 'augmentation.rotaton'"),
        ("head: pooled\n", [], "head: 'pooled' is not one of features, projected"),
    ],
)
def test_bad_settings_are_one_line_errors(tmp_path, capsys, yaml_text, overrides, message):
    config = tmp_path / "ft.yaml"
    config.write_text(yaml_text)
    out = tmp_path / "ft"
    argv = _argv(tmp_path / "no-data-needed", out, "--config", str(config), *overrides)
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    if yaml_text:
        assert str(config) in err  # names the file
    assert not out.exists()  # nothing written


def test_the_paper_recipe_reaches_the_optimizer_and_the_head(tmp_path, monkeypatch):
    """`paper-finetune` through the benchmark's doorway: AdamW(0.9, 0.95), clipping at norm 10
    passed to and applied by every step, the head on the projected output, the crop on."""
    import mgll.data.transforms as transforms
    import mgll.training.epochs as epochs
    from mgll.benchmark import protocols
    from mgll.eval.task import load_eval_data

    steps, crops = [], []
    real_step = epochs.optimizer_step

    def spy_step(optimizer, precision, params, grad_clip, **kwargs):
        steps.append((optimizer.param_groups[0]["betas"], grad_clip))
        return real_step(optimizer, precision, params, grad_clip, **kwargs)

    monkeypatch.setattr(epochs, "optimizer_step", spy_step)
    real_crop = transforms.RandomAreaCrop.__call__
    monkeypatch.setattr(
        transforms.RandomAreaCrop,
        "__call__",
        lambda self, image: crops.append(self.scale) or real_crop(self, image),
    )
    clip_calls = []
    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(
        torch.nn.utils,
        "clip_grad_norm_",
        lambda params, max_norm, *a, **k: (
            clip_calls.append(max_norm) or real_clip(params, max_norm)
        ),
    )
    data_dir = make_downstream(tmp_path / "d", per_split={"Train": 8, "Val": 4, "Test": 4})
    data = load_eval_data(data_dir, "grade")
    out = tmp_path / "paper"
    protocols.run_protocol(
        "paper-finetune",
        ENCODER,
        data,
        out,
        fraction=1.0,
        seed=0,
        epochs=1,
        n_resamples=10,
        cache_dir=False,
        device="cpu",
        progress=False,
    )
    assert len(steps) == 1  # 8 images, batch 32: one step
    betas, grad_clip = steps[0]
    assert tuple(betas) == (0.9, 0.95) and grad_clip == 10.0
    assert clip_calls == [10.0]  # what optimizer_step clipped with
    assert crops and set(crops) == {(0.08, 1.0)}
    encoder = load_encoder(ENCODER)
    head = load_file(str(out / "best.safetensors"))["head.weight"]
    assert head.shape == (3, encoder.embed_dim)
    _check_head_reads_the_projection(out, encoder)


def _check_head_reads_the_projection(out: Path, encoder) -> None:
    """The fine-tuned model's logits are its head over the *projected* embedding (not the
    pre-projection features), and the projection itself was trained."""
    from safetensors.torch import load_model

    from mgll.eval.finetune import FineTuneModel

    model = FineTuneModel(encoder, 3, head="projected")
    load_model(model, str(out / "best.safetensors"))
    model.eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(images)
        projected = model.head(encoder.encode(images, projected=True))
        features = encoder.encode(images)
    torch.testing.assert_close(logits, projected)
    assert features.shape[1] == encoder.feature_dim
    start = load_encoder(ENCODER)
    assert not torch.equal(start.tower.proj, encoder.tower.proj)  # the projection trained


@pytest.mark.parametrize(("select_by", "expected"), [("accuracy", 2), ("auc_macro", 3)])
def test_select_by_keeps_the_epoch_the_stub_scores_best(tmp_path, monkeypatch, select_by, expected):
    """Validation metrics come from a stub: accuracy is best in epoch 2, macro AUC in epoch 3.
    The kept epoch, best.safetensors and the weights that score validation and test (a spy on
    every prediction) are the ones validated in that epoch."""
    import mgll.eval.finetune as finetune

    scripted = iter([(0.9, 0.5), (0.6, 0.9), (0.95, 0.7)])  # (auc, accuracy) per epoch
    monkeypatch.setattr(
        finetune,
        "classification_metrics",
        lambda *a, **k: dict(zip(("auc_macro", "accuracy"), next(scripted), strict=True)),
    )
    predicted_with = []  # the weights of every prediction: 3 validations, then val and test
    real_predict = finetune.predict

    def spy_predict(model, dataset, *args):
        predicted_with.append({k: v.clone() for k, v in model.state_dict().items()})
        return real_predict(model, dataset, *args)

    monkeypatch.setattr(finetune, "predict", spy_predict)
    data = make_downstream(tmp_path / "d", per_split={"Train": 8, "Val": 4, "Test": 4})
    out = tmp_path / select_by
    assert main(_argv(data, out, "--epochs", "3", f"select_by={select_by}")) == 0
    results = read_results(out)
    assert results["details"]["best_epoch"] == expected
    assert results["details"]["select_by"] == select_by
    assert len(predicted_with) == 5
    validated, scored = predicted_with[:3], predicted_with[3:]
    assert not torch.equal(validated[1]["head.weight"], validated[2]["head.weight"])
    best = load_file(str(out / "best.safetensors"))
    for key, value in validated[expected - 1].items():
        assert torch.equal(best[key], value), key
        for weights in scored:  # validation and test scored once, with the kept epoch's weights
            assert torch.equal(weights[key], value), key


def test_random_area_crop_keeps_the_size_and_crops(tmp_path):
    from mgll.data.transforms import RandomAreaCrop, augmentation_options
    from mgll.errors import DataError

    ramp = np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (64, 1, 3))
    image = torch.from_numpy(ramp).permute(2, 0, 1).contiguous()
    torch.manual_seed(0)
    crops = [RandomAreaCrop(0.1)(image) for _ in range(5)]
    assert all(c.shape == image.shape and c.dtype == torch.uint8 for c in crops)
    # A crop of a left-to-right ramp, resized back, spans a narrower range of values.
    spans = [int(c[0].max()) - int(c[0].min()) for c in crops]
    assert min(spans) < int(image.max()) - int(image.min())
    assert augmentation_options(None)["crop_scale"] == 0.0  # off by default
    with pytest.raises(DataError, match="crop_scale"):
        augmentation_options({"crop_scale": 1.5})


def test_kept_last_batch_covers_every_sample_and_pads_across_ranks():
    """drop_last=False (the epoch engine's plan): 9 samples in global batches of 4 over 2 ranks
    are 3 steps; every sample is read in the epoch, and the last batch (one sample) is padded
    with the epoch's first sample so both ranks take one, as DistributedSampler pads."""
    from mgll.training.sampling import GlobalBatchSampler

    plans = [GlobalBatchSampler(9, 4, rank, 2, seed=3, drop_last=False) for rank in (0, 1)]
    for plan in plans:
        plan.set_epoch(1)
    batches = [[[i for i, _, _ in batch] for batch in plan] for plan in plans]
    assert plans[0].steps_per_epoch == 3
    assert [len(x) for x in batches[0]] == [2, 2, 1] == [len(x) for x in batches[1]]
    order = torch.randperm(9, generator=torch.Generator().manual_seed(3 * 100_003 + 1)).tolist()
    assert [batches[0][k] + batches[1][k] for k in range(3)] == [
        order[0:4],
        order[4:8],
        [order[8], order[0]],
    ]
    with pytest.raises(ValueError, match="fewer than one batch"):
        GlobalBatchSampler(3, 4)  # the contrastive default still refuses it
    short = GlobalBatchSampler(3, 4, drop_last=False)
    assert len(list(short)) == short.steps_per_epoch == 1


def test_the_engine_trains_any_model_and_keeps_the_last_epoch_without_validation(tmp_path):
    """The engine knows nothing of classification: a linear regression with a squared loss,
    no validation set (the last epoch is kept), an SGD optimizer, its own checkpoint kind."""
    from mgll.training.epochs import EpochSettings, SupervisedTask, fit, run_scope

    torch.manual_seed(0)
    x = torch.randn(12, 3)
    y = x @ torch.tensor([1.0, -2.0, 0.5])
    model = torch.nn.Linear(3, 1)
    task = SupervisedTask(
        model=model,
        train_set=torch.utils.data.TensorDataset(x, y),
        loss=lambda net, batch: ((net(batch[0]).squeeze(1) - batch[1]) ** 2).mean(),
        validate=None,
        rank=None,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        config={"task": "regression"},
    )
    settings = EpochSettings(
        epochs=4, batch_size=4, lr=0.1, warmup_epochs=0, kind="regression", progress=False
    )
    with run_scope(tmp_path / "r", "cpu") as scope:
        result = fit(scope, task, settings)
    assert result.best_epoch == 4 and [row["epoch"] for row in result.history] == [1, 2, 3, 4]
    assert (
        result.steps == 12
        and result.history[-1]["train_loss"] < result.history[0]["train_loss"] / 2
    )
    best = load_file(str(result.best_weights))
    assert torch.equal(best["weight"], model.weight.detach())
    ((_, weights),) = ckpt.list_checkpoints(tmp_path / "r" / "checkpoints")
    assert ckpt.checkpoint_kind(load_header(weights)) == "regression"


def load_header(weights: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        return handle.metadata()
