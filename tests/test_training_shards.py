"""Pretraining from shards (data.source: shards): a stopped and resumed run equals an
uninterrupted one bit for bit, in one process, after Ctrl-C, and on two gloo ranks that read
disjoint shards covering the corpus."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from dist_helpers import free_port, set_torchrun_env
from mgll.data import collate_samples, prepare_data
from mgll.data.shards import write_shards
from mgll.schema import ConfigError
from mgll.training import checkpoint as ckpt
from mgll.training.run_log import read_metrics
from mgll.training.trainer import train
from test_data_shards import SIZE, corpus, data_cfg
from training_fakes import fake_config, fake_model_factory

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
MODEL = {"model_factory": fake_model_factory(), "collate_fn": collate_samples}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """64 samples at the fakes' 8 px: 51 train samples in 13 shards of 4, 13 val."""
    folder = tmp_path_factory.mktemp("corpus")
    prepared = prepare_data(data_cfg(corpus(folder / "data", n=64)), None, seed=0)
    write_shards(prepared, folder / "shards", image_size=SIZE, shard_size=4, log=lambda _: None)
    return folder / "shards"


def _config(shards: Path, **extra):
    settings = {
        "data.source": "shards",
        "data.path": str(shards),
        "data.options": {},
        "data.shuffle_buffer": 6,
        "train.epochs": 3,
        "train.batch_size": 8,
        "train.deterministic": True,
        "checkpoint.every_steps": 2,
        "checkpoint.keep_last": 3,
    }
    settings.update(extra)
    return fake_config(settings)


def _same_weights(a: Path, b: Path) -> bool:
    wa = load_file(ckpt.resolve_checkpoint("latest", a))
    wb = load_file(ckpt.resolve_checkpoint("latest", b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _rows(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in read_metrics(out)]


# 51 train samples in shards of 4 (one of 3). One stream reads all 13: 51 // 8 = 6 batches;
# two workers' streams read 6 and 7 shards, at least 3 + 5 * 4 = 23 samples: 2 batches each.
@pytest.mark.parametrize(("workers", "per_epoch", "stop_at"), [(0, 6, 8), (2, 4, 7)])
def test_a_stopped_and_resumed_shard_run_equals_the_uninterrupted_one(
    shards, tmp_path, workers, per_epoch, stop_at
):
    full, split = tmp_path / "full", tmp_path / "split"
    summary = train(_config(shards, **{"data.num_workers": workers}), ".", full, **MODEL)
    assert summary["steps"] == 3 * per_epoch
    assert summary["samples"] == {"train": 51, "val": 13}
    val_steps = [r["step"] for r in read_metrics(full) if r["kind"] == "val"]
    assert val_steps == [per_epoch, 2 * per_epoch, 3 * per_epoch]

    cfg = _config(shards, **{"data.num_workers": workers, "train.max_steps": stop_at})
    train(cfg, ".", split, **MODEL)
    train(_config(shards, **{"data.num_workers": workers}), ".", split, "latest", **MODEL)
    assert _rows(split) == _rows(full)
    assert _same_weights(full, split)


def test_resuming_with_other_loader_workers_is_refused(shards, tmp_path):
    train(_config(shards, **{"train.max_steps": 2}), ".", tmp_path, **MODEL)
    with pytest.raises(ckpt.CheckpointError, match=r"1 process\(es\) x data.num_workers=0"):
        train(_config(shards, **{"data.num_workers": 2}), ".", tmp_path, "latest", **MODEL)


def test_shards_of_another_image_size_are_a_config_error(shards, tmp_path):
    big = fake_model_factory()

    def factory(cfg, levels):
        model = big(cfg, levels)
        model.image_size = 16
        return model

    with pytest.raises(ConfigError, match=r"hold 8 px images but the model takes 16 px"):
        train(_config(shards), ".", tmp_path, model_factory=factory, collate_fn=collate_samples)


# ---- real processes --------------------------------------------------------------------------

SLOW_RUN = """
import sys, time
from mgll.data import collate_samples
from mgll.training.run_control import RunInterrupted
from mgll.training.trainer import train
from training_fakes import FakeModel
from test_training_shards import _config

class Slow(FakeModel):
    def forward(self, images, texts):
        time.sleep(0.05)
        return super().forward(images, texts)

settings = {"train.epochs": 2, "eval.every_epochs": 0}
cfg = _config(__import__("pathlib").Path(sys.argv[2]), **settings)
resume = sys.argv[3] if len(sys.argv) > 3 else None
try:
    factory = lambda c, g: Slow()
    train(cfg, ".", sys.argv[1], resume, model_factory=factory, collate_fn=collate_samples)
except RunInterrupted as stop:  # as `mgll pretrain` reports it
    print(stop, file=sys.stderr)
    sys.exit(130)
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)])}


@pytest.mark.slow
def test_ctrl_c_on_a_shard_run_resumes_bit_identically(shards, tmp_path):
    stopped_dir = tmp_path / "stopped"
    argv = [sys.executable, "-c", SLOW_RUN, str(stopped_dir), str(shards)]
    stopped = subprocess.Popen(
        argv, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    metrics = stopped_dir / "metrics.jsonl"
    end = time.monotonic() + 600
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert stopped.poll() is None, stopped.communicate()
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)
    stopped.send_signal(signal.SIGINT)
    _, err = stopped.communicate(timeout=600)
    assert stopped.returncode == 130 and "stopped by SIGINT at step" in err, err
    step = ckpt.load_state(ckpt.resolve_checkpoint("latest", stopped_dir))["step"]
    assert 3 <= step < 12  # 6 steps per epoch, 2 epochs
    # The resumed and the uninterrupted run here (the model's sleep changes no number).
    cfg = _config(shards, **{"train.epochs": 2, "eval.every_epochs": 0})
    train(cfg, ".", stopped_dir, "latest", **MODEL)
    train(cfg, ".", tmp_path / "full", **MODEL)
    assert _rows(stopped_dir) == _rows(tmp_path / "full")
    assert _same_weights(tmp_path / "full", stopped_dir)


def _rank(rank: int, world: int, port: int, cfg, out: str) -> None:
    set_torchrun_env(rank, world, port)
    torch.set_num_threads(1)
    try:
        summary = train(cfg, ".", out, **MODEL)
        # What this rank read in each epoch, by the same plan the run used.
        split = prepare_data(cfg.data, ".", cfg.train.seed).datasets(
            image_size=SIZE, mean=(0.5,) * 3, std=(0.25,) * 3
        )["train"]
        plan = split.batches(cfg.train.batch_size // world, rank, world)
        read = []
        for epoch in range(cfg.train.epochs):
            plan.set_epoch(epoch)
            read.append(
                {
                    "shards": [s.name for s in plan.stream_shards(rank)],
                    "indices": [i for b in plan for i in b["indices"].tolist()],
                }
            )
        Path(out, f"rank{rank}.json").write_text(json.dumps({"read": read, **summary}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_read_disjoint_shards_covering_the_corpus(shards, tmp_path):
    cfg = _config(shards, **{"train.epochs": 2, "eval.every_epochs": 0})
    mp.spawn(_rank, args=(2, free_port(), cfg, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # Batches of 4 per rank; the ranks read 6 and 7 shards, at least 3 + 5 * 4 = 23 samples.
    assert ranks[0]["steps"] == ranks[1]["steps"] == 2 * 5
    every = {f"train-{k:06d}.tar" for k in range(13)}
    for epoch in range(2):
        a, b = (set(r["read"][epoch]["shards"]) for r in ranks)
        assert not a & b and a | b == every
        ia, ib = (r["read"][epoch]["indices"] for r in ranks)
        assert len(ia) == len(ib) == 5 * 4 and not set(ia) & set(ib)
    assert ranks[0]["read"][0]["shards"] != ranks[0]["read"][1]["shards"]  # reshuffled
    assert ckpt.read_metadata(ckpt.resolve_checkpoint("latest", tmp_path))["step"] == 10
