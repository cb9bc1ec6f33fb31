"""Does ``train.compile`` (torch.compile of the model) speed up a training step, and is it exact?

For each variant of ``train_step.py`` two copies of the model start from the same weights; one
runs eagerly, one through ``torch.compile``, a full training step on the same batch each (in
eval mode, so dropout draws no random numbers that eager and compiled code would draw
differently). The table gives the largest difference between the first step's gradients,
relative to the largest gradient (weights after a few AdamW steps are no measure: Adam turns a
rounding difference in a near-zero gradient into a whole step of ``lr``). Then both run
``--rounds`` more steps, alternating, and the table gives the compiled step's speed as a paired
ratio; the first compiled step's time includes compiling.

    python benchmarks/compile_step.py --data-root ../shared/data --variants clip mgll-3
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_step import CPU_VARIANTS, _paired_ratio, _sync, build, make_step


def _timed(step, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - start


def _first_step_grads(made: tuple, device: str) -> tuple[dict[str, torch.Tensor], float]:
    """Run a step's first call, keeping every gradient as the optimizer update sees it."""
    step, parts = made
    grads: dict[str, torch.Tensor] = {}
    update = parts["optimizer_step"]

    def spy(optimizer, *args, **kwargs):
        if not grads:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        grads[str(id(p))] = p.grad.detach().clone()
        return update(optimizer, *args, **kwargs)

    parts["optimizer_step"] = spy
    seconds = _timed(step, device)
    return grads, seconds


def compare(variant: str, args: argparse.Namespace) -> str:
    """One table row: the first step's gradients eager vs compiled, and the paired speed."""
    model, batch, cfg = build(args)
    model.eval()  # no dropout: eager and compiled code would draw different random numbers
    twin = copy.deepcopy(model)
    made_eager = make_step(variant, model, batch, cfg, _with(args, compile=False))
    made_compiled = make_step(variant, twin, batch, cfg, _with(args, compile=True))
    eager_grads, _ = _first_step_grads(made_eager, args.device)
    compiled_grads, compile_s = _first_step_grads(made_compiled, args.device)  # compiles
    # Same parameter order in both copies: pair them by position.
    pairs = list(zip(eager_grads.values(), compiled_grads.values(), strict=True))
    largest = max(e.abs().max().item() for e, _ in pairs)
    diff = max((e - c).abs().max().item() for e, c in pairs) / largest
    eager, compiled = made_eager[0], made_compiled[0]
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for r in range(args.rounds):
        order = ("eager", "compiled") if r % 2 == 0 else ("compiled", "eager")
        for name in order:
            times[name].append(_timed(eager if name == "eager" else compiled, args.device))
    ratio = _paired_ratio([e / c for e, c in zip(times["eager"], times["compiled"], strict=True)])
    return (
        f"| {variant} | {compile_s:.0f} | {diff:.1e} | "
        f"{statistics.median(times['eager']):.3f} | {statistics.median(times['compiled']):.3f} | "
        f"{ratio} |"
    )


def _with(args: argparse.Namespace, **changes) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **changes})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="cpu-demo")
    parser.add_argument("--data-root", default=os.path.join("..", "shared", "data"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=10, help="alternating timed steps")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--variants", nargs="+", default=["clip", "mgll-3"], choices=CPU_VARIANTS)
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_intermixed_args()
    args.chunk_size = None
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [compare(v, args) for v in args.variants]
    print(
        f"config {args.config} {' '.join(args.overrides)}, batch {args.batch_size}, "
        f"{args.precision}, {args.device} ({torch.get_num_threads()} threads), torch "
        f"{torch.__version__}; {args.rounds} alternating timed steps after the first; load "
        f"average {os.getloadavg()[0]:.1f}\n"
    )
    print(
        "| step | first step incl. compiling (s) | gradient difference (max, / largest gradient) "
        "| eager s/step | compiled s/step | compiled speed vs eager (paired, 95% CI) |"
    )
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
