"""Distributed equivalence: 2 gloo processes holding halves of a batch vs one process holding all.

DDP averages parameter gradients over ranks, so the quantity that must match the single-process
gradient is the rank-mean of each rank's gradient (each rank's share, g_r / world_size, summed).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dist_helpers import free_port
from mgll.losses import CLIPLoss, MGLLLoss

N, D_IN, D = 8, 6, 5


def _problem():
    """A global batch: inputs, labels, and a tiny linear 'model' (image, 2 text projections)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D_IN, generator=g)
    labels = [
        torch.tensor([0, 1, 0, -1, 2, 1, -1, 0]),  # one missing label in each half
        torch.tensor(
            [[1, 0, 1], [0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 1], [1, 0, 0]]
        ).float(),
    ]
    params = {
        "w_image": torch.randn(D_IN, D, generator=g),
        "w_text0": torch.randn(D_IN, D, generator=g),
        "w_text1": torch.randn(D_IN, D, generator=g),
        "logit_scale": torch.tensor(2.0),
        "logit_bias": torch.tensor(-1.0),
    }
    return x, labels, params


def _run(loss_fn, x, labels, params):
    p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    texts = [x @ p["w_text0"], x @ p["w_text1"]]
    out = loss_fn(
        x @ p["w_image"],
        texts[-1:] if isinstance(loss_fn, CLIPLoss) else texts,  # CLIP: the finest level
        labels,
        logit_scale=p["logit_scale"],
        logit_bias=p["logit_bias"],
    )
    out["loss"].backward()
    return {k: v.detach() for k, v in out.items()}, {k: v.grad for k, v in p.items()}


CASES = {
    "mgll_even": (lambda: MGLLLoss(), [4, 4]),
    # tiles of 3 rows over the gathered batch (and over the local rows with local_loss)
    "mgll_even_tiled": (lambda: MGLLLoss(chunk_size=3), [4, 4]),
    "mgll_uneven_tiled": (lambda: MGLLLoss(chunk_size=3), [3, 5]),
    "mgll_local_tiled": (lambda: MGLLLoss(local_loss=True, chunk_size=3), [4, 4]),
    "clip_tiled": (lambda: CLIPLoss(chunk_size=3), [4, 4]),
    "clip_local_tiled": (lambda: CLIPLoss(local_loss=True, chunk_size=3), [4, 4]),
    "mgll_uneven": (lambda: MGLLLoss(), [3, 5]),
    "mgll_local": (lambda: MGLLLoss(local_loss=True), [4, 4]),
    "clip": (lambda: CLIPLoss(), [4, 4]),
    "clip_local": (lambda: CLIPLoss(local_loss=True), [4, 4]),
}


def _worker(rank: int, world: int, port: int, result_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    x, labels, params = _problem()
    results = {}
    for name, (make, sizes) in CASES.items():
        start = sum(sizes[:rank])
        rows = slice(start, start + sizes[rank])
        out, grads = _run(make(), x[rows], [lab[rows] for lab in labels], params)
        results[name] = {"out": out, "grads": grads}
    torch.save(results, f"{result_path}.{rank}")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ddp") / "result")
    mp.spawn(_worker, args=(2, free_port(), path), nprocs=2, join=True)
    return [torch.load(f"{path}.{r}", weights_only=True) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_equal_one_process(two_rank_results, case):
    x, labels, params = _problem()
    single_out, single_grads = _run(CASES[case][0](), x, labels, params)
    ranks = [r[case] for r in two_rank_results]
    local = "local" in case
    for key, value in single_out.items():
        per_rank = [r["out"][key] for r in ranks]
        # global loss: every rank holds the global value; local loss: the rank-mean is it.
        got = torch.stack(per_rank).mean() if local else per_rank
        for v in got if not local else [got]:
            torch.testing.assert_close(v, value, atol=1e-5, rtol=1e-5, msg=f"{case}/{key}")
    for key, grad in single_grads.items():
        if grad is None:  # a parameter the loss does not use (CLIP: the bias, level 0)
            assert all(r["grads"][key] is None for r in ranks), f"{case}/{key}"
            continue
        mean_grad = torch.stack([r["grads"][key] for r in ranks]).mean(dim=0)
        torch.testing.assert_close(mean_grad, grad, atol=1e-5, rtol=1e-5, msg=f"{case}/{key}")


@pytest.mark.slow
def test_the_distributed_case_is_not_trivial(two_rank_results):
    # Each rank's own-half loss differs from the global one: the gather is what makes them equal.
    x, labels, params = _problem()
    half, _ = _run(MGLLLoss(), x[:4], [lab[:4] for lab in labels], params)
    full = two_rank_results[0]["mgll_even"]["out"]["loss"]
    assert abs(half["loss"].item() - full.item()) > 1e-3
