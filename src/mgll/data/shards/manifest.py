"""The shard format's names and manifest, and where a corpus's shards are (``data.path``:
a folder, the manifest itself, a brace pattern of shards, a URL or a ``pipe:`` command)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mgll.data.spec import resolve_path
from mgll.errors import DataError

MANIFEST = "manifest.json"
SPLIT_FILE = "split.csv"  # image, source, patient_id, split of every record (data split's CSV)
FORMAT = "mgll-shards"
VERSION = 1
IMAGE_FORMATS = ("npy", "png")
_BRACED = re.compile(r"[^/\s]*\{[^}]*\}[^/\s]*")  # the path component holding a brace pattern


class ShardError(DataError):
    """Shards that cannot be written or read as asked; the message names the file and the fix."""


@dataclass(frozen=True)
class ShardFile:
    """One shard of a split: where it is and what the manifest says about it."""

    name: str
    url: str
    samples: int
    local: bool


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


def open_url(url: str, local: bool):  # type: ignore[no-untyped-def]
    """A binary handle on a local shard file or a URL (webdataset's ``gopen``)."""
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
        with open_url(where, location.local) as handle:
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
