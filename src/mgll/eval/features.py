"""Feature extraction for frozen encoders, cached on disk.

Features of every image of a dataset are extracted once per (encoder weights, images,
preprocessing) and stored as one ``.npz`` under ``<user cache>/features`` (or ``cache_dir``):
the key hashes the encoder's weights digest, each image's absolute path, modification time and
size, the input size, resize mode, normalisation and which features (pre-projection or
projected). A second probe of the same encoder on the same data therefore reads the file
instead of running the encoder; editing an image or the weights changes the key.

Images are read through :class:`mgll.data.MultiGranularDataset` with the eval transform and the
preprocessing cache, as pretraining reads them. An image that cannot be decoded is reported in
``FeatureSet.unreadable`` and left out by the callers (never replaced by another image).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from mgll.data.cache import PreprocessCache, default_cache_dir, user_cache_dir
from mgll.data.dataset import MultiGranularDataset, collate_samples
from mgll.data.records import RecordSet
from mgll.data.transforms import build_transform
from mgll.eval.encoders import Encoder, encoder_from_model
from mgll.eval.options import DEFAULT_OPTIONS, EvalOptions
from mgll.eval.task import EvalData
from mgll.io import atomic_write
from mgll.training.step import Precision

FEATURE_CACHE_VERSION = 1


@dataclass
class FeatureSet:
    """``features`` (N, D) float32 for the N records; ``unreadable`` (N,) marks images that
    could not be decoded (their rows are zeros); ``from_cache`` says whether they were read
    from disk; ``path`` is the cache file (None without a cache)."""

    features: np.ndarray
    unreadable: np.ndarray
    from_cache: bool
    path: Path | None


def default_feature_cache() -> Path:
    """``<user cache>/features`` (``$MGLL_CACHE_DIR/features`` when that is set)."""
    return user_cache_dir() / "features"


def feature_key(
    encoder: Encoder, records: RecordSet, *, projected: bool, resize: str = "crop"
) -> str:
    """The cache key of the features of ``records`` under ``encoder`` (see module docstring)."""
    digest = hashlib.sha1()
    header = {
        "version": FEATURE_CACHE_VERSION,
        "encoder": encoder.weights_digest(),
        "image_size": encoder.image_size,
        "mean": encoder.image_mean,
        "std": encoder.image_std,
        "resize": resize,
        "projected": projected,
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    for record in records.records:
        path = Path(record.image).absolute()
        try:
            stat = path.stat()
            digest.update(f"{path}|{stat.st_mtime_ns}|{stat.st_size}\n".encode())
        except OSError:
            digest.update(f"{path}|missing\n".encode())
    return digest.hexdigest()


def _read_cache(path: Path, n: int) -> FeatureSet | None:
    try:
        with np.load(path, allow_pickle=False) as stored:
            features, unreadable = stored["features"], stored["unreadable"]
    except (OSError, ValueError, KeyError, EOFError):
        return None  # damaged entry: recompute and overwrite
    if features.shape[0] != n or unreadable.shape != (n,):
        return None
    return FeatureSet(features, unreadable.astype(bool), True, path)


def _write_cache(path: Path, features: np.ndarray, unreadable: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, features=features, unreadable=unreadable)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


def image_dataset(
    encoder: Encoder, records: RecordSet, folder: str | Path, resize: str = "crop"
) -> MultiGranularDataset:
    """The records' images, eval-transformed for ``encoder`` (its size, mean and std), read
    through the preprocessing cache of the dataset ``folder`` (as pretraining reads them)."""
    cache_dir = default_cache_dir(folder)
    cache = PreprocessCache(cache_dir, encoder.image_size, resize) if cache_dir else None
    return MultiGranularDataset(
        records,
        image_size=encoder.image_size,
        transform=build_transform(train=False, mean=encoder.image_mean, std=encoder.image_std),
        cache=cache,
        resize_mode=resize,
    )


def extract_features(
    encoder: Encoder,
    records: RecordSet,
    folder: str | Path,
    options: EvalOptions = DEFAULT_OPTIONS,
    *,
    projected: bool = False,
    resize: str = "crop",
) -> FeatureSet:
    """Features of every record's image (pre-projection unless ``projected``), from the cache
    when present. ``folder`` is the dataset's folder (its preprocessing cache);
    ``options.cache_dir``: None = :func:`default_feature_cache`, False = no cache; batch size,
    workers, precision and progress bars from ``options`` too."""
    n = len(records.records)
    path = None
    if options.cache_dir is not False:
        store = Path(options.cache_dir) if options.cache_dir else default_feature_cache()
        key = feature_key(encoder, records, projected=projected, resize=resize)
        path = store / f"{key}.npz"
        if path.is_file():
            cached = _read_cache(path, n)
            if cached is not None:
                return cached

    dataset = image_dataset(encoder, records, folder, resize=resize)
    device = encoder.device
    loader = DataLoader(
        dataset,
        batch_size=options.batch_size,
        shuffle=False,
        num_workers=options.num_workers,
        collate_fn=collate_samples,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    amp = Precision(options.precision, device)
    features: np.ndarray | None = None
    unreadable = np.zeros(n, dtype=bool)
    start = 0
    encoder.eval()
    for batch in _progress(loader, options.progress, "features"):
        images = batch["images"].to(device, non_blocking=True)
        with torch.no_grad(), amp.autocast():
            out = encoder.encode(images, projected=projected)
        out = out.float().cpu().numpy()
        if features is None:
            features = np.zeros((n, out.shape[1]), dtype=np.float32)
        requested = np.arange(start, start + len(out))
        # The dataset replaces an unreadable image by the next readable one: those rows are
        # marked unreadable and left out downstream, never silently given another's features.
        got = batch["indices"].numpy()
        replaced = got != requested
        unreadable[requested[replaced]] = True
        features[requested] = out
        features[requested[replaced]] = 0.0
        start += len(out)
    if features is None:
        features = np.zeros((0, 0), dtype=np.float32)
    if path is not None:
        _write_cache(path, features, unreadable)
    return FeatureSet(features, unreadable, False, path)


def projected_features(
    model: torch.nn.Module,
    data: EvalData,
    options: EvalOptions = DEFAULT_OPTIONS,
    *,
    name: str,
    run_config: dict[str, Any] | None = None,
) -> tuple[Encoder, FeatureSet]:
    """``model`` (an ``MGLLModel``, put in eval mode) as an encoder and its projected image
    embeddings of every record of ``data``: what zero-shot and retrieval compare texts with."""
    encoder = encoder_from_model(model.eval(), name, run_config)
    return encoder, extract_features(encoder, data.records, data.folder, options, projected=True)


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, unit="batch", leave=False, disable=None)
