"""File writing shared by checkpoints, exports, mask caches and heatmaps."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np


def atomic_write(target: Path, write: Callable[[Path], object]) -> None:
    """Create ``target`` through ``write(temporary path)``, flushed to disk, then renamed:
    readers (and a resumed run after a crash) see the old file or the new one, never a part.

    The file gets the usual permissions for new files (0666 minus the umask); some writers
    (safetensors) create owner-only files, which colleagues on a cluster could not read.
    """
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        mode = _create_with_usual_mode(tmp)
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (shards, weights files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_npy(path: Path, array: np.ndarray) -> None:
    """Write ``array`` as .npy at exactly ``path`` (np.save would append a suffix to a name);
    pass it to :func:`atomic_write` for a file that is never seen half-written."""
    with open(path, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


def give_usual_modes(folder: Path) -> None:
    """Give every file under ``folder`` the mode a new file gets there (0666 minus the umask):
    a folder written by a library (``save_pretrained``'s owner-only safetensors) reads like
    the rest of a user's files."""
    probe = folder / f".mode-probe{os.getpid()}"
    try:
        mode = _create_with_usual_mode(probe)
    finally:
        probe.unlink(missing_ok=True)
    for path in folder.rglob("*"):
        if path.is_file():
            os.chmod(path, mode)


def _create_with_usual_mode(path: Path) -> int:
    """Create ``path`` empty with 0666, which the kernel cuts by the umask, and return the mode
    it got (reading the umask any other way means changing it, for the whole process)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666))
    return os.stat(path).st_mode & 0o777
