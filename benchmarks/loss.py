"""Speed and memory of MGLLLoss vs CLIPLoss, and of mask construction vs the authors' loops.

Prints three Markdown tables:
1. forward+backward time and autograd memory of the loss for N in {256, 1024, 4096} and G in
   {1, 2, 3}, next to CLIPLoss at the same N (target: MGLL(G) <= 1.2 x G x CLIP); every text
   its own random vector (the worst case), and a G = 3 row whose coarse level has one text
   per class (as a batch of class prompts gives it, "shared");
2. positive-target construction at each N: ours (string keys -> ids -> vectorised mask) vs
   Python loops over string equality, as the authors' code does every step (target: >= 30x
   faster at N = 1024);
3. (``--tiles``) the tiled loss (``chunk_size``) against the untiled one at G = 2: peak memory
   growth of a forward+backward (each case in a fresh process, resident memory sampled), time,
   and the largest N that fits 16 GiB, extrapolated from the measured bytes per N^2 (untiled)
   or per chunk_size x N (tiled). Target: tiled <= half the untiled peak at N = 8192. With
   ``--device cuda`` the peak is the CUDA allocator's and the budget the card's memory;
4. (``--ops``) the dispatch cost of one forward+backward for each N and the cases of table 1:
   aten calls (torch.profiler's CPU ``aten::`` events, nested ones included), host reads (the
   outermost of ``_local_scalar_dense``, ``is_nonzero``, ``nonzero``, ``equal`` and
   ``unique`` events: each is a device sync on CUDA) and the median time over ``--repeats``
   (default device cpu). At small N the loss is bound by these, not by arithmetic.

"Saved for backward" is the total size of the tensors autograd keeps between forward and
backward, i.e. the loss's activation memory; it is reported in units of one N x N fp32 matrix
to show that memory is O(G N^2) with no N x N x C intermediate. On CUDA the peak allocated
memory is printed as well.

``--profile`` prints instead where a forward+backward's time goes (torch.profiler's self CPU
time, grouped: matmuls, transcendental element-wise ops, gathers/scatters, the rest) for CLIP
and MGLL at G = 3. ``--compile`` adds rows for ``MGLLLoss(compile=True)`` (compiled during
the untimed warm-up round). ``--against FILE`` adds the MGLL rows of another single-file
``losses.py`` (e.g. one before the package split, ``git show 8ae1a4d:src/mgll/losses.py >
/tmp/main_losses.py``) to the same alternating rounds, labelled "MGLL (FILE's stem)", so two
implementations are compared under the same load.

Usage: python benchmarks/loss.py [--sizes 256 1024 4096] [--dim 512] [--repeats 3] [--device cpu]
                                 [--against /tmp/main_losses.py] [--compile]
       python benchmarks/loss.py --tiles [--tile-sizes 2048 8192] [--chunk-size 512]
       python benchmarks/loss.py --profile [--sizes 1024] [--compile] [--against FILE]
       python benchmarks/loss.py --ops [--sizes 128 1024] [--repeats 20] [--device cpu]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from mgll.losses import CLIPLoss, MGLLLoss, encode_labels, positive_mask

VOCAB = [f"finding {k}" for k in range(14)]
LOOP_LIMIT = 4096
"""Largest N at which the authors' Python loops are timed."""


def _batch(n: int, dim: int, levels: int, device: torch.device, seed: int = 0, shared=False):
    """Embeddings and labels; ``shared``: the coarse level's texts are one vector per class."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, dim, generator=g)
    texts = [torch.randn(n, dim, generator=g) for _ in range(levels)]
    # coarse level: 2 classes; middle: 14-way multi-hot; fine: 50 classes with 10% missing
    labels = [
        torch.randint(0, 2, (n,), generator=g),
        (torch.rand(n, 14, generator=g) < 0.15).float(),
        torch.where(torch.rand(n, generator=g) < 0.1, -1, torch.randint(0, 50, (n,), generator=g)),
    ][:levels]
    if shared:
        texts[0] = torch.randn(2, dim, generator=g)[labels[0]]
    leaf = [t.to(device).requires_grad_(True) for t in (image, *texts)]
    return leaf[0], leaf[1:], [lab.to(device) for lab in labels]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_once(loss_fn, image, texts, labels, device: torch.device):
    """Seconds of one forward+backward, bytes saved for backward, CUDA peak bytes, and the
    process's CPU seconds (all its threads; what other jobs on a shared machine change least)."""
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = loss_fn(image, texts, labels, logit_scale=2.6593, logit_bias=-10.0)
    out["loss"].backward()
    _sync(device)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    image.grad = None
    for t in texts:
        t.grad = None
    return seconds, saved, peak, cpu


def _time_cases(cases, batches, repeats: int, device: torch.device):
    """Run the cases alternately (so load changes hit all alike); per case the median time,
    the median of its time over CLIP's in the same round (the paired ratio) and the same for
    CPU time."""
    runs: dict[str, list] = {name: [] for name in cases}
    for r in range(repeats + 1):  # round 0 warms up
        for name, (loss_fn, g, batch) in cases.items():
            image, texts, labels = batches[batch]
            result = _run_once(loss_fn, image, texts[:g], labels[:g], device)
            if r:
                runs[name].append(result)
    out = {}
    for name, results in runs.items():
        pairs = list(zip(results, runs["CLIP"], strict=True))
        ratio = statistics.median(mine[0] / clip[0] for mine, clip in pairs)
        cpu_ratio = statistics.median(mine[3] / clip[3] for mine, clip in pairs)
        seconds = statistics.median(x[0] for x in results)
        out[name] = (seconds, ratio, results[0][1], results[0][2], cpu_ratio)
    return out


def _check_compiled(image, texts, labels) -> None:
    """Print how far MGLLLoss(compile=True) is from the eager loss and gradients, and whether
    that is within float rounding (1e-5 relative); the tables follow either way."""
    results, seconds = [], 0.0
    for loss_fn in (MGLLLoss(), MGLLLoss(compile=True)):
        start = time.perf_counter()
        out = loss_fn(image, texts, labels, logit_scale=2.6593, logit_bias=-10.0)
        grads = torch.autograd.grad(out["loss"], [image, *texts])
        results.append([out["loss"].detach(), *grads])
        seconds = time.perf_counter() - start
    print(f"first compiled forward+backward (compiling, unless cached): {seconds:.0f} s")
    diff = max(float((a - b).abs().max() / a.abs().max()) for a, b in zip(*results, strict=True))
    exact = all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(*results, strict=True))
    print(f"compiled vs eager, G = 3, N = {image.shape[0]}: largest difference {diff:.1e} of the")
    print(f"largest value (loss, each gradient): {'exact' if exact else 'NOT EXACT'} to 1e-5\n")


def _load_losses(path: str):
    """The module of another implementation's ``losses.py`` (it imports ``mgll`` as usual)."""
    spec = importlib.util.spec_from_file_location(f"against_{Path(path).stem}", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--against {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _loop_targets(keys: list[str]) -> torch.Tensor:
    """The authors' way: compare label strings pairwise in Python, then build a tensor."""
    rows = []
    for a in keys:
        rows.append([1.0 if a == b else 0.0 for b in keys])
    return torch.tensor(rows)


def _vectorised_targets(keys: list[str], device: torch.device) -> torch.Tensor:
    ids, _ = encode_labels(keys, vocabulary=VOCAB)
    return positive_mask(ids.to(device))


def _time_call(fn, repeats: int, device: torch.device) -> float:
    times = []
    for r in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        if r:
            times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (1: less noise on a busy machine)"
    )
    parser.add_argument(
        "--device", default=None, help="default: cuda when available (cpu with --ops)"
    )
    parser.add_argument(
        "--against", help="another losses.py whose MGLL rows join the same rounds (e.g. main's)"
    )
    parser.add_argument(
        "--compile", action="store_true", help="add MGLLLoss(compile=True) rows (G = 2, 3)"
    )
    parser.add_argument("--tiles", action="store_true", help="only the tiled-loss table")
    parser.add_argument(
        "--profile", action="store_true", help="only where the time goes, by op group"
    )
    parser.add_argument(
        "--ops", action="store_true", help="only aten calls and host reads per fwd+bwd"
    )
    parser.add_argument("--tile-sizes", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--memory-child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and not args.ops else "cpu"
    if args.memory_child:
        _memory_child(*args.memory_child, args.dim, args.device)
        return
    if args.tiles:
        _tiles_table(args)
        return
    device = torch.device(args.device)
    if args.profile:
        print(f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
        _profile_table(args, device)
        return
    if args.ops:
        _ops_table(args, device)
        return
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{torch.get_num_threads()} threads"
    )
    print(
        f"device: {device} ({where}), torch {torch.__version__}, D = {args.dim}, "
        f"medians of {args.repeats} alternating runs, load average {os.getloadavg()[0]:.1f}\n"
    )
    other = _load_losses(args.against) if args.against else None
    other_name = f"MGLL ({Path(args.against).stem})" if args.against else ""

    cuda = device.type == "cuda"
    header = (
        "| N | loss | G | texts | fwd+bwd (ms) | x CLIP (paired median) | target (1.2 x G) "
        "| x CLIP in CPU time | saved for backward (MiB) | in N x N fp32 |"
    )
    if cuda:
        header += " CUDA peak (MiB) |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for n in args.sizes:
        batches = {
            "distinct": _batch(n, args.dim, 3, device),
            "shared": _batch(n, args.dim, 3, device, shared=True),
        }
        nn_mib = n * n * 4 / 2**20
        cases = {"CLIP": (CLIPLoss(), 1, "distinct")}
        cases |= {f"MGLL{g}": (MGLLLoss(), g, "distinct") for g in (1, 2, 3)}
        cases["MGLL3 shared"] = (MGLLLoss(), 3, "shared")
        if args.compile:  # compiled in the warm-up round, which is not timed
            cases |= {f"MGLL{g} compiled": (MGLLLoss(compile=True), g, "distinct") for g in (2, 3)}
        if other is not None:
            cases |= {f"{other_name}{g}": (other.MGLLLoss(), g, "distinct") for g in (2, 3)}
            cases[f"{other_name}3 shared"] = (other.MGLLLoss(), 3, "shared")
        if args.compile:
            _check_compiled(*batches["distinct"])
        best = _time_cases(cases, batches, args.repeats, device)
        for name, (seconds, ratio, saved, peak, cpu_ratio) in best.items():
            g, texts = cases[name][1], cases[name][2]
            label = other_name if name.startswith(other_name or "-") else name[:4]
            label += " (compiled)" if name.endswith("compiled") else ""
            target = (
                ""
                if name == "CLIP"
                else f"{1.2 * g:.1f} ({'ok' if ratio <= 1.2 * g else 'MISSED'})"
            )
            row = (
                f"| {n} | {label} | {g} | {texts} | {seconds * 1e3:.1f} | {ratio:.2f} | "
                f"{target} | {cpu_ratio:.2f} | {saved / 2**20:.1f} | {saved / 2**20 / nn_mib:.1f} |"
            )
            print(row + (f" {peak / 2**20:.0f} |" if cuda else ""), flush=True)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")

    print("\n| N | positive targets | ours (ms) | Python loops (ms) | speed-up | target |")
    print("|---|---|---|---|---|---|")
    rng = random.Random(0)
    for n in args.sizes:
        if n > LOOP_LIMIT:  # N^2 Python comparisons and a list of lists: minutes, gigabytes
            print(f"| {n} | string keys | - | - | - | loops not run above N = {LOOP_LIMIT} |")
            continue
        keys = [rng.choice(VOCAB) for _ in range(n)]
        ours = _time_call(lambda keys=keys: _vectorised_targets(keys, device), args.repeats, device)
        loops = _time_call(lambda keys=keys: _loop_targets(keys).to(device), 1, device)
        assert torch.equal(_vectorised_targets(keys, device).float().cpu(), _loop_targets(keys))
        target = ">= 30x" if n == 1024 else ""
        print(
            f"| {n} | string keys | {ours * 1e3:.2f} | {loops * 1e3:.1f} "
            f"| {loops / ours:.0f}x | {target} |"
        )


PROFILE_GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm"),
    "exp, log, softplus, sigmoid, softmax": (
        "aten::exp",
        "aten::exp_",
        "aten::log",
        "aten::log_",
        "aten::log1p",
        "aten::softplus",
        "aten::sigmoid",
        "aten::logaddexp",
        "aten::_log_softmax",
        "aten::_log_softmax_backward_data",
        "aten::_softmax",
    ),
    "gather, scatter": (
        "aten::index_select",
        "aten::index_add_",
        "aten::scatter_add_",
        "aten::index",
        "aten::index_put_",
    ),
}
"""Op groups of the ``--profile`` table (self CPU time); every other op is "other"."""


def _profile_table(args: argparse.Namespace, device: torch.device) -> None:
    """Where a forward+backward's time goes, by op group, for CLIP and MGLL (G = 3, distinct
    texts): torch.profiler's self CPU time per op, each case profiled over the same
    alternating rounds, in ms per forward+backward."""
    from torch.profiler import ProfilerActivity, profile

    other = _load_losses(args.against) if args.against else None
    for n in args.sizes:
        batch = _batch(n, args.dim, 3, device)
        cases = {"CLIP": (CLIPLoss(), 1), "MGLL": (MGLLLoss(), 3)}
        if args.compile:
            cases["MGLL (compiled)"] = (MGLLLoss(compile=True), 3)
        if other is not None:
            cases[f"MGLL ({Path(args.against).stem})"] = (other.MGLLLoss(), 3)
        times: dict[str, dict[str, float]] = {name: {} for name in cases}
        for loss_fn, g in cases.values():  # warm up (and compile)
            _run_once(loss_fn, batch[0], batch[1][:g], batch[2][:g], device)
        for _ in range(args.repeats):
            for name, (loss_fn, g) in cases.items():
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    _run_once(loss_fn, batch[0], batch[1][:g], batch[2][:g], device)
                for event in prof.key_averages():
                    group = next(
                        (k for k, ops in PROFILE_GROUPS.items() if event.key in ops), "other"
                    )
                    ms = event.self_cpu_time_total / 1e3 / args.repeats
                    times[name][group] = times[name].get(group, 0.0) + ms
        print(f"\nN = {n}, D = {args.dim}, ms per forward+backward (self CPU time)\n")
        print("| op group | " + " | ".join(cases) + " |")
        print("|---|" + "---|" * len(cases))
        for group in [*PROFILE_GROUPS, "other"]:
            cells = " | ".join(f"{times[name].get(group, 0.0):.1f}" for name in cases)
            print(f"| {group} | {cells} |")
        totals = " | ".join(f"{sum(times[name].values()):.1f}" for name in cases)
        print(f"| total | {totals} |")
        print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


HOST_READS = (
    "aten::_local_scalar_dense",
    "aten::is_nonzero",
    "aten::nonzero",
    "aten::equal",
    "aten::_unique",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::unique_dim_consecutive",
)
"""The ops of the ``--ops`` table that read a tensor's value back to the host (``.item()``,
``bool(t)``, ``nonzero``, ``torch.equal``, ``torch.unique``): each waits for the device."""


def _op_counts(loss_fn, image, texts, labels, device: torch.device) -> tuple[int, int]:
    """aten calls and host reads of one forward+backward (torch.profiler, CPU events). A host
    read inside another (``bool(t)`` is ``is_nonzero`` calling ``_local_scalar_dense``) counts
    once."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _run_once(loss_fn, image, texts, labels, device)
    events = prof.events()
    calls = sum(e.name.startswith("aten::") for e in events)

    def outermost(e) -> bool:
        parent = e.cpu_parent
        while parent is not None:
            if parent.name in HOST_READS:
                return False
            parent = parent.cpu_parent
        return True

    reads = sum(e.name in HOST_READS and outermost(e) for e in events)
    return calls, reads


def _ops_table(args: argparse.Namespace, device: torch.device) -> None:
    """Aten calls, host reads and median time of one forward+backward per N and case (CLIP;
    MGLL at G = 1, 2, 3 with distinct texts; G = 3 with a shared coarse level)."""
    print(
        f"device: {device}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"D = {args.dim}, medians of {args.repeats} alternating runs, "
        f"load average {os.getloadavg()[0]:.1f}\n"
    )
    print(
        "| N | loss | G | texts | aten calls | host reads | fwd+bwd (ms) | x CLIP (paired median) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        batches = {
            "distinct": _batch(n, args.dim, 3, device),
            "shared": _batch(n, args.dim, 3, device, shared=True),
        }
        cases = {"CLIP": (CLIPLoss(), 1, "distinct")}
        cases |= {f"MGLL{g}": (MGLLLoss(), g, "distinct") for g in (1, 2, 3)}
        cases["MGLL3 shared"] = (MGLLLoss(), 3, "shared")
        times = _time_cases(cases, batches, args.repeats, device)  # warms up too
        for name, (loss_fn, g, batch) in cases.items():
            image, texts, labels = batches[batch]
            calls, reads = _op_counts(loss_fn, image, texts[:g], labels[:g], device)
            seconds, ratio = times[name][:2]
            print(
                f"| {n} | {name[:4]} | {g} | {batch} | {calls} | {reads} | "
                f"{seconds * 1e3:.2f} | {ratio:.2f} |",
                flush=True,
            )
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


BUDGET = 16 * 2**30
"""The memory the "largest N" column fits the loss into (a 16 GiB accelerator)."""


def _memory_child(n: int, levels: int, chunk_size: int, dim: int, device: str) -> None:
    """One forward+backward in this fresh process: peak memory growth and seconds (on CUDA the
    allocator's peak; on CPU the resident memory, sampled, since CPU tensors have no
    allocator statistics)."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    image, texts, labels = _batch(n, dim, levels, dev)
    loss_fn = MGLLLoss(chunk_size=chunk_size or None)
    loss_fn(image[:64], [t[:64] for t in texts], [lab[:64] for lab in labels])  # warm up
    _sync(dev)
    done = threading.Event()
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        base = _rss()
        peak = [base]

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _rss())
                time.sleep(0.001)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    start = time.perf_counter()
    loss_fn(image, texts, labels)["loss"].backward()
    _sync(dev)
    seconds = time.perf_counter() - start
    if cuda:
        top = torch.cuda.max_memory_allocated(dev)
    else:
        done.set()
        sampler.join()
        top = peak[0]
    print(json.dumps({"peak": top - base, "seconds": seconds}))


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _tiles_table(args: argparse.Namespace) -> None:
    """Peak memory and time of MGLL (G = 2) with and without tiles, each in a fresh process."""
    cuda = args.device.startswith("cuda")
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    budget = torch.cuda.get_device_properties(0).total_memory if cuda else BUDGET
    print(
        f"{where}, torch {torch.__version__}, D = {args.dim}, G = 2, "
        f"load average {os.getloadavg()[0]:.1f}\n"
    )
    print(
        "| N | chunk_size | peak memory (MiB) | x untiled | fwd+bwd (s) | time x untiled "
        f"| largest N in {budget / 2**30:.0f} GiB (extrapolated) |"
    )
    print("|---|---|---|---|---|---|---|")
    for n in args.tile_sizes:
        base = None
        for chunk in (0, args.chunk_size):
            cmd = [sys.executable, __file__, "--memory-child", str(n), "2", str(chunk)]
            cmd += ["--dim", str(args.dim), "--device", args.device]
            cmd += ["--threads", str(args.threads)] if args.threads else []
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            peak, seconds = result["peak"], result["seconds"]
            base = base or (peak, seconds)
            # untiled memory grows as N^2; tiled as chunk_size x N (the tiles) plus O(N D)
            largest = (
                int((budget / (peak / n**2)) ** 0.5) if not chunk else int(budget / (peak / n))
            )
            print(
                f"| {n} | {chunk or 'none'} | {peak / 2**20:.0f} | {peak / base[0]:.2f} | "
                f"{seconds:.2f} | {seconds / base[1]:.2f} | {largest} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
