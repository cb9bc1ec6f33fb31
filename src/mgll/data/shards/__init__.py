"""WebDataset shards: a corpus preprocessed once into tar files, streamed by the trainer.

- :mod:`~mgll.data.shards.manifest`: the format's names, the manifest, where shards are
  (``data.path``: a folder, a manifest, a brace pattern, a URL or ``pipe:`` command);
- :mod:`~mgll.data.shards.writer`: ``mgll data shard`` (:func:`write_shards`), byte-identical
  re-runs, resumable;
- :mod:`~mgll.data.shards.stream`: :class:`ShardSplit` and its per-rank, per-worker batch plan
  (:class:`ShardBatches`), exact on resume;
- :mod:`~mgll.data.shards.source`: ``data.source: shards`` as the trainer's data source
  (:class:`ShardData`, :func:`prepare_shards`).

Every public name is importable from ``mgll.data.shards``.
"""

from mgll.data.shards.manifest import (
    FORMAT,
    IMAGE_FORMATS,
    MANIFEST,
    SPLIT_FILE,
    VERSION,
    ShardError,
    ShardFile,
    ShardLocation,
    locate_shards,
    read_manifest,
)
from mgll.data.shards.source import ShardData, prepare_shards
from mgll.data.shards.stream import ShardBatches, ShardSplit
from mgll.data.shards.writer import encode_image, file_sha256, write_shards

__all__ = [
    "FORMAT",
    "IMAGE_FORMATS",
    "MANIFEST",
    "SPLIT_FILE",
    "VERSION",
    "ShardBatches",
    "ShardData",
    "ShardError",
    "ShardFile",
    "ShardLocation",
    "ShardSplit",
    "encode_image",
    "file_sha256",
    "locate_shards",
    "prepare_shards",
    "read_manifest",
    "write_shards",
]
