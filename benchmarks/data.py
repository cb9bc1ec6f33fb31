"""Epoch time of the chest X-ray data pipeline: preprocessing cache, and shards vs warm cache.

Reads the real covid-cxr images (../shared/data/covid-cxr, or --data-root), builds the train
transform of ``build_datasets`` and times full passes of a DataLoader:

- no cache: every epoch decodes and resizes every image;
- cache, cold: the first epoch decodes, resizes and writes the cache entries;
- cache, warm: later epochs (and later runs) read the stored uint8 arrays.

``--parts shards`` compares the trainer's two training paths over the same images, with the
train transform and 2 loader workers (``--shard-workers``), repeats interleaved, medians shown:

- file dataset, warm cache: ``GlobalBatchSampler`` + ``SeededSamples`` over the cached arrays;
- shards: ``mgll data shard`` output (npy and png members) through ``ShardSplit.batches``;

and the peak memory (VmHWM) of a loader worker over one epoch with the corpus listed 2x and 8x
(the same images, so only the corpus length changes; both past the shuffle buffer).

Prints Markdown tables; nothing is asserted. Example:

    python benchmarks/data.py --image-size 224 --workers 0 2 --epochs 3
    python benchmarks/data.py --parts shards --repeats 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset

from mgll.data import (
    CLIP_MEAN,
    CLIP_STD,
    MultiGranularDataset,
    build_datasets,
    build_transform,
    collate_samples,
    prepare_data,
)
from mgll.data.shards import ShardSplit, write_shards
from mgll.training.sampling import GlobalBatchSampler, SeededSamples


def default_data_root() -> Path:
    """$MGLL_SHARED_DATA, else ../shared/data next to the repository."""
    env = os.environ.get("MGLL_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


def epoch_seconds(
    dataset: MultiGranularDataset, workers: int, batch_size: int, epoch: int
) -> float:
    """Wall time of one full pass over ``dataset``."""
    dataset.set_epoch(epoch)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
        collate_fn=collate_samples, generator=torch.Generator().manual_seed(epoch),
    )  # fmt: skip
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def dataset_for(
    data_root: Path, image_size: int, cache_dir: Path | None, split: str
) -> MultiGranularDataset:
    """All covid-cxr images in one split: "train" (augmenting transform) or "val" (eval)."""
    cfg = {
        "source": "covid-cxr",
        "path": "covid-cxr",
        "split": {name: float(name == split) for name in ("train", "val", "test")},
        "cache_dir": str(cache_dir) if cache_dir else False,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the adapter's exclusion notes are not the point here
        datasets = build_datasets(
            cfg, data_root, image_size=image_size, mean=CLIP_MEAN, std=CLIP_STD, seed=0
        )
    return datasets[split]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=default_data_root())
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per setting (>= 2)")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="folder to hold the benchmark's caches (kept); default: a temporary folder (removed)",
    )
    parser.add_argument(
        "--parts", nargs="+", choices=["cache", "shards"], default=["cache", "shards"]
    )
    parser.add_argument("--repeats", type=int, default=3, help="shards part: interleaved repeats")
    parser.add_argument("--shard-workers", type=int, default=2, help="shards part: loader workers")
    parser.add_argument("--shard-size", type=int, default=64, help="shards part: samples/shard")
    parser.add_argument("--buffer", type=int, default=256, help="shards part: shuffle buffer")
    args = parser.parse_args()
    if not (args.data_root / "covid-cxr").is_dir():
        raise SystemExit(f"{args.data_root / 'covid-cxr'} not found; pass --data-root")
    torch.set_num_threads(1)  # one decode thread per worker, as in a data-loader process
    if "cache" in args.parts:
        cache_part(args)
    if "shards" in args.parts:
        shards_part(args)


def cache_part(args: argparse.Namespace) -> None:
    """Epoch time with no cache, a cold cache and a warm cache."""

    rows = []
    size = 0
    for workers in args.workers:
        for split in ("train", "val"):
            kind = "train (augment)" if split == "train" else "eval"
            plain = dataset_for(args.data_root, args.image_size, None, split)
            times = [epoch_seconds(plain, workers, args.batch_size, e) for e in range(args.epochs)]
            rows.append((workers, kind, "no cache", len(plain), sum(times) / len(times)))
            # A fresh folder (inside --cache-dir when given): never empty a folder the user named.
            cache_dir = Path(tempfile.mkdtemp(prefix="mgll-cache-bench-", dir=args.cache_dir))
            cached = dataset_for(args.data_root, args.image_size, cache_dir, split)
            cold = epoch_seconds(cached, workers, args.batch_size, 0)
            warm = [
                epoch_seconds(cached, workers, args.batch_size, e) for e in range(1, args.epochs)
            ]
            rows.append((workers, kind, "cache, cold (1st epoch)", len(cached), cold))
            rows.append((workers, kind, "cache, warm", len(cached), sum(warm) / len(warm)))
            size = sum(p.stat().st_size for p in cache_dir.rglob("*.npy"))
            if args.cache_dir is None:
                shutil.rmtree(cache_dir, ignore_errors=True)

    print(f"covid-cxr full pass, {args.image_size} px, batch {args.batch_size}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}")  # fmt: skip
    print(f"cache size on disk: {size / 2**20:.1f} MiB")
    print()
    print("| workers | transform | setting | images | epoch (s) | images/s |")
    print("|---|---|---|---|---|---|")
    for workers, kind, setting, n, seconds in rows:
        print(f"| {workers} | {kind} | {setting} | {n} | {seconds:.2f} | {n / seconds:.0f} |")


SCALES = (2, 8)  # corpus lengths (times the 520 images) for the worker-memory comparison


def worker_memory_mib() -> tuple[float, float]:
    """(peak VmHWM, current VmRSS) of this process in MiB (Linux /proc)."""
    found = dict.fromkeys(("VmHWM:", "VmRSS:"), float("nan"))
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(maxsplit=1)[0] if line else ""
        if key in found:
            found[key] = int(line.split()[1]) / 1024
    return found["VmHWM:"], found["VmRSS:"]


def collate_with_memory(samples):  # type: ignore[no-untyped-def]
    """collate_samples, plus the worker's peak memory (collation runs in the worker)."""
    batch = collate_samples(samples)
    batch["memory"] = worker_memory_mib()
    return batch


class WithMemory(IterableDataset):
    """A stream's batches, each carrying the peak memory of the worker that made it."""

    def __init__(self, batches: IterableDataset) -> None:
        self.batches = batches

    def __iter__(self):  # type: ignore[no-untyped-def]
        for batch in self.batches:
            batch["memory"] = worker_memory_mib()
            yield batch


def timed_pass(loader: DataLoader) -> tuple[int, float, float, float]:
    """(samples, seconds, peak worker memory, worker memory at the last batch; MiB) of one
    pass, worker start-up included."""
    start = time.perf_counter()
    samples, peak, last = 0, 0.0, 0.0
    for batch in loader:
        samples += len(batch["indices"])
        peak, last = max(peak, batch["memory"][0]), batch["memory"][1]
    return samples, time.perf_counter() - start, peak, last


def shards_part(args: argparse.Namespace) -> None:
    """Samples/s of shards vs the warm file cache, and a worker's memory vs corpus length."""
    workers, batch = args.shard_workers, args.batch_size
    load = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="mgll-shard-bench-", dir=args.cache_dir))
    cfg = {
        "source": "covid-cxr",
        "path": "covid-cxr",
        "split": {"train": 1.0, "val": 0.0, "test": 0.0},
        "cache_dir": str(work / "cache"),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_data(cfg, args.data_root, seed=0)
    norm = {"image_size": args.image_size, "mean": CLIP_MEAN, "std": CLIP_STD}
    files = prepared.datasets(**norm)["train"]
    plain = build_transform(train=False, mean=CLIP_MEAN, std=CLIP_STD)
    files_eval = MultiGranularDataset(files.record_set, image_size=args.image_size,
                                      transform=plain, cache=files.cache)  # fmt: skip
    written = {}
    for fmt in ("npy", "png"):
        start = time.perf_counter()
        write_shards(prepared, work / fmt, image_size=args.image_size, shard_size=args.shard_size,
                     image_format=fmt, workers=2, log=lambda _: None)  # fmt: skip
        seconds = time.perf_counter() - start
        size = sum(p.stat().st_size for p in (work / fmt).glob("*.tar"))
        written[fmt] = (seconds, size)
    streams = {}
    for fmt in ("npy", "png"):
        shard_cfg = {"source": "shards", "path": str(work / fmt), "shuffle_buffer": args.buffer}
        streams[fmt] = prepare_data(shard_cfg, None, 0).datasets(**norm)["train"]
    eval_stream = ShardSplit(streams["npy"].shards, streams["npy"].levels,
                             image_size=args.image_size, transform=plain,
                             shuffle_buffer=args.buffer)  # fmt: skip

    def file_loader(dataset, epoch: int) -> DataLoader:  # type: ignore[no-untyped-def]
        sampler = GlobalBatchSampler(len(dataset), batch, seed=0)
        sampler.set_epoch(epoch)
        return DataLoader(SeededSamples(dataset), batch_sampler=sampler, num_workers=workers,
                          collate_fn=collate_with_memory)  # fmt: skip

    def shard_loader(split, epoch: int) -> DataLoader:  # type: ignore[no-untyped-def]
        plan = split.batches(batch, workers=workers)
        plan.set_epoch(epoch)
        return DataLoader(WithMemory(plan), batch_size=None, num_workers=workers)

    timed_pass(file_loader(files, 0))  # warms the cache
    settings = {
        "train transform: file dataset, warm cache": lambda e: file_loader(files, e),
        "train transform: shards (npy members)": lambda e: shard_loader(streams["npy"], e),
        "train transform: shards (png members)": lambda e: shard_loader(streams["png"], e),
        "eval transform: file dataset, warm cache": lambda e: file_loader(files_eval, e),
        "eval transform: shards (npy members)": lambda e: shard_loader(eval_stream, e),
    }
    rates: dict[str, list[float]] = {name: [] for name in settings}
    memory: dict[str, float] = {}
    for repeat in range(args.repeats):  # interleaved: load changes hit every setting alike
        for name, make in settings.items():
            samples, seconds, peak, _ = timed_pass(make(repeat + 1))
            rates[name].append(samples / seconds)
            memory[name] = max(memory.get(name, 0.0), peak)

    # Worker memory with the corpus listed 2x and 8x (same images: only the length grows),
    # eval transform (faster; memory is the point).
    grown = {}
    for scale in SCALES:
        many = files.record_set.subset(list(range(len(files))) * scale)
        bigger = MultiGranularDataset(many, image_size=args.image_size, transform=plain,
                                      cache=files.cache)  # fmt: skip
        grown[("file dataset, warm cache", scale)] = timed_pass(file_loader(bigger, 1))[2:]
        longer = ShardSplit(eval_stream.shards * scale, eval_stream.levels,
                            image_size=args.image_size, transform=plain,
                            shuffle_buffer=args.buffer)  # fmt: skip
        grown[("shards (npy members)", scale)] = timed_pass(shard_loader(longer, 1))[2:]
    if args.cache_dir is None:
        shutil.rmtree(work, ignore_errors=True)

    print(f"covid-cxr train transform, {args.image_size} px, batch {batch}, {workers} loader "
          f"workers, {args.repeats} interleaved repeats (median), shards of {args.shard_size}, "
          f"shuffle buffer {args.buffer}, {os.cpu_count()} CPUs, "
          f"load average at start {load:.1f}, at end {os.getloadavg()[0]:.1f}")  # fmt: skip
    for fmt, (seconds, size) in written.items():
        print(f"mgll data shard ({fmt}): {len(files)} images in {seconds:.1f} s, "
              f"{size / 2**20:.1f} MiB")  # fmt: skip
    print()
    print("| setting | samples/s (median) | all repeats | worker peak MiB |")
    print("|---|---|---|---|")
    for name, values in rates.items():
        shown = ", ".join(f"{v:.0f}" for v in values)
        print(f"| {name} | {statistics.median(values):.0f} | {shown} | {memory[name]:.0f} |")
    print()
    a, b = SCALES
    print(f"| setting | worker MiB at the end, {a}x | {b}x | worker peak MiB, {a}x | {b}x |")
    print("|---|---|---|---|---|")
    for name in ("file dataset, warm cache", "shards (npy members)"):
        (pa, la), (pb, lb) = grown[(name, a)], grown[(name, b)]
        print(f"| {name} | {la:.0f} | {lb:.0f} | {pa:.0f} | {pb:.0f} |")


if __name__ == "__main__":
    main()
