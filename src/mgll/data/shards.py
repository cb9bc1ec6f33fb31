"""WebDataset shards: a corpus preprocessed once into tar files, streamed by the trainer.

Writing (``mgll data shard``, :func:`write_shards`): the records of a ``data:`` section (one
dataset, a spec, or a pool: whatever :func:`mgll.data.prepare_data` reads), split as it splits
them, each image decoded and resized once (:func:`mgll.data.cache.load_resized`, what the
preprocessing cache stores) and stored beside a JSON of its per-level candidate texts and label
ids. Shards are named ``<split>-<number>.tar``; ``manifest.json`` lists the levels, counts,
sources, preprocessing settings and every shard's size and SHA-256. Tar headers are fixed
(mtime 0, uid/gid 0, no user names, members in sample order), so a re-run writes the same bytes;
an interrupted run resumes, keeping the shards whose checksum the manifest already holds.

Reading (``data.source: shards``): :class:`ShardSplit` is a ``torch`` ``IterableDataset``;
:meth:`ShardSplit.batches` plans an epoch for one rank of W and K loader workers:

- the shard list is permuted from (seed, epoch) and cut into W x K streams (stream
  ``rank * K + worker`` takes every (W K)-th shard), so ranks read disjoint shard subsets that
  together cover the corpus;
- each stream passes its samples through a shuffle buffer seeded by (seed, epoch, stream) and
  yields exactly ``q`` batches, the same ``q`` for every stream (the fewest any stream can fill),
  so every rank takes the same number of steps; the samples left over wait for the next epoch's
  permutation;
- batch ``t`` of an epoch comes from worker ``t mod K`` (the DataLoader's round robin), so a run
  resumed at step ``s`` starts its workers at stream ``(s + i) mod K`` and has each skip the
  batches it already gave: the same batches, in the same order, as an uninterrupted run;
- each sample's augmentation and text draw are seeded from (seed, epoch, index) as in the file
  dataset (:mod:`mgll.seeding`), so they do not depend on where a run was resumed.

A member that cannot be decoded is named in a warning, listed in the batch's ``skipped`` and
replaced by the next sample of the stream; a missing local shard is an error when the run
starts. Remote shards (``https://``, ``pipe:aws s3 cp ... -``) are opened through webdataset's
``gopen``; see docs/data.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from mgll.data.cache import CACHE_VERSION, load_resized
from mgll.data.config import DataConfig
from mgll.data.dataset import collate_samples, draw_texts, encode_labels, label_entry
from mgll.data.images import ImageLoadError, decode_image_bytes
from mgll.data.records import LevelInfo
from mgll.data.spec import resolve_path
from mgll.data.splits import SPLIT_NAMES
from mgll.data.transforms import augmentation_options, build_transform
from mgll.io import atomic_write
from mgll.schema import to_dict
from mgll.seeding import sample_seed, seeded

MANIFEST = "manifest.json"
SPLIT_FILE = "split.csv"  # image, source, patient_id, split of every record (data split's CSV)
FORMAT = "mgll-shards"
VERSION = 1
IMAGE_FORMATS = ("npy", "png")
_BRACED = re.compile(r"[^/\s]*\{[^}]*\}[^/\s]*")  # the path component holding a brace pattern


class ShardError(ValueError):
    """Shards that cannot be written or read as asked; the message names the file and the fix."""


# ---- writing ----------------------------------------------------------------------------------


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


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    if shard_size < 1:
        raise ShardError(f"--shard-size must be >= 1, got {shard_size}")
    if image_format not in IMAGE_FORMATS:
        raise ShardError(f"--image-format: use one of {IMAGE_FORMATS}, got {image_format!r}")
    output_dir = Path(output_dir)
    if prepared.sampling_weights("train") is not None:
        raise ShardError(
            "the pool weights its sources (weight/temperature), which a shard stream cannot "
            "apply: each sample is read once per epoch; remove the weights from the pool file "
            "to shard it"
        )
    records, folder = prepared.records, Path(prepared.folder)
    levels: list[LevelInfo] = list(records.levels)
    label_ids = encode_labels(records.records, levels)
    preprocessing = {
        "image_size": int(image_size),
        "resize": resize,
        "image_format": image_format,
        "cache_version": CACHE_VERSION,
    }
    plan: list[_Planned] = []
    for split in SPLIT_NAMES:
        indices = prepared.indices[split]
        for k, start in enumerate(range(0, len(indices), shard_size)):
            plan.append(
                _Planned(split, f"{split}-{k:06d}.tar", indices[start : start + shard_size])
            )
    position = {i: n for split in SPLIT_NAMES for n, i in enumerate(prepared.indices[split])}

    def sample_json(i: int) -> dict[str, Any]:
        r = records.records[i]
        return {
            "index": position[i],
            "image": _relative(r.image, folder),
            "patient": r.patient_id,
            "source": prepared.source_name(i),
            "texts": [list(c) for c in r.texts],
            "labels": [label_ids[g][i] for g in range(len(levels))],
        }

    identity = hashlib.sha256()
    identity.update(json.dumps([_level_dict(lv) for lv in levels], sort_keys=True).encode())
    identity.update(json.dumps([preprocessing, shard_size], sort_keys=True).encode())
    for item in plan:
        for i in item.records:
            image = records.records[i].image
            size = image.stat().st_size if image.exists() else -1
            entry = {"split": item.split, "size": size, **sample_json(i)}
            identity.update(json.dumps(entry, sort_keys=True).encode())
    fingerprint = identity.hexdigest()

    manifest_path = output_dir / MANIFEST
    manifest = _existing_manifest(output_dir, fingerprint)
    kept = 0
    if manifest is None:
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "complete": False,
            "fingerprint": fingerprint,
            "levels": [_level_dict(lv) for lv in levels],
            "preprocessing": preprocessing,
            "shard_size": shard_size,
            "data": to_dict(prepared.config),
            "shards": {},
        }
    output_dir.mkdir(parents=True, exist_ok=True)
    manifest["complete"] = False
    done: dict[str, Any] = manifest["shards"]

    def save_manifest() -> None:
        text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
        atomic_write(manifest_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def load(i: int) -> np.ndarray | ImageLoadError:
        try:
            return load_resized(records.records[i].image, image_size, resize)
        except ImageLoadError as exc:
            return exc

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for item in plan:
            path = output_dir / item.name
            entry = done.get(item.name)
            if entry and path.is_file() and file_sha256(path) == entry["sha256"]:
                kept += 1
                continue
            skipped: list[str] = []

            def write(tmp: Path, item: _Planned = item, skipped: list[str] = skipped) -> None:
                with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
                    for i, pixels in zip(item.records, pool.map(load, item.records), strict=True):
                        if isinstance(pixels, ImageLoadError):
                            warnings.warn(f"skipping unreadable image: {pixels}", stacklevel=2)
                            skipped.append(_relative(records.records[i].image, folder))
                            continue
                        key = f"{position[i]:09d}"
                        meta = json.dumps(sample_json(i), sort_keys=True).encode("utf-8")
                        for name, data in (
                            (f"{key}.{image_format}", encode_image(pixels, image_format)),
                            (f"{key}.json", meta),
                        ):
                            tar.addfile(_fixed_tarinfo(name, len(data)), io.BytesIO(data))

            atomic_write(path, write)
            done[item.name] = {
                "split": item.split,
                "samples": len(item.records) - len(skipped),
                "bytes": path.stat().st_size,
                "sha256": file_sha256(path),
                "skipped": skipped,
            }
            save_manifest()
            log(f"wrote {path} ({done[item.name]['samples']} samples)")
    stale = set(done) - {item.name for item in plan}
    for name in stale:  # cannot happen for one fingerprint; kept out of the manifest if it does
        del done[name]
    manifest["splits"] = _split_summary(records, prepared.indices, done, folder)
    manifest["sources"] = _source_counts(prepared, done, folder)
    prepared.write_split(output_dir / SPLIT_FILE)  # what `pretrain` copies into its run folder
    manifest["complete"] = True
    save_manifest()
    if kept:
        log(f"kept {kept} finished shard(s) whose checksums match the manifest")
    return manifest


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


# ---- where shards are ---------------------------------------------------------------------------


def _is_url(path: str) -> bool:
    return path.startswith("pipe:") or "://" in path


@dataclass
class ShardLocation:
    """The manifest of ``data.path`` and how to name one of its shards."""

    manifest: str  # local path or URL (webdataset's gopen: https://, pipe:...)
    selected: list[str] | None  # shard names a brace pattern picked; None = all
    local: bool

    def shard(self, name: str) -> str:
        """The path or URL of shard ``name`` (beside the manifest)."""
        if self.local:
            return str(Path(self.manifest).parent / name)
        head, _, tail = self.manifest.rpartition(MANIFEST)
        return head + name + tail


def locate_shards(path: str | Path, data_root: str | Path | None = None) -> ShardLocation:
    """Where ``data.path`` points: a folder holding ``manifest.json``, the manifest itself, or a
    brace pattern of shards (``.../train-{000000..000009}.tar``; its manifest is beside them),
    each local (relative to ``data_root``) or a URL / ``pipe:`` command."""
    text = str(path)
    selected = None
    if "{" in text:
        from braceexpand import braceexpand

        selected = list(braceexpand(_BRACED.search(text).group(0)))  # type: ignore[union-attr]
        text = _BRACED.sub(MANIFEST, text, count=1)
    if _is_url(text):
        if not text.rstrip(" -").endswith(".json"):
            if text.startswith("pipe:"):
                raise ShardError(
                    f"data.path: {text!r} names no manifest; give the command that prints "
                    f"the shards' {MANIFEST} (or a brace pattern of shards)"
                )
            text = text.rstrip("/") + "/" + MANIFEST  # a folder URL
        return ShardLocation(text, selected, local=False)
    resolved = resolve_path(text, data_root)
    if resolved.is_dir():
        resolved = resolved / MANIFEST
    return ShardLocation(str(resolved), selected, local=True)


def _open(url: str, local: bool):  # type: ignore[no-untyped-def]
    if local:
        return open(url, "rb")
    from webdataset import gopen

    return gopen(url, "rb")


def read_manifest(location: ShardLocation) -> dict[str, Any]:
    """The manifest's content, checked to be complete shards of this format."""
    where = location.manifest
    if location.local and not Path(where).is_file():
        raise ShardError(
            f"data.path: no {MANIFEST} at {where}; point data.path at the --output-dir of "
            "`mgll data shard`"
        )
    try:
        with _open(where, location.local) as handle:
            manifest = json.loads(handle.read().decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise ShardError(f"{where}: cannot read the shard manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ShardError(f"{where}: not a manifest written by `mgll data shard`")
    if manifest.get("version", 0) > VERSION:
        raise ShardError(f"{where}: written by a newer mgll (version {manifest['version']})")
    if not manifest.get("complete"):
        raise ShardError(
            f"{where}: these shards are incomplete (`mgll data shard` was interrupted); run "
            "the same command again to finish them"
        )
    return manifest


# ---- reading ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardFile:
    """One shard of a split: where it is and what the manifest says about it."""

    name: str
    url: str
    samples: int
    local: bool


@dataclass
class _Raw:
    """A sample as read from a tar: its shard, key and member bytes by extension."""

    shard: str
    key: str
    members: dict[str, bytes]


def _members(shard: ShardFile) -> Iterator[_Raw]:
    """The samples of one shard in stored order; a damaged tar ends it with a warning."""
    current: _Raw | None = None
    read = 0
    try:
        with (
            _open(shard.url, shard.local) as handle,
            tarfile.open(fileobj=handle, mode="r|") as tar,
        ):
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                if current is not None and current.key != key:
                    read += 1
                    yield current
                    current = None
                if current is None:
                    current = _Raw(shard.name, key, {})
                current.members[ext] = data
    except (OSError, tarfile.TarError, EOFError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
    else:
        if current is not None:
            read += 1
            yield current
        if read >= shard.samples:
            return
        reason = f"it ends after {read} of {shard.samples}"
    lost = max(shard.samples - read, 0)
    warnings.warn(
        f"shard {shard.url} is damaged after {read} sample(s) ({reason}); skipping its other "
        f"{lost}; write it again with `mgll data shard`",
        stacklevel=2,
    )
    yield _Raw(shard.name, f"{read:09d}+", {"damaged": str(lost).encode()})


def _shuffled(samples: Iterator[_Raw], buffer: int, rng: np.random.Generator) -> Iterator[_Raw]:
    """A shuffle buffer of ``buffer`` samples (held as bytes, decoded only when yielded)."""
    held: list[_Raw] = []
    for sample in samples:
        if len(held) < buffer:
            held.append(sample)
            continue
        j = int(rng.integers(buffer))
        held[j], sample = sample, held[j]
        yield sample
    for j in rng.permutation(len(held)):
        yield held[j]


class ShardSplit(IterableDataset):
    """The samples of one split of a shard corpus (the data contract's items).

    Iterating it yields every sample once, in stored order (epoch :attr:`epoch`'s texts and
    augmentation); training reads it through :meth:`batches`.
    """

    def __init__(
        self,
        shards: Sequence[ShardFile],
        levels: Sequence[LevelInfo],
        *,
        image_size: int,
        transform: Callable[[np.ndarray], torch.Tensor],
        seed: int = 0,
        shuffle_buffer: int = 1000,
    ) -> None:
        self.shards = list(shards)
        self.levels = list(levels)
        self.image_size = int(image_size)
        self.transform = transform
        self.seed = int(seed)
        self.shuffle_buffer = int(shuffle_buffer)
        self.epoch = 0
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return sum(s.samples for s in self.shards)

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose texts and augmentation the samples are drawn in."""
        self.epoch = int(epoch)

    def decode(self, raw: _Raw) -> tuple[np.ndarray, dict[str, Any]]:
        """Pixels and JSON of a raw sample; ImageLoadError naming shard and member if damaged."""
        where = f"{raw.shard}/{raw.key}"
        if "damaged" in raw.members:
            raise ImageLoadError(f"{where}: {raw.members['damaged'].decode()} sample(s) lost")
        image_ext = next((e for e in IMAGE_FORMATS if e in raw.members), None)
        if image_ext is None or "json" not in raw.members:
            raise ImageLoadError(
                f"{where}: has members {sorted(raw.members)}; expected an image and .json"
            )
        pixels = decode_image_bytes(raw.members[image_ext], f"{where}.{image_ext}")
        if pixels.shape != (self.image_size, self.image_size, 3):
            raise ImageLoadError(
                f"{where}.{image_ext}: shape {pixels.shape}, expected {self.image_size} px"
            )
        try:
            meta = json.loads(raw.members["json"].decode("utf-8"))
            absent = {"index", "texts", "labels"} - set(meta)
            if absent:
                raise KeyError(f"no {sorted(absent)}")
        except (ValueError, KeyError, TypeError) as exc:
            raise ImageLoadError(f"{where}.json: unreadable sample record ({exc})") from exc
        return pixels, meta

    def item(self, pixels: np.ndarray, meta: Mapping[str, Any], epoch: int) -> dict[str, Any]:
        """The contract's item for a decoded sample, drawn as the file dataset draws it."""
        index = int(meta["index"])
        with seeded(sample_seed(self.seed, epoch, index)):
            image = self.transform(pixels)
        return {
            "image": image,
            "texts": draw_texts(meta["texts"], self.seed, epoch, index),
            "labels": [
                label_entry(v, lv) for v, lv in zip(meta["labels"], self.levels, strict=True)
            ],
            "index": index,
            "skipped": [],
        }

    def readable(
        self, raws: Iterator[_Raw], skipped: list[str]
    ) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
        """Decoded samples of ``raws``; damaged ones are warned about (once per process) and
        their names appended to ``skipped``."""
        for raw in raws:
            try:
                yield self.decode(raw)
            except ImageLoadError as exc:
                name = f"{raw.shard}/{raw.key}"
                skipped.append(name)
                if name not in self._warned:
                    self._warned.add(name)
                    warnings.warn(f"skipping unreadable shard member: {exc}", stacklevel=2)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        skipped: list[str] = []
        raws = (raw for shard in self.shards for raw in _members(shard))
        for pixels, meta in self.readable(raws, skipped):
            item = self.item(pixels, meta, self.epoch)
            item["skipped"], skipped[:] = list(skipped), []
            yield item

    def batches(
        self,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        *,
        workers: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> ShardBatches:
        """This rank's batches of ``batch_size`` samples, read by ``workers`` loader workers."""
        return ShardBatches(self, batch_size, rank, world_size, max(1, workers), shuffle, drop_last)


class ShardBatches(IterableDataset):
    """One rank's batches of a :class:`ShardSplit` (see the module docstring for the plan).

    Plays the sampler's part for the trainer: ``steps_per_epoch`` and ``set_epoch(epoch,
    start_step)``. Give it to a ``DataLoader`` with ``batch_size=None``, ``num_workers=K`` and
    no persistent workers: each epoch's workers must be started with that epoch's plan.
    """

    def __init__(
        self,
        split: ShardSplit,
        batch_size: int,
        rank: int,
        world_size: int,
        workers: int,
        shuffle: bool,
        drop_last: bool,
    ) -> None:
        self.split = split
        self.batch_size = int(batch_size)
        self.rank, self.world_size, self.workers = rank, world_size, workers
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch = 0
        self.start_step = 0
        streams = world_size * workers
        if drop_last and len(split.shards) < streams:  # validation: idle workers are fine
            raise ShardError(
                f"{len(split.shards)} shard(s) cannot feed {world_size} process(es) x "
                f"{workers} loader worker(s): every worker reads whole shards; write smaller "
                "shards (mgll data shard --shard-size) or lower data.num_workers"
            )
        # The fewest batches any stream fills in any epoch: it may get the smallest shards.
        sizes = sorted(s.samples for s in split.shards)
        fewest = min(len(range(j, len(sizes), streams)) for j in range(streams))
        self.per_worker = sum(sizes[:fewest]) // self.batch_size if drop_last else 0
        if drop_last and self.per_worker == 0:
            raise ShardError(
                f"a loader worker reads {fewest} shard(s) of as few as {sum(sizes[:fewest])} "
                f"samples, less than one batch of {self.batch_size}; lower train.batch_size, "
                "data.num_workers or the number of processes, or write more samples"
            )

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch on every rank (each of the K workers gives the same number)."""
        return self.per_worker * self.workers

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch's plan and the first step to yield (for resuming)."""
        self.epoch, self.start_step = int(epoch), int(start_step)

    def __len__(self) -> int:
        if self.drop_last:
            return self.steps_per_epoch - self.start_step
        streams = self.world_size * self.workers  # every batch, the last of each stream partial
        shards = self.split.shards
        shares = (sum(s.samples for s in shards[j::streams]) for j in range(streams))
        return sum(-(-n // self.batch_size) for n in shares)

    def stream_shards(self, stream: int) -> list[ShardFile]:
        """The shards stream ``rank * K + worker`` reads this epoch, in reading order."""
        shards = self.split.shards
        order = range(len(shards))
        if self.shuffle:
            order = np.random.default_rng([self.split.seed, self.epoch, 7]).permutation(len(shards))
        return [shards[int(i)] for i in order[stream :: self.world_size * self.workers]]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        if (info.num_workers if info else 1) != self.workers:
            raise RuntimeError(
                f"ShardBatches planned for {self.workers} loader worker(s) runs under "
                f"{info.num_workers if info else 0}; give the DataLoader num_workers={self.workers}"
            )
        worker = info.id if info else 0
        role = (worker + self.start_step) % self.workers  # see the module docstring
        done = self.start_step // self.workers + int(role < self.start_step % self.workers)
        stream = self.rank * self.workers + role
        shards = self.stream_shards(stream)
        rng = np.random.default_rng([self.split.seed, self.epoch, stream, 11])
        quota = self.per_worker if self.drop_last else None
        skipped: list[str] = []
        pending: list[dict[str, Any]] = []
        given = 0  # batches of this stream, including those skipped on resume
        while quota is None or given < quota:
            raws: Iterator[_Raw] = (raw for shard in shards for raw in _members(shard))
            if self.shuffle and self.split.shuffle_buffer > 1:
                raws = _shuffled(raws, self.split.shuffle_buffer, rng)
            fresh = 0
            for pixels, meta in self.split.readable(raws, skipped):
                fresh += 1
                if given < done:  # resuming: this batch was trained on; count, don't transform
                    pending.append({})
                    if len(pending) == self.batch_size:
                        skipped.clear()  # named by the run that trained on this batch
                else:
                    item = self.split.item(pixels, meta, self.epoch)
                    item["skipped"], skipped[:] = list(skipped), []
                    pending.append(item)
                if len(pending) == self.batch_size:
                    if given >= done:
                        yield collate_samples(pending)
                    given, pending = given + 1, []
                    if quota is not None and given >= quota:
                        return
            if quota is None:
                break
            if fresh == 0:
                raise RuntimeError(f"no readable sample in shards {[s.url for s in shards]}")
            # Damaged members left this stream short of its quota: read its shards again.
        if pending and given >= done:
            yield collate_samples(pending)


# ---- the trainer's data source ------------------------------------------------------------------


@dataclass
class ShardData:
    """``data.source: shards`` as the trainer's data source (``PreparedData``'s face)."""

    config: DataConfig
    location: ShardLocation
    manifest: dict[str, Any]
    seed: int

    @property
    def levels(self) -> list[LevelInfo]:
        """The granularity levels the shards were written with, coarse to fine."""
        return [
            LevelInfo(lv["name"], list(lv["vocabulary"]), bool(lv["multi_label"]))
            for lv in self.manifest["levels"]
        ]

    def source_counts(self) -> dict[str, dict[str, int]]:
        """Samples per source and split, as the shards hold them (the run summary's)."""
        return {name: dict(c) for name, c in self.manifest.get("sources", {}).items()}

    def write_split(self, path: str | Path) -> None:
        """Copy the shards' ``split.csv`` (written by ``mgll data shard``) to ``path``."""
        source = self.location.shard(SPLIT_FILE)
        with _open(source, self.location.local) as handle:
            data = handle.read()
        atomic_write(Path(path), lambda tmp: tmp.write_bytes(data))

    def shards(self, split: str) -> list[ShardFile]:
        """The shards of ``split`` (those a brace pattern selected, if one did)."""
        entries = self.manifest["shards"]
        names = [n for n in self.manifest["splits"][split]["shards"]]
        if self.location.selected is not None:
            names = [n for n in names if n in self.location.selected]
        return [
            ShardFile(n, self.location.shard(n), int(entries[n]["samples"]), self.location.local)
            for n in names
        ]

    def datasets(
        self, *, image_size: int, mean: Sequence[float], std: Sequence[float]
    ) -> dict[str, ShardSplit]:
        """Train/val/test :class:`ShardSplit`: the train split augments, val/test do not."""
        stored = self.manifest["preprocessing"]
        if int(stored["image_size"]) != int(image_size):
            raise ShardError(
                f"data.path: the shards at {self.location.manifest} hold {stored['image_size']} "
                f"px images but the model takes {image_size} px; write shards with "
                f"`mgll data shard --image-size {image_size}`"
            )
        augmentation = augmentation_options(self.config.augmentation)
        return {
            split: ShardSplit(
                self.shards(split),
                self.levels,
                image_size=image_size,
                transform=build_transform(
                    train=split == "train", mean=mean, std=std, augmentation=augmentation
                ),
                seed=self.seed,
                shuffle_buffer=self.config.shuffle_buffer,
            )
            for split in SPLIT_NAMES
        }


def prepare_shards(cfg: DataConfig, data_root: str | Path | None, seed: int) -> ShardData:
    """Open ``data.path``'s shards: read the manifest, check local shards exist (a missing one
    is an error now, not mid-epoch) and that a brace pattern names shards it lists."""
    if cfg.path is None:
        raise ShardError("data.path: give the folder (or manifest, or shard pattern) of the shards")
    if cfg.levels is not None:
        raise ShardError(
            "data.levels: shards keep the levels they were written with; write shards from a "
            "spec or pool holding only the levels you want, and set data.levels to null"
        )
    location = locate_shards(cfg.path, data_root)
    manifest = read_manifest(location)
    listed = manifest["shards"]
    if location.selected is not None:
        unknown = [n for n in location.selected if n not in listed]
        if unknown:
            raise ShardError(
                f"data.path: {unknown[0]} is not listed in {location.manifest} "
                f"({len(unknown)} such shard(s))"
            )
    data = ShardData(cfg, location, manifest, seed)
    if location.local:
        for split in SPLIT_NAMES:
            for shard in data.shards(split):
                path = Path(shard.url)
                if not path.is_file():
                    raise ShardError(
                        f"data.path: shard {path} (listed in {location.manifest}) does not "
                        "exist; copy it back or write the shards again with `mgll data shard`"
                    )
                if path.stat().st_size != listed[shard.name]["bytes"]:
                    warnings.warn(
                        f"shard {path} has {path.stat().st_size} bytes, the manifest says "
                        f"{listed[shard.name]['bytes']}: its damaged members will be skipped; "
                        "`mgll data shard` run again rewrites it",
                        stacklevel=2,
                    )
    return data
