"""Throughput and peak memory of one MGLL training step next to an open_clip CLIP step.

All variants use the same towers (the ``cpu-demo`` config unless ``--config`` says otherwise),
the same batch of real chest X-rays (``--data-root``), the same precision and the same AdamW
update; they run alternately, one step each per round, in one process, so drifting machine load
hits them alike. Variants:

* ``clip``: open_clip's ``ClipLoss`` on the finest level's texts (one caption per image);
* ``clip, joined``: ``ClipLoss`` on one caption per image made of every level's text, coarse to
  fine (``loss.clip_level: joined``, what the demo compares against);
* ``mgll-2``: ``MGLLLoss`` on the coarsest and finest levels (the trainer's own step code);
* ``mgll-3``: three levels (coarsest, middle, finest);
* ``mgll-2, no dedup``: ``mgll-2`` with the model's text de-duplication switched off;
* ``mgll-3, no packing``: ``mgll-3`` with an ``hf`` tower encoding one string per row in length
  groups (the fallback of :mod:`mgll.models.packing`) instead of packed rows;
* ``clip, no token cache`` and ``mgll-3, no token cache``: every string tokenised in every step
  (``model.text.token_cache: 0``), as in a first epoch; the other variants, which repeat one
  batch, find every string's ids in the towers' token cache after the warm-up, as from the
  second epoch on (:mod:`mgll.models.token_cache`);
* ``open_clip`` (``--device cuda`` only by default): open_clip's own model and training step
  (its ``encode_text`` on 77-token captions, ``ClipLoss``), the baseline an open_clip user has.

``--profile`` adds a table of where each variant's step time goes (tokenisation, text encoder,
image tower, loss forward, optimizer update, and the rest: backward), and the padded text
tokens each step encodes. ``--compile`` wraps the model and loss in ``torch.compile``.

Peak memory: ``torch.cuda.max_memory_allocated`` on GPU; on CPU each variant runs again in a
fresh subprocess that samples its resident memory during two steps (after a first one has
allocated the optimizer state) and reports the peak growth.

    python benchmarks/train_step.py --data-root ../shared/data
    python benchmarks/train_step.py --device cuda --precision bf16 --batch-size 128 \\
        model.image.arch=ViT-B-16 model.text.type=open_clip model.text.name=null
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

VARIANTS = (
    "clip",
    "clip, joined",
    "mgll-2",
    "mgll-3",
    "mgll-2, no dedup",
    "mgll-3, no packing",
    "clip, no token cache",
    "mgll-3, no token cache",
    "open_clip",
)
CPU_VARIANTS = VARIANTS[:-1]
PHASES = ("tokenise", "text encoder", "image tower", "loss forward", "optimizer", "backward, rest")


def _levels(variant: str, num_levels: int) -> list[int]:
    if variant in ("clip", "clip, no token cache"):
        return [num_levels - 1]
    if variant.startswith("mgll-3"):
        return [0, num_levels // 2, num_levels - 1]
    return [0, num_levels - 1]


def _level_count(variant: str) -> str:
    if variant.startswith("mgll"):
        return variant.split("-")[1][0]
    return "all, joined" if variant == "clip, joined" else "1"


def build(args: argparse.Namespace) -> tuple[Any, dict[str, Any], Any]:
    """Model, one fixed training batch, and the resolved config."""
    from mgll.data import build_datasets, collate_samples
    from mgll.models import create_model
    from mgll.training.config import load_config
    from mgll.training.sampling import GlobalBatchSampler, SeededSamples

    cfg = load_config(args.config, args.overrides)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = create_model(cfg.model.resolved()).to(device)
    data = build_datasets(
        cfg.data,
        args.data_root,
        image_size=model.image_size,
        mean=model.image_mean,
        std=model.image_std,
        seed=0,
    )["train"]
    keys = next(iter(GlobalBatchSampler(len(data), args.batch_size, seed=0)))
    wrapped = SeededSamples(data)
    batch = collate_samples([wrapped[k] for k in keys])
    return model, batch, cfg


def make_step(
    variant: str,
    model: Any,
    batch: dict[str, Any],
    cfg: Any,
    args: argparse.Namespace,
) -> tuple[Callable[[], None], dict[str, Any]]:
    """A closure running one full training step (forward, loss, backward, AdamW update), and
    the objects the profiler hooks into (``model``, ``loss``, ``optimizer_step``)."""
    from open_clip.loss import ClipLoss

    from mgll.losses import MGLLLoss
    from mgll.models.token_cache import TokenCache
    from mgll.training.config import LossConfig
    from mgll.training.objective import Objective
    from mgll.training.optim import build_optimizer
    from mgll.training.step import Precision, forward_backward, optimizer_step

    device = torch.device(args.device)
    precision = Precision(args.precision, device)
    num_levels = len(batch["texts"])
    images = batch["images"].to(device)

    if variant == "open_clip":
        return _open_clip_step(model, batch, cfg, args, precision)

    optimizer = build_optimizer(model, cfg.train)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if variant == "clip, joined":
        joined = Objective.from_config(LossConfig(name="clip", clip_level="joined"), num_levels)
        texts, _ = joined.inputs(batch["texts"], batch["labels"])
    else:
        texts = [batch["texts"][g] for g in _levels(variant, num_levels)]
    labels = [batch["labels"][g].to(device) for g in _levels(variant, num_levels)]
    dedup = "no dedup" not in variant
    # Variants share the towers: each step sets the text layout it measures.
    packing = {id(t): getattr(t, "packing", False) for t in model.text_towers}
    if "no packing" in variant:
        packing = dict.fromkeys(packing, False)
    caches = {id(t): t.token_cache for t in model.text_towers}
    if "no token cache" in variant:
        caches = {key: TokenCache(size=0) for key in caches}

    def set_layout() -> None:
        model.dedup_texts = dedup
        for tower in model.text_towers:
            tower.token_cache = caches[id(tower)]
            if hasattr(tower, "packing"):
                tower.packing = packing[id(tower)]

    forward = torch.compile(model) if args.compile else model
    parts: dict[str, Any] = {
        "image": model.image_tower,
        "text": [_text_encoder(tower) for tower in model.text_towers],
        "tokenizers": list(model.text_towers),
        "optimizer_step": optimizer_step,
    }

    if variant.startswith("clip"):
        clip_loss = ClipLoss()
        parts["loss"] = clip_loss

        def step() -> None:
            set_layout()
            with precision.autocast():
                out = forward(images, texts)
            loss = clip_loss(
                F.normalize(out["image_emb"].float(), dim=-1),
                F.normalize(out["text_embs"][0].float(), dim=-1),
                out["logit_scale"].exp(),
            )
            precision.scaler.scale(loss).backward()
            parts["optimizer_step"](optimizer, precision, params, cfg.train.grad_clip)

        return step, parts

    loss_fn = MGLLLoss(chunk_size=args.chunk_size)
    parts["loss"] = loss_fn

    def step() -> None:
        set_layout()
        forward_backward(forward, loss_fn, images, texts, labels, precision, accum_steps=1, step=0)
        parts["optimizer_step"](optimizer, precision, params, cfg.train.grad_clip)

    return step, parts


def _open_clip_step(
    model: Any, batch: dict[str, Any], cfg: Any, args: argparse.Namespace, precision: Any
) -> tuple[Callable[[], None], dict[str, Any]]:
    """open_clip's own training step: its CLIP model (the image architecture with its own text
    transformer, 77-token captions of the finest level), ``ClipLoss``, AdamW (as
    ``open_clip_train``'s ``train_one_epoch`` does it)."""
    import open_clip
    from open_clip.loss import ClipLoss

    from mgll.training.optim import build_optimizer
    from mgll.training.step import optimizer_step

    device = torch.device(args.device)
    arch = cfg.model.image.arch
    clip = open_clip.create_model(arch, pretrained=None, device=device)
    tokens = open_clip.get_tokenizer(arch)(list(batch["texts"][-1])).to(device)
    images = batch["images"].to(device)
    optimizer = build_optimizer(clip, cfg.train)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    forward = torch.compile(clip) if args.compile else clip
    clip_loss = ClipLoss()

    def step() -> None:
        with precision.autocast():
            image_features, text_features, logit_scale = forward(images, tokens)
        loss = clip_loss(image_features.float(), text_features.float(), logit_scale.float())
        precision.scaler.scale(loss).backward()
        parts["optimizer_step"](optimizer, precision, params, cfg.train.grad_clip)

    parts: dict[str, Any] = {
        "image": clip.visual,
        "text": [_text_encoder(clip)],
        "tokenizers": [],  # tokenised once, outside the step, as open_clip's loader does
        "loss": clip_loss,
        "optimizer_step": optimizer_step,
    }
    return step, parts


def _text_encoder(tower: Any) -> torch.nn.Module:
    """The module that runs on the tokens: a Hugging Face encoder, or open_clip's text
    transformer (flat on CLIP, under ``.text`` on CustomTextCLIP)."""
    if hasattr(tower, "encoder"):
        return tower.encoder
    clip = getattr(tower, "clip", tower)
    return getattr(clip, "text", None) or clip.transformer


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class PhaseTimer:
    """Wall time of each variant's step phases, from forward hooks on the towers and the loss
    and from wrapping the tokenizer and the optimizer update; the rest of a step is its
    backward. Variants share the towers, so the hooks charge the variant that is running."""

    def __init__(self, device: str, variants: list[str]) -> None:
        self.device = device
        self.seconds = {v: dict.fromkeys(PHASES, 0.0) for v in variants}
        self.tokens = dict.fromkeys(variants, 0)  # padded text tokens the encoder ran on
        self.totals = dict.fromkeys(variants, 0.0)
        self.active = variants[0]
        self._hooked: set[int] = set()

    def _timed(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            _sync(self.device)
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            _sync(self.device)
            self.seconds[self.active][phase] += time.perf_counter() - start
            return result

        return wrapper

    def _hook_module(self, module: torch.nn.Module, phase: str, count_tokens: bool = False):
        if id(module) in self._hooked:
            return
        self._hooked.add(id(module))
        start: list[float] = []

        def pre(_module: Any, inputs: Any, kwargs: Any) -> None:
            _sync(self.device)
            start.append(time.perf_counter())
            if count_tokens:  # token ids (N, L), or open_clip's embedded tokens (N, L, width)
                ids = kwargs.get("input_ids", inputs[0] if inputs else None)
                self.tokens[self.active] += ids.shape[0] * ids.shape[1]

        def post(_module: Any, _inputs: Any, _kwargs: Any, _out: Any) -> None:
            _sync(self.device)
            self.seconds[self.active][phase] += time.perf_counter() - start.pop()

        module.register_forward_pre_hook(pre, with_kwargs=True)
        module.register_forward_hook(post, with_kwargs=True)

    def attach(self, parts: dict[str, Any]) -> None:
        """Hook into the towers, the loss and the optimizer update of one variant."""
        self._hook_module(parts["image"], "image tower")
        for encoder in parts["text"]:
            self._hook_module(encoder, "text encoder", count_tokens=True)
        for owner in parts["tokenizers"]:
            if not isinstance(owner.tokenizer, _TimedTokenizer):
                call = self._timed("tokenise", owner.tokenizer.__call__)
                owner.tokenizer = _TimedTokenizer(owner.tokenizer, call)
        self._hook_module(parts["loss"], "loss forward")
        parts["optimizer_step"] = self._timed("optimizer", parts["optimizer_step"])

    def run(self, variant: str, step: Callable[[], None]) -> None:
        """One step of ``variant``, its phases charged to it."""
        self.active = variant
        _sync(self.device)
        start = time.perf_counter()
        step()
        _sync(self.device)
        self.totals[variant] += time.perf_counter() - start


class _TimedTokenizer:
    """A tokenizer whose calls go through ``call`` (timed); every other attribute is the
    tokenizer's."""

    def __init__(self, tokenizer: Any, call: Callable[..., Any]) -> None:
        self._tokenizer = tokenizer
        self._call = call

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


def _round_order(variants: list[str], r: int) -> list[str]:
    """Round ``r``'s order: each round starts one variant later, so every variant runs in every
    slot of a round equally often (a step right after a heavier one may find colder caches)."""
    k = r % len(variants)
    return variants[k:] + variants[:k]


def measure_speed(args: argparse.Namespace) -> dict[str, list[float]]:
    model, batch, cfg = build(args)
    # Each variant keeps its own optimizer state but shares the towers, as in one process.
    steps = {v: make_step(v, model, batch, cfg, args)[0] for v in args.variants}
    for v in args.variants:
        for _ in range(args.warmup):
            steps[v]()
    times: dict[str, list[float]] = {v: [] for v in args.variants}
    for r in range(args.rounds):
        for v in _round_order(args.variants, r):
            _sync(args.device)
            start = time.perf_counter()
            steps[v]()
            _sync(args.device)
            times[v].append(time.perf_counter() - start)
    return times


def measure_profile(args: argparse.Namespace) -> PhaseTimer:
    """Phase times of every variant summed over ``--rounds`` alternating steps."""
    model, batch, cfg = build(args)
    made = {v: make_step(v, model, batch, cfg, args) for v in args.variants}
    timer = PhaseTimer(args.device, args.variants)
    for v in args.variants:
        made[v][0]()  # warm-up, before any hook: the variants share the towers
    for v in args.variants:
        timer.attach(made[v][1])
    for r in range(args.rounds):
        for v in _round_order(args.variants, r):
            timer.run(v, made[v][0])
    return timer


def measure_memory(variant: str, args: argparse.Namespace) -> float:
    """Peak memory (MiB) of a few steps of ``variant``."""
    if args.device.startswith("cuda"):
        model, batch, cfg = build(args)
        step = make_step(variant, model, batch, cfg, args)[0]
        step()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(2):
            step()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    cmd = [sys.executable, __file__, "--memory-child", variant, *_forward_args(args)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"])


def _forward_args(args: argparse.Namespace) -> list[str]:
    out = [
        "--config",
        args.config,
        "--data-root",
        args.data_root,
        "--batch-size",
        str(args.batch_size),
        "--precision",
        args.precision,
        "--device",
        args.device,
    ]
    if args.threads:
        out += ["--threads", str(args.threads)]
    if args.chunk_size:
        out += ["--chunk-size", str(args.chunk_size)]
    return out + list(args.overrides)


def _memory_child(variant: str, args: argparse.Namespace) -> None:
    model, batch, cfg = build(args)
    step = make_step(variant, model, batch, cfg, args)[0]
    step()  # optimizer state and allocator pools exist from here on
    base = _current_rss_mib()
    peak = [base]
    done = threading.Event()

    def sample() -> None:  # CPU tensors have no allocator statistics: sample the RSS
        while not done.is_set():
            peak[0] = max(peak[0], _current_rss_mib())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for _ in range(2):
        step()
    done.set()
    sampler.join()
    print(json.dumps({"peak_mib": peak[0] - base}))


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _print_profile(timer: PhaseTimer, args: argparse.Namespace) -> None:
    n = args.rounds
    print(f"\nwhere a step's time goes (mean of {n} alternating steps per variant, ms)\n")
    print("| step | padded text tokens | " + " | ".join(PHASES) + " | total |")
    print("|---|---|" + "---|" * (len(PHASES) + 1))
    for v, seconds in timer.seconds.items():
        seconds["backward, rest"] = timer.totals[v] - sum(seconds[p] for p in PHASES[:-1])
        cells = " | ".join(f"{seconds[p] / n * 1e3:.0f}" for p in PHASES)
        print(f"| {v} | {timer.tokens[v] // n} | {cells} | {timer.totals[v] / n * 1e3:.0f} |")


def _paired_ratio(ratios: list[float], resamples: int = 2000) -> str:
    """Median of the per-round ratios with a 95% percentile-bootstrap interval over rounds."""
    g = torch.Generator().manual_seed(0)
    values = torch.tensor(ratios, dtype=torch.float64)
    picks = torch.randint(len(values), (resamples, len(values)), generator=g)
    medians = values[picks].quantile(0.5, dim=1)
    low, high = torch.quantile(medians, torch.tensor([0.025, 0.975], dtype=torch.float64))
    return f"{statistics.median(ratios):.2f}x [{low:.2f}, {high:.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="cpu-demo")
    parser.add_argument("--data-root", default=os.path.join("..", "shared", "data"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (1: less noise on a busy machine)"
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=None, choices=VARIANTS)
    parser.add_argument("--chunk-size", type=int, default=None, help="MGLLLoss(chunk_size)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--profile", action="store_true", help="also print the phase table")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory runs")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_intermixed_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.variants is None:
        args.variants = list(VARIANTS if args.device.startswith("cuda") else CPU_VARIANTS)
    if args.memory_child:
        _memory_child(args.memory_child, args)
        return

    times = measure_speed(args)
    memory = {v: None for v in args.variants}
    if not args.no_memory:
        memory = {v: measure_memory(v, args) for v in args.variants}
    threads = torch.get_num_threads()
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(
        f"config {args.config} {' '.join(args.overrides)}, batch {args.batch_size}, "
        f"{args.precision}, {args.device} ({where}, {threads} threads), torch {torch.__version__}"
        f"{', compiled' if args.compile else ''}; {args.rounds} alternating rounds after "
        f"{args.warmup} warm-up; load average {os.getloadavg()[0]:.1f}\n"
    )
    baselines = [b for b in ("clip", "clip, joined") if b in times]
    print(
        "| step | levels | median s/step | samples/s | "
        + "".join(f"vs {b} (paired, 95% CI) | " for b in baselines)
        + "peak memory (MiB) |"
    )
    print("|---|---|---|---|" + "---|" * len(baselines) + "---|")
    for v in args.variants:
        med = statistics.median(times[v])
        # Per-round ratios pair each step with the baseline step of the same round, so machine
        # load that drifts between rounds cancels out.
        ratios = "".join(
            _paired_ratio([c / t for c, t in zip(times[b], times[v], strict=True)]) + " | "
            for b in baselines
        )
        mem = f"{memory[v]:.0f}" if memory[v] is not None else "-"
        print(
            f"| {v} | {_level_count(v)} | {med:.3f} | {args.batch_size / med:.1f} | {ratios}{mem} |"
        )
    if args.profile:
        _print_profile(measure_profile(args), args)


if __name__ == "__main__":
    main()
