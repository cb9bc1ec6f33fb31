"""Reading shards: :class:`ShardSplit` (a split's samples, the data contract's items) and
:class:`ShardBatches` (one rank's batches of an epoch). :meth:`ShardSplit.batches` plans an
epoch for one rank of W and K loader workers:

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
replaced by the next sample of the stream. Remote shards (``https://``, ``pipe:aws s3 cp ...
-``) are opened through webdataset's ``gopen``; see docs/data.md.
"""

from __future__ import annotations

import json
import tarfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from mgll.data.dataset import collate_samples, draw_texts, label_entry
from mgll.data.images import ImageLoadError, decode_image_bytes
from mgll.data.records import LevelInfo
from mgll.data.shards.manifest import IMAGE_FORMATS, ShardError, ShardFile, open_url
from mgll.seeding import sample_seed, seeded


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
            open_url(shard.url, shard.local) as handle,
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
