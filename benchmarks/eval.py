"""Evaluation speed: feature extraction against the encoder's bare forward, and probe fitting.

1. Feature extraction on the real covid-cxr images (../shared/data, or --data-root) with a
   warm preprocessing cache: :func:`mgll.eval.features.extract_features` (data loading,
   transform, forward) against the encoder's bare forward on the same batches already in
   memory. The goal is a ratio >= 0.9 (the data path is not the bottleneck).
2. Reading cached features and fitting the linear probe (:func:`mgll.eval.probe.select_and_fit`,
   the default 7-value C grid, and one C) on N synthetic feature vectors (default 10,000).
3. Ranking a retrieval gallery (:func:`mgll.metrics.retrieval_hits`, K = 1, 5, 10) of N images x
   N distinct texts: image -> text only (what validation during pretraining asks) and both
   directions (``mgll retrieve``), against fully sorting every row (``np.argsort``, stable)
   for the image -> text ranks alone.

Prints a Markdown table; nothing is asserted. Example:

    python benchmarks/eval.py --arch mgll-vit-tiny-64 --workers 2 --n-features 10000
    python benchmarks/eval.py --parts ranking --gallery 4000
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from mgll.data.build import drop_missing_images, load_records
from mgll.eval.encoders import load_encoder
from mgll.eval.features import extract_features, image_dataset
from mgll.eval.options import EvalOptions
from mgll.eval.probe import DEFAULT_C_GRID, select_and_fit


def default_data_root() -> Path:
    """$MGLL_SHARED_DATA, else ../shared/data next to the repository."""
    env = os.environ.get("MGLL_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


def extraction(arch: str, data_root: Path, workers: int, batch_size: int) -> list[str]:
    """Rows: extract_features vs bare forward, images/s."""
    encoder = load_encoder(f"random:{arch}:0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        records, folder = load_records("covid-cxr", "covid-cxr", data_root=data_root)
        records, _ = drop_missing_images(records)
    n = len(records.records)
    options = EvalOptions(batch_size=batch_size, num_workers=workers, cache_dir=False, quiet=True)
    extract_features(encoder, records, folder, options)  # warms the image cache
    start = time.perf_counter()
    extract_features(encoder, records, folder, options)
    pipeline = time.perf_counter() - start

    dataset = image_dataset(encoder, records, folder)
    batches = [
        torch.stack([dataset[i]["image"] for i in range(s, min(s + batch_size, n))])
        for s in range(0, n, batch_size)
    ]
    with torch.no_grad():
        encoder.encode(batches[0])  # warm-up
        start = time.perf_counter()
        for batch in batches:
            encoder.encode(batch)
        bare = time.perf_counter() - start
    return [
        f"| extraction, {arch}, {n} images, batch {batch_size}, {workers} workers, warm cache "
        f"| {n / pipeline:.1f} img/s | bare forward {n / bare:.1f} img/s | ratio "
        f"{bare / pipeline:.2f} |"
    ]


def probe_fit(n: int, dim: int, classes: int) -> list[str]:
    """Rows: reading N cached vectors, fitting the probe with the C grid and with one C."""
    rng = np.random.default_rng(0)
    truth = rng.integers(0, classes, n)
    means = rng.normal(size=(classes, dim))
    features = (means[truth] + 3 * rng.normal(size=(n, dim))).astype(np.float32)
    y = np.eye(classes, dtype=int)[truth]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.npz"
        np.savez(path, features=features, unreadable=np.zeros(n, bool))
        start = time.perf_counter()
        with np.load(path) as stored:
            loaded = stored["features"]
        read_s = time.perf_counter() - start
    split = int(0.8 * n)
    x_train, x_val = loaded[:split], loaded[split:]
    names = [str(c) for c in range(classes)]
    rows = [f"| read {n} x {dim} cached features | {read_s:.3f} s | | |"]
    for grid, label in ((DEFAULT_C_GRID, f"{len(DEFAULT_C_GRID)} C values"), ((1.0,), "one C")):
        start = time.perf_counter()
        select_and_fit(x_train, y[:split], x_val, y[split:], "multiclass", names, c_grid=grid)
        rows.append(
            f"| probe fit, {split} train + {n - split} val vectors, D={dim}, {classes} classes, "
            f"{label} | {time.perf_counter() - start:.2f} s | | |"
        )
    return rows


def ranking(n: int) -> list[str]:
    """Rows: ranking an n x n gallery one and both ways, and a stable full sort of the rows."""
    from mgll.metrics import retrieval_hits

    rng = np.random.default_rng(0)
    similarity = rng.normal(size=(n, n)).astype(np.float32)
    own = np.arange(n)
    labels = np.eye(5, dtype=int)[rng.integers(0, 5, n)]
    start = time.perf_counter()
    np.argsort(-similarity, axis=1, kind="stable")
    sort_s = time.perf_counter() - start
    rows = []
    for both, label in ((False, "image -> text"), (True, "both directions")):
        start = time.perf_counter()
        retrieval_hits(similarity, own, labels, labels, (1, 5, 10), text_to_image=both)
        seconds = time.perf_counter() - start
        rows.append(
            f"| rank {n} images x {n} texts, R@K and P@K for K = 1, 5, 10, {label} | "
            f"{seconds:.2f} s | stable sort of the rows alone: {sort_s:.2f} s | |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="mgll-vit-tiny-64")
    parser.add_argument("--data-root", type=Path, default=default_data_root())
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--n-features", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--gallery", type=int, default=4000, help="images = texts ranked")
    parser.add_argument(
        "--parts", default="extraction,probe,ranking", help="comma-separated parts to run"
    )
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    torch.manual_seed(0)
    print("| what | time / speed | reference | |")
    print("|---|---|---|---|")
    rows = []
    if "extraction" in parts:
        rows += extraction(args.arch, args.data_root, args.workers, args.batch_size)
    if "probe" in parts:
        rows += probe_fit(args.n_features, args.dim, args.classes)
    if "ranking" in parts:
        rows += ranking(args.gallery)
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
