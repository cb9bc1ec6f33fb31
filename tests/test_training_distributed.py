"""Two gloo processes train like one process holding the whole global batch."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from dist_helpers import free_port, set_torchrun_env
from mgll.training import checkpoint as ckpt
from mgll.training.run_log import read_metrics
from mgll.training.trainer import train
from training_fakes import FAKES, fake_config

pytestmark = pytest.mark.slow


def _worker(rank: int, world: int, port: int, cfg: dict, out: str) -> None:
    set_torchrun_env(rank, world, port)
    torch.set_num_threads(1)
    try:
        train(cfg, ".", out, **FAKES)
    finally:
        dist.destroy_process_group()


def _config(**extra):
    settings = {"train.max_steps": 4, "data.options.unreadable": [5, 30]}
    settings.update(extra)
    return fake_config(settings)


@pytest.mark.parametrize(("accum", "local_loss"), [(1, False), (2, True)])
def test_two_processes_log_the_losses_of_one_process(tmp_path, accum, local_loss):
    single, double = tmp_path / "single", tmp_path / "double"
    # With local_loss each rank holds part of the loss and the logged value is the ranks' mean,
    # which is the global loss when the ranks hold equally many labelled samples.
    data = {"data.options.missing_labels": not local_loss}
    summary = train(_config(**data), ".", single, **FAKES)
    cfg = _config(**data, **{"train.accum_steps": accum, "loss.local_loss": local_loss})
    mp.spawn(_worker, args=(2, free_port(), cfg, str(double)), nprocs=2, join=True)
    one, two = read_metrics(single), read_metrics(double)
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "sclip", "pointwise", "skl"):
            assert b[key] == pytest.approx(a[key], abs=1e-4, rel=1e-4), (a["step"], key)
    wa = load_file(ckpt.resolve_checkpoint("latest", single))
    wb = load_file(ckpt.resolve_checkpoint("latest", double))
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-5, msg=name)
    # Both unreadable images were drawn (by either rank) and are reported once each.
    assert summary["skipped_images"] == 2
    assert json.loads((double / "summary.json").read_text())["skipped_images"] == 2
