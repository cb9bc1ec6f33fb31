"""Patient-level train/val/test splits: every image of a patient lands in the same split.

Patients are shuffled with a fixed seed and assigned in that order, filling train, then val,
then test up to their share of *images* (not patients), so splits have the requested sizes
even when some patients have many images. Records without a patient id are their own patient.

With ``link_identical`` the patients of byte-identical image files are also kept together:
public sets sometimes hold the same photo under two patient names (CSDI does), which would
otherwise leak a test image into training.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mgll.data.records import Record
from mgll.errors import DataError
from mgll.io import atomic_write

SPLIT_NAMES = ("train", "val", "test")


def split_fractions(cfg: Mapping[str, float] | None) -> dict[str, float]:
    """Validated split fractions (defaults 0.8/0.1/0.1); they must be >= 0 and sum to 1."""
    cfg = dict(cfg or {})
    fractions = {
        name: float(cfg.get(name, default))
        for name, default in zip(SPLIT_NAMES, (0.8, 0.1, 0.1), strict=True)
    }
    if any(v < 0 for v in fractions.values()) or abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise DataError(
            f"data.split: fractions {fractions} must be non-negative and sum to 1; "
            "e.g. {train: 0.8, val: 0.1, test: 0.1}"
        )
    return fractions


def patient_key(record: Record) -> str:
    """The grouping key of a record: its patient id, or its image path when it has none."""
    return (
        f"patient:{record.patient_id}"
        if record.patient_id not in (None, "")
        else f"image:{record.image}"
    )


def file_digest(path: str | Path) -> str | None:
    """SHA-1 of a file's bytes, or None when it cannot be read."""
    digest = hashlib.sha1()
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def identical_file_groups(paths: Sequence[str | Path]) -> list[list[int]]:
    """Indices of ``paths`` grouped by identical bytes (groups of two or more, in path order).

    Only files sharing their size with another are hashed, so a pool of mostly distinct photos
    costs one ``stat`` per file; the same path listed twice counts as identical. Unreadable
    files are left out.
    """
    by_size: dict[int, list[int]] = {}
    for i, path in enumerate(paths):
        try:
            by_size.setdefault(os.stat(path).st_size, []).append(i)
        except OSError:
            continue
    by_digest: dict[str, list[int]] = {}
    for members in by_size.values():
        if len(members) < 2:
            continue
        for i in members:
            digest = file_digest(paths[i])
            if digest is not None:
                by_digest.setdefault(digest, []).append(i)
    return sorted(sorted(g) for g in by_digest.values() if len(g) > 1)


def linked_patient_keys(
    records: Sequence[Record], groups: Sequence[Sequence[int]] | None = None
) -> list[str]:
    """Per record, a group key joining patients that share a byte-identical image file
    (``groups``: :func:`identical_file_groups` of the records' images, when known)."""
    parent: dict[str, str] = {}

    def find(key: str) -> str:
        while parent.setdefault(key, key) != key:
            parent[key] = parent[parent[key]]  # path halving keeps the chains short
            key = parent[key]
        return key

    keys = [patient_key(r) for r in records]
    if groups is None:
        groups = identical_file_groups([r.image for r in records])
    for group in groups:
        for i in group[1:]:
            a, b = find(keys[group[0]]), find(keys[i])
            if a != b:
                parent[max(a, b)] = min(a, b)  # the smaller key represents, independent of order
    return [find(k) for k in keys]


def patient_split(
    records: Sequence[Record],
    fractions: Mapping[str, float] | None = None,
    seed: int = 0,
    *,
    link_identical: bool = False,
) -> dict[str, list[int]]:
    """Record indices per split (train/val/test); no patient appears in two splits (nor, with
    ``link_identical``, two identical image files)."""
    fractions = split_fractions(fractions)
    keys = linked_patient_keys(records) if link_identical else [patient_key(r) for r in records]
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    patients = sorted(groups)  # sorted first so the shuffle does not depend on row order
    order = np.random.default_rng(seed).permutation(len(patients))
    total = len(records)
    bounds = np.cumsum([fractions[name] * total for name in SPLIT_NAMES])
    result: dict[str, list[int]] = {name: [] for name in SPLIT_NAMES}
    assigned = 0
    for p in order:
        members = groups[patients[p]]
        # A patient goes to the first split whose image quota its midpoint falls under.
        midpoint = assigned + len(members) / 2.0
        k = int(np.searchsorted(bounds, midpoint, side="right"))
        k = min(k, len(SPLIT_NAMES) - 1)
        while fractions[SPLIT_NAMES[k]] == 0 and k > 0:
            k -= 1
        result[SPLIT_NAMES[k]].extend(members)
        assigned += len(members)
    return {name: sorted(idx) for name, idx in result.items()}


def _image_key(record: Record, root: Path | None) -> str:
    """The image as written in split files: relative to the dataset folder when inside it, so a
    split survives moving the data."""
    image = Path(record.image)
    if root is not None and image.is_relative_to(root):
        return image.relative_to(root).as_posix()
    return str(image)  # outside the dataset folder: the full path is the only stable name


def write_split_file(
    path: str | Path,
    records: Sequence[Record],
    split: Mapping[str, Sequence[int]],
    root: str | Path | None = None,
    sources: Sequence[str] | None = None,
) -> None:
    """Write a CSV with columns image, patient_id, split (one row per record), and source
    after image when ``sources`` (one name per record) is given; images are written relative
    to ``root`` (the dataset folder) when given."""
    base = Path(root) if root is not None else None
    which = {i: name for name, idx in split.items() for i in idx}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            source_column = ["source"] if sources is not None else []
            writer.writerow(["image", *source_column, "patient_id", "split"])
            for i, r in enumerate(records):
                source = [sources[i]] if sources is not None else []
                writer.writerow(
                    [_image_key(r, base), *source, r.patient_id or "", which.get(i, "")]
                )

    atomic_write(path, write)  # an interrupted write never leaves half a split behind


def read_split_file(
    path: str | Path, records: Sequence[Record], root: str | Path | None = None
) -> dict[str, list[int]]:
    """Record indices per split from a file written by :func:`write_split_file` (with the same
    ``root``).

    Records are matched on the image path, as written or else resolved (a pool run's file names
    images by absolute path, e.g. ``/repo/../data/x.png``, which must still match the dataset
    opened as ``/data``); a record absent from the file is an error (the file is stale), and so
    is a patient listed in two splits.
    """
    path = Path(path)
    try:
        handle = path.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise DataError(f"data.split.file: cannot read {path} ({exc.strerror or exc})") from exc
    with handle:
        reader = csv.DictReader(handle)
        missing = {"image", "split"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(
                f"{path}: split file lacks column(s) {sorted(missing)}; "
                "write it with `mgll data split`"
            )
        assignment: dict[str, str] = {}
        for row_number, row in enumerate(reader, start=1):
            name = row["split"].strip()
            if name not in SPLIT_NAMES and name != "":
                raise DataError(
                    f"{path} row {row_number}: split {name!r} is not one of {SPLIT_NAMES}"
                )
            assignment[row["image"]] = name
    result: dict[str, list[int]] = {name: [] for name in SPLIT_NAMES}
    unlisted = []
    base = Path(root) if root is not None else None
    resolved: dict[str, str] | None = None  # built only when a spelling differs
    for i, r in enumerate(records):
        name = assignment.get(_image_key(r, base), assignment.get(str(r.image)))
        if name is None:
            if resolved is None:
                resolved = {_resolved_key(image, base): s for image, s in assignment.items()}
            name = resolved.get(_resolved_key(str(r.image), base))
        if name is None:
            unlisted.append(str(r.image))
        elif name:
            result[name].append(i)
    if unlisted:
        raise DataError(
            f"{path}: {len(unlisted)} image(s) of the dataset are not in the split file "
            f"(first: {unlisted[:3]}); regenerate it with `mgll data split`"
        )
    check_disjoint_patients(records, result, source=str(path))
    return result


def _resolved_key(image: str, root: Path | None) -> str:
    """An image of a split file as one absolute path (relative ones are under ``root``)."""
    path = Path(image)
    if not path.is_absolute() and root is not None:
        path = root / path
    return str(path.resolve())


def check_disjoint_patients(
    records: Sequence[Record], split: Mapping[str, Sequence[int]], source: str = "split"
) -> None:
    """Raise ValueError naming a patient that appears in two splits."""
    seen: dict[str, str] = {}
    for name, idx in split.items():
        for i in idx:
            key = patient_key(records[i])
            other = seen.setdefault(key, name)
            if other != name:
                raise DataError(f"{source}: {key} is in both {other!r} and {name!r}")
