"""Preprocessing cache: decode and resize each image once, reuse it across epochs and runs.

Entries are uint8 ``.npy`` files keyed by the source's absolute path, modification time, size,
the target size and the resize mode. Editing or replacing a source file changes its key, so the
stale entry is simply never read again and a fresh one is written: no manual invalidation.
Writes go to a temporary file renamed into place, so parallel data-loader workers (or two runs
sharing a cache) never read a half-written entry.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from mgll.data.images import ImageLoadError, load_image

# Bump when the stored pixels would change for the same key (decoder or resize changes).
CACHE_VERSION = 2  # 2: DICOM windows map onto 0..255; 8-bit colour DICOM kept as stored
RESIZE_MODES = ("crop", "pad", "stretch")


def check_resize_mode(mode: str) -> str:
    """``mode`` when it is one of :data:`RESIZE_MODES` (ValueError naming data.resize if not)."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"data.resize: unknown mode {mode!r}; use one of {RESIZE_MODES}")
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
        return self.cache_dir / key[:2] / f"{key}.npy"

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
        tmp = None
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=entry.parent, suffix=".tmp")
            with os.fdopen(fd, "wb") as handle:
                np.save(handle, array, allow_pickle=False)
            os.replace(tmp, entry)
        except OSError as exc:
            # The image itself is fine; only caching failed, so train on without writing more
            # (one warning, not one per image).
            self.writable = False
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)  # a disk-full write leaves a partial temporary file
            warnings.warn(
                f"cannot write the preprocessing cache {self.cache_dir} ({exc}); continuing "
                "without writing to it; set data.cache_dir to a writable folder, or false",
                stacklevel=3,
            )


def user_cache_dir() -> Path:
    """The per-user cache root: ``$MGLL_CACHE_DIR``, else ``$XDG_CACHE_HOME/mgll``, else
    ``~/.cache/mgll``."""
    if os.environ.get("MGLL_CACHE_DIR"):
        return Path(os.environ["MGLL_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mgll"


def _writable(folder: Path) -> bool:
    """True when ``folder`` exists and is writable, or can be created."""
    for parent in (folder, *folder.parents):
        if parent.exists():
            return parent.is_dir() and os.access(parent, os.W_OK)
    return False


def default_cache_dir(dataset_dir: Path) -> Path | None:
    """``<user cache>/preprocess``, or None when it cannot be written.

    Never the dataset folder: data folders are read, never written (a root process would
    otherwise pass a write-permission check on a read-only shared folder).
    """
    shared = user_cache_dir() / "preprocess"  # keys hold absolute paths, so sharing is safe
    return shared if _writable(shared) else None
