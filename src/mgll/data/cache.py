"""Preprocessing cache: decode and resize each image once, reuse it across epochs and runs.

Entries are uint8 ``.npy`` files keyed by the source's absolute path, modification time, size,
the target size and the resize mode. Editing or replacing a source file changes its key, so the
stale entry is simply never read again and a fresh one is written: no manual invalidation.
Writes go through :func:`mgll.io.atomic_write`, so parallel data-loader workers (or two runs
sharing a cache) never read a half-written entry.

Layout under a cache root (``$MGLL_CACHE``, the platform's user cache, or ``data.cache_dir``)::

    <root>/preprocess/<dataset name>-<hash of its resolved path>/
        dataset.json                  # {"dataset": "/resolved/path/of/the/dataset"}
        224px-crop-v2/ab/<key>.npy    # one folder per image size, resize mode and cache version

so ``mgll cache info`` can show the size per dataset and ``mgll cache clear`` can remove one.
Data folders are read, never written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from mgll.data.images import ImageLoadError, load_image
from mgll.errors import DataError
from mgll.io import atomic_write

# Bump when the stored pixels would change for the same key (decoder or resize changes).
CACHE_VERSION = 2  # 2: DICOM windows map onto 0..255; 8-bit colour DICOM kept as stored
RESIZE_MODES = ("crop", "pad", "stretch")


def check_resize_mode(mode: str) -> str:
    """``mode`` when it is one of :data:`RESIZE_MODES` (ValueError naming data.resize if not)."""
    if mode not in RESIZE_MODES:
        raise DataError(f"data.resize: unknown mode {mode!r}; use one of {RESIZE_MODES}")
    return mode


def resize_square(image: np.ndarray, size: int, mode: str = "crop") -> np.ndarray:
    """Resize an RGB uint8 image to (size, size, 3).

    ``crop``: shorter side to ``size`` then centre crop (CLIP's preprocessing); ``pad``: longer
    side to ``size`` then pad with black (keeps the whole field of view); ``stretch``: ignore the
    aspect ratio.
    """
    check_resize_mode(mode)
    pil = Image.fromarray(image)
    w, h = pil.size
    if mode == "stretch":
        return np.asarray(pil.resize((size, size), Image.Resampling.BICUBIC))
    scale = size / min(w, h) if mode == "crop" else size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    pil = pil.resize((nw, nh), Image.Resampling.BICUBIC)
    if mode == "crop":
        left, top = (nw - size) // 2, (nh - size) // 2
        return np.asarray(pil.crop((left, top, left + size, top + size)))
    canvas = Image.new("RGB", (size, size))
    canvas.paste(pil, ((size - nw) // 2, (size - nh) // 2))
    return np.asarray(canvas)


def load_resized(path: str | Path, size: int, mode: str = "crop") -> np.ndarray:
    """Decode and resize without a cache (what the cache stores)."""
    return resize_square(load_image(path), size, mode)


class PreprocessCache:
    """A folder of decoded, resized images (see the module docstring).

    ``hits``/``misses`` count lookups in this process, for benchmarks and tests.
    """

    def __init__(self, cache_dir: str | Path, image_size: int, resize_mode: str = "crop") -> None:
        self.cache_dir = Path(cache_dir)
        self.image_size = int(image_size)
        self.resize_mode = check_resize_mode(resize_mode)
        self.hits = 0
        self.misses = 0
        self.writable = True  # set False after a failed write: warn once, then read only

    @property
    def settings_dir(self) -> Path:
        """The folder of this image size, resize mode and cache version."""
        return self.cache_dir / settings_name(self.image_size, self.resize_mode)

    def key(self, path: str | Path) -> str:
        """Cache key of ``path`` as it is now (raises ImageLoadError when it does not exist)."""
        path = Path(path).absolute()
        try:
            st = path.stat()
        except OSError as exc:
            raise ImageLoadError(f"{path}: cannot read file ({exc.strerror or exc})") from exc
        ident = (
            f"v{CACHE_VERSION}|{path}|{st.st_mtime_ns}|{st.st_size}|"
            f"{self.image_size}|{self.resize_mode}"
        )
        return hashlib.sha1(ident.encode("utf-8")).hexdigest()

    def entry_path(self, path: str | Path) -> Path:
        """Where the entry for ``path`` at its current version lives."""
        key = self.key(path)
        return self.settings_dir / key[:2] / f"{key}.npy"

    def load(self, path: str | Path) -> np.ndarray:
        """The resized RGB uint8 image of ``path``, from the cache when fresh, else decoded and
        stored. Decode errors propagate (nothing is cached for a broken file)."""
        entry = self.entry_path(path)
        if entry.is_file():
            try:
                array = np.load(entry, allow_pickle=False)
            except (OSError, ValueError, EOFError) as exc:
                # A damaged entry (disk full, killed writer on a non-atomic filesystem) is rebuilt;
                # an empty one raises EOFError.
                warnings.warn(
                    f"cache entry {entry} is unreadable ({exc}); rebuilding it", stacklevel=2
                )
            else:
                if array.shape == (self.image_size, self.image_size, 3) and array.dtype == np.uint8:
                    self.hits += 1
                    return array
        self.misses += 1
        array = load_resized(path, self.image_size, self.resize_mode)
        if self.writable:
            self._store(entry, array)
        return array

    def _store(self, entry: Path, array: np.ndarray) -> None:
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.save(handle, array, allow_pickle=False)

        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(entry, write)
        except OSError as exc:
            # The image itself is fine; only caching failed, so train on without writing more
            # (one warning, not one per image).
            self.writable = False
            warnings.warn(
                f"cannot write the preprocessing cache {self.cache_dir} ({exc}); continuing "
                "without writing to it; set data.cache_dir to a writable folder, or false",
                stacklevel=3,
            )


class SourceCaches:
    """The preprocessing caches of a pool's sources, as one cache: each image is read through
    the cache of the dataset folder it came from, so a pool and a single-source run of that
    dataset share entries (same folder, same keys)."""

    def __init__(self, caches: dict[str, PreprocessCache], source_of: dict[str, str]) -> None:
        sizes = {(c.image_size, c.resize_mode) for c in caches.values()}
        if len(sizes) != 1:
            raise DataError(f"the caches of a pool differ in image size or resize mode: {sizes}")
        self.caches = caches  # source name -> its cache
        self.source_of = source_of  # image path -> source name
        self.image_size, self.resize_mode = sizes.pop()

    @property
    def hits(self) -> int:
        """Lookups answered from a cache, over all sources."""
        return sum(c.hits for c in self.caches.values())

    @property
    def misses(self) -> int:
        """Lookups decoded and stored, over all sources."""
        return sum(c.misses for c in self.caches.values())

    def load(self, path: str | Path) -> np.ndarray:
        """The resized image of ``path`` from its source's cache."""
        return self.caches[self.source_of[str(path)]].load(path)


def settings_name(image_size: int, resize_mode: str) -> str:
    """Name of the folder holding the entries of one image size, resize mode and cache version."""
    return f"{int(image_size)}px-{resize_mode}-v{CACHE_VERSION}"


CACHE_ENV_VARS = ("MGLL_CACHE", "MGLL_CACHE_DIR")  # MGLL_CACHE_DIR: the older name, still read
MANIFEST = "dataset.json"


def user_cache_location() -> tuple[Path, str]:
    """The per-user cache root and where it came from (for ``mgll cache info``).

    ``$MGLL_CACHE``, else ``$MGLL_CACHE_DIR``, else the platform's user cache: ``~/Library/
    Caches/mgll`` on macOS, ``%LOCALAPPDATA%\\mgll\\Cache`` on Windows, else
    ``$XDG_CACHE_HOME/mgll`` or ``~/.cache/mgll``.
    """
    for var in CACHE_ENV_VARS:
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser(), f"${var}"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "mgll", "the user cache"
    if os.name == "nt":
        local = os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local"
        return Path(local) / "mgll" / "Cache", "the user cache"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mgll", "the user cache"


def user_cache_dir() -> Path:
    """The per-user cache root (see :func:`user_cache_location`)."""
    return user_cache_location()[0]


def _writable(folder: Path) -> bool:
    """True when ``folder`` exists and is writable, or can be created."""
    for parent in (folder, *folder.parents):
        if parent.exists():
            return parent.is_dir() and os.access(parent, os.W_OK)
    return False


def dataset_key(dataset_dir: str | Path) -> str:
    """The cache folder name of a dataset: its folder name and a hash of its resolved path."""
    resolved = Path(dataset_dir).resolve()
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", resolved.name).strip("._") or "dataset"
    digest = hashlib.sha1(str(resolved).encode("utf-8")).hexdigest()[:10]
    return f"{slug[:40]}-{digest}"


def default_cache_dir(dataset_dir: str | Path, root: str | Path | None = None) -> Path | None:
    """The cache folder of the dataset in ``dataset_dir``: ``<root>/preprocess/<dataset key>``.

    ``root`` is the cache root (``data.cache_dir``); by default the user cache, and then None
    when that cannot be written (the run goes on without a cache). Never the dataset folder
    unless ``root`` names it: data folders are read, never written. Records the dataset's path
    in ``dataset.json`` so ``mgll cache info`` can name it.
    """
    base = Path(root).expanduser() if root is not None else user_cache_dir()
    folder = base / "preprocess" / dataset_key(dataset_dir)
    if root is None and not _writable(folder):
        return None
    manifest = folder / MANIFEST
    if not manifest.is_file():
        text = json.dumps({"dataset": str(Path(dataset_dir).resolve())}, indent=2) + "\n"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write(manifest, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        except OSError:
            # An explicit root that cannot be written: PreprocessCache warns on its first write.
            return folder if root is not None else None
    return folder


@dataclass
class CachedDataset:
    """One dataset's folder in the cache: where it is, what it caches, how big it is."""

    folder: Path
    dataset: str  # the dataset's resolved path ("" when unknown)
    entries: int = 0
    bytes: int = 0
    settings: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (entries, bytes)

    @property
    def name(self) -> str:
        """The key ``mgll cache clear`` accepts (the folder name)."""
        return self.folder.name


def _usage(folder: Path) -> tuple[int, int]:
    """(number of .npy entries, bytes of all files) below ``folder``."""
    entries = size = 0
    for path in folder.rglob("*"):
        if path.is_file():
            size += path.stat().st_size
            entries += path.suffix == ".npy"
    return entries, size


def scan_cache(root: str | Path) -> list[CachedDataset]:
    """The datasets cached under the cache root ``root``, largest first.

    Entries written by versions that kept no per-dataset folders (``preprocess/ab/*.npy``) are
    listed as one pseudo-dataset with an empty ``dataset``.
    """
    preprocess = Path(root) / "preprocess"
    if not preprocess.is_dir():
        return []
    found: list[CachedDataset] = []
    legacy = CachedDataset(folder=preprocess, dataset="")
    for child in sorted(preprocess.iterdir()):
        if not child.is_dir():
            continue
        manifest = child / MANIFEST
        if manifest.is_file():
            try:
                dataset = str(json.loads(manifest.read_text(encoding="utf-8"))["dataset"])
            except (OSError, ValueError, KeyError, TypeError):
                dataset = ""
            item = CachedDataset(folder=child, dataset=dataset)
            for settings in sorted(p for p in child.iterdir() if p.is_dir()):
                item.settings[settings.name] = _usage(settings)
            item.entries, item.bytes = _usage(child)
            found.append(item)
        elif re.fullmatch(r"[0-9a-f]{2}", child.name):
            entries, size = _usage(child)
            legacy.entries += entries
            legacy.bytes += size
    if legacy.entries or legacy.bytes:
        found.append(legacy)
    return sorted(found, key=lambda d: (-d.bytes, d.name))


def remove_cached(item: CachedDataset) -> None:
    """Delete one dataset's cache folder (or the old un-keyed entries)."""
    if item.dataset or (item.folder / MANIFEST).is_file():
        shutil.rmtree(item.folder)
        return
    for child in item.folder.iterdir():
        if child.is_dir() and re.fullmatch(r"[0-9a-f]{2}", child.name):
            shutil.rmtree(child)
