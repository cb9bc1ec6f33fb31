"""Epoch time of the chest X-ray data pipeline with and without the preprocessing cache.

Reads the real covid-cxr images (../shared/data/covid-cxr, or --data-root), builds the train
transform of ``build_datasets`` and times full passes of a DataLoader:

- no cache: every epoch decodes and resizes every image;
- cache, cold: the first epoch decodes, resizes and writes the cache entries;
- cache, warm: later epochs (and later runs) read the stored uint8 arrays.

Prints a Markdown table; nothing is asserted. Example:

    python benchmarks/data.py --image-size 224 --workers 0 2 --epochs 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from mgll.data import CLIP_MEAN, CLIP_STD, MultiGranularDataset, build_datasets, collate_samples


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
    args = parser.parse_args()
    if not (args.data_root / "covid-cxr").is_dir():
        raise SystemExit(f"{args.data_root / 'covid-cxr'} not found; pass --data-root")
    torch.set_num_threads(1)  # one decode thread per worker, as in a data-loader process

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


if __name__ == "__main__":
    main()
