"""Writing shards (``mgll data shard``, :func:`write_shards`): a corpus preprocessed once into
WebDataset tar files.

The records of a ``data:`` section (one dataset, a spec, or a pool: whatever
:func:`mgll.data.prepare_data` reads), split as it splits them, each image decoded and resized
once (:func:`mgll.data.cache.load_resized`, what the preprocessing cache stores) and stored
beside a JSON of its per-level candidate texts and label ids. Shards are named
``<split>-<number>.tar``; ``manifest.json`` lists the levels, counts, sources, preprocessing
settings and every shard's size and SHA-256. Tar headers are fixed (mtime 0, uid/gid 0, no user
names, members in sample order), so a re-run writes the same bytes; an interrupted run resumes,
keeping the shards whose checksum the manifest already holds.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mgll.data.cache import CACHE_VERSION, load_resized
from mgll.data.dataset import encode_labels
from mgll.data.images import ImageLoadError
from mgll.data.records import LevelInfo
from mgll.data.shards.manifest import (
    FORMAT,
    IMAGE_FORMATS,
    MANIFEST,
    SPLIT_FILE,
    VERSION,
    ShardError,
)
from mgll.data.splits import SPLIT_NAMES
from mgll.io import atomic_write, file_sha256
from mgll.schema import to_dict


def _fixed_tarinfo(name: str, size: int) -> tarfile.TarInfo:
    """A tar header that depends on the name and size only (byte-identical re-runs)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def encode_image(pixels: np.ndarray, image_format: str) -> bytes:
    """The bytes a shard stores for a preprocessed (size, size, 3) uint8 image."""
    buffer = io.BytesIO()
    if image_format == "npy":
        np.save(buffer, np.ascontiguousarray(pixels), allow_pickle=False)
    else:
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


@dataclass
class _Planned:
    """One shard to write: its name and the record indices (into the prepared records)."""

    split: str
    name: str
    records: list[int]


def _relative(image: Path, folder: Path) -> str:
    try:
        return Path(image).resolve().relative_to(folder.resolve()).as_posix()
    except ValueError:
        return str(image)


@dataclass
class _Corpus:
    """What a shard stores of each record: its position in its split, its label ids, its
    image path relative to the dataset folder."""

    prepared: Any  # mgll.data.PreparedData
    folder: Path
    levels: list[LevelInfo]
    label_ids: list[list[Any]]
    position: dict[int, int]

    @classmethod
    def of(cls, prepared: Any) -> _Corpus:
        """The corpus of a :class:`mgll.data.PreparedData`."""
        records = prepared.records
        levels = list(records.levels)
        position = {i: n for split in SPLIT_NAMES for n, i in enumerate(prepared.indices[split])}
        return cls(
            prepared,
            Path(prepared.folder),
            levels,
            encode_labels(records.records, levels),
            position,
        )

    def image(self, i: int) -> Path:
        """Record ``i``'s image file."""
        return self.prepared.records.records[i].image

    def sample_json(self, i: int) -> dict[str, Any]:
        """The JSON member stored beside record ``i``'s image."""
        r = self.prepared.records.records[i]
        return {
            "index": self.position[i],
            "image": _relative(r.image, self.folder),
            "patient": r.patient_id,
            "source": self.prepared.source_name(i),
            "texts": [list(c) for c in r.texts],
            "labels": [self.label_ids[g][i] for g in range(len(self.levels))],
        }


def write_shards(
    prepared: Any,
    output_dir: str | Path,
    *,
    image_size: int = 224,
    resize: str = "crop",
    shard_size: int = 1000,
    image_format: str = "npy",
    workers: int = 4,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write the shards and manifest of ``prepared`` (a :class:`mgll.data.PreparedData`).

    Resumes an interrupted run into the same folder (shards whose SHA-256 the manifest holds
    are kept); refuses a folder holding another corpus. Returns the manifest.
    """
    _check_options(prepared, shard_size, image_size, image_format)
    output_dir = Path(output_dir)
    corpus = _Corpus.of(prepared)
    preprocessing = {
        "image_size": int(image_size),
        "resize": resize,
        "image_format": image_format,
        "cache_version": CACHE_VERSION,
    }
    plan = _plan(prepared, shard_size)
    fingerprint = _fingerprint(corpus, plan, preprocessing, shard_size)
    manifest = _existing_manifest(output_dir, fingerprint)
    if manifest is None:
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "complete": False,
            "fingerprint": fingerprint,
            "levels": [_level_dict(lv) for lv in corpus.levels],
            "preprocessing": preprocessing,
            "shard_size": shard_size,
            "data": to_dict(prepared.config),
            "shards": {},
        }
    output_dir.mkdir(parents=True, exist_ok=True)
    manifest["complete"] = False
    done: dict[str, Any] = manifest["shards"]
    kept = 0
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for item in plan:
            path = output_dir / item.name
            entry = done.get(item.name)
            if entry and path.is_file() and file_sha256(path) == entry["sha256"]:
                kept += 1
                continue
            skipped = _write_shard(path, item, corpus, pool, image_size, resize, image_format)
            done[item.name] = {
                "split": item.split,
                "samples": len(item.records) - len(skipped),
                "bytes": path.stat().st_size,
                "sha256": file_sha256(path),
                "skipped": skipped,
            }
            _save_manifest(output_dir, manifest)
            log(f"wrote {path} ({done[item.name]['samples']} samples)")
    stale = set(done) - {item.name for item in plan}
    for name in stale:  # cannot happen for one fingerprint; kept out of the manifest if it does
        del done[name]
    manifest["splits"] = _split_summary(prepared.records, prepared.indices, done, corpus.folder)
    manifest["sources"] = _source_counts(prepared, done, corpus.folder)
    prepared.write_split(output_dir / SPLIT_FILE)  # what `pretrain` copies into its run folder
    manifest["complete"] = True
    _save_manifest(output_dir, manifest)
    if kept:
        log(f"kept {kept} finished shard(s) whose checksums match the manifest")
    return manifest


def _check_options(prepared: Any, shard_size: int, image_size: int, image_format: str) -> None:
    """Refuse what shards cannot hold, before anything is written."""
    if image_size < 1:
        raise ShardError(
            f"--image-size must be a side in pixels >= 1 (the model's, e.g. 224), got {image_size}"
        )
    if shard_size < 1:
        raise ShardError(f"--shard-size must be >= 1, got {shard_size}")
    if image_format not in IMAGE_FORMATS:
        raise ShardError(f"--image-format: use one of {IMAGE_FORMATS}, got {image_format!r}")
    if prepared.sampling_weights("train") is not None:
        raise ShardError(
            "the pool weights its sources (weight/temperature), which a shard stream cannot "
            "apply: each sample is read once per epoch; remove the weights from the pool file "
            "to shard it"
        )


def _plan(prepared: Any, shard_size: int) -> list[_Planned]:
    """Every shard to write: each split's records in order, ``shard_size`` per shard."""
    plan: list[_Planned] = []
    for split in SPLIT_NAMES:
        indices = prepared.indices[split]
        for k, start in enumerate(range(0, len(indices), shard_size)):
            plan.append(
                _Planned(split, f"{split}-{k:06d}.tar", indices[start : start + shard_size])
            )
    return plan


def _fingerprint(
    corpus: _Corpus, plan: Sequence[_Planned], preprocessing: dict[str, Any], shard_size: int
) -> str:
    """SHA-256 of what the shards would hold (levels, settings, every sample and its image
    file's size): a folder with another fingerprint holds another corpus."""
    identity = hashlib.sha256()
    identity.update(json.dumps([_level_dict(lv) for lv in corpus.levels], sort_keys=True).encode())
    identity.update(json.dumps([preprocessing, shard_size], sort_keys=True).encode())
    for item in plan:
        for i in item.records:
            image = corpus.image(i)
            size = image.stat().st_size if image.exists() else -1
            entry = {"split": item.split, "size": size, **corpus.sample_json(i)}
            identity.update(json.dumps(entry, sort_keys=True).encode())
    return identity.hexdigest()


def _save_manifest(output_dir: Path, manifest: dict[str, Any]) -> None:
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    atomic_write(output_dir / MANIFEST, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _write_shard(
    path: Path,
    item: _Planned,
    corpus: _Corpus,
    pool: Executor,
    image_size: int,
    resize: str,
    image_format: str,
) -> list[str]:
    """Write one shard (atomically: never half a tar); returns its unreadable images."""
    skipped: list[str] = []

    def load(i: int) -> np.ndarray | ImageLoadError:
        try:
            return load_resized(corpus.image(i), image_size, resize)
        except ImageLoadError as exc:
            return exc

    def write(tmp: Path) -> None:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i, pixels in zip(item.records, pool.map(load, item.records), strict=True):
                if isinstance(pixels, ImageLoadError):
                    warnings.warn(f"skipping unreadable image: {pixels}", stacklevel=2)
                    skipped.append(_relative(corpus.image(i), corpus.folder))
                    continue
                key = f"{corpus.position[i]:09d}"
                meta = json.dumps(corpus.sample_json(i), sort_keys=True).encode("utf-8")
                for name, data in (
                    (f"{key}.{image_format}", encode_image(pixels, image_format)),
                    (f"{key}.json", meta),
                ):
                    tar.addfile(_fixed_tarinfo(name, len(data)), io.BytesIO(data))

    atomic_write(path, write)
    return skipped


def _level_dict(level: LevelInfo) -> dict[str, Any]:
    return {
        "name": level.name,
        "vocabulary": list(level.vocabulary),
        "multi_label": bool(level.multi_label),
    }


def _existing_manifest(output_dir: Path, fingerprint: str) -> dict[str, Any] | None:
    """The folder's manifest when it is of this corpus; None for a new or empty folder."""
    path = output_dir / MANIFEST
    if not path.is_file():
        tars = sorted(output_dir.glob("*.tar")) if output_dir.is_dir() else []
        if tars:
            raise ShardError(
                f"--output-dir {output_dir} holds tar files ({tars[0].name}, ...) but no "
                f"{MANIFEST}; choose an empty folder"
            )
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ShardError(f"{path}: unreadable manifest ({exc}); choose a new --output-dir") from exc
    if manifest.get("fingerprint") != fingerprint:
        raise ShardError(
            f"--output-dir {output_dir} holds the shards of another corpus (its {MANIFEST} "
            "differs in records, levels, preprocessing or --shard-size); choose a new "
            "--output-dir, or delete that folder to replace them"
        )
    return manifest


def _written(records: Any, indices: Sequence[int], done: Mapping[str, Any], folder: Path) -> Any:
    """The RecordSet of ``indices`` that reached a shard (unreadable images left out)."""
    skipped = {p for entry in done.values() for p in entry["skipped"]}
    return records.subset(
        [i for i in indices if _relative(records.records[i].image, folder) not in skipped]
    )


def _split_summary(
    records: Any, indices: Mapping[str, Sequence[int]], done: Mapping[str, Any], folder: Path
) -> dict[str, Any]:
    """Per split: samples, unreadable images, shard names, and label counts per level (the
    key "" counts samples missing at that level)."""
    summary: dict[str, Any] = {}
    for split in SPLIT_NAMES:
        kept = _written(records, indices[split], done, folder)
        shards = sorted(name for name, e in done.items() if e["split"] == split)
        summary[split] = {
            "samples": len(kept.records),
            "skipped": sum(len(done[n]["skipped"]) for n in shards),
            "shards": shards,
            "label_counts": [dict(sorted(c.items())) for c in kept.label_counts()],
        }
    return summary


def _source_counts(prepared: Any, done: Mapping[str, Any], folder: Path) -> dict[str, Any]:
    """Samples per source (a pool's sources, else the dataset) and split, as written."""
    records = prepared.records
    skipped = {p for entry in done.values() for p in entry["skipped"]}
    counts: dict[str, dict[str, int]] = {}
    for split in SPLIT_NAMES:
        for i in prepared.indices[split]:
            if _relative(records.records[i].image, folder) in skipped:
                continue
            name = prepared.source_name(i)
            counts.setdefault(name, dict.fromkeys(SPLIT_NAMES, 0))[split] += 1
    return counts
