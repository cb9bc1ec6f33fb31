"""Segmentation data: image/mask samples, a patient-level split and a mask cache.

A :class:`SegSample` is an image, its patient and, per class, the mask files whose union is that
class (no file = the class is absent from the image, a true negative). A mask file either marks
foreground with any non-black pixel (``value=None``, e.g. the RGBA masks of covid-cxr-seg) or
holds label values (``value=k`` selects the pixels equal to k, e.g. an index map). The formats
that produce samples are the registry of :mod:`mgll.segmentation.sources`.

Images go through the preprocessing cache of pretraining (bicubic); masks are resized with
nearest neighbour onto the same square geometry and cached beside them.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from mgll.data.cache import PreprocessCache, check_resize_mode
from mgll.data.images import ImageLoadError
from mgll.data.records import Record
from mgll.data.splits import SPLIT_NAMES, patient_split, write_split_file
from mgll.io import atomic_write, save_npy
from mgll.segmentation.samples import MaskRef, SegSample
from mgll.segmentation.samples import SegDataError as SegDataError  # re-exported
from mgll.segmentation.samples import SegSource as SegSource  # re-exported

MASK_CACHE_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Masks: reading, checking, resizing, caching


def read_mask(ref: MaskRef, image_size: tuple[int, int]) -> np.ndarray:
    """The boolean (H, W) foreground of one mask file at the image's (width, height).

    Raises :class:`MaskProblem` when unreadable, of another size than its image, or empty.
    """
    try:
        with Image.open(ref.path) as pil:
            pil.load()
            size = pil.size
            array = np.asarray(pil)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise MaskProblem("unreadable", ref.path, str(exc).splitlines()[0][:120]) from exc
    if size != image_size:
        raise MaskProblem(
            "size", ref.path, f"{size[0]}x{size[1]} vs image {image_size[0]}x{image_size[1]}"
        )
    if array.ndim == 3:
        # RGBA/LA: the alpha channel is opacity, not class; the colour channels mark the class.
        colour = array[..., :3] if array.shape[2] >= 3 else array[..., :1]
        foreground = colour.any(axis=2) if ref.value is None else (colour[..., 0] == ref.value)
    else:
        foreground = array != 0 if ref.value is None else array == ref.value
    if ref.value is None and not foreground.any():
        raise MaskProblem("empty", ref.path, "no foreground pixel")
    return foreground


class MaskProblem(Exception):
    """A mask that cannot be used: ``kind`` is unreadable, size or empty."""

    MESSAGES: ClassVar[dict[str, str]] = {
        "unreadable": "mask(s) cannot be read (their images are dropped)",
        "size": "mask(s) differ in size from their image (their images are dropped)",
        "empty": "mask(s) are empty, no foreground pixel (ignored; the class counts as absent "
        "unless another mask marks it)",
    }

    def __init__(self, kind: str, path: Path, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.kind = kind
        self.path = path


def resize_mask(mask: np.ndarray, size: int, mode: str) -> np.ndarray:
    """(H, W) bool/uint8 -> (size, size) uint8 with nearest neighbour, on the same square
    geometry as :func:`mgll.data.cache.resize_square` (crop, pad or stretch)."""
    pil = Image.fromarray(mask.astype(np.uint8) * 255)
    w, h = pil.size
    nearest = Image.Resampling.NEAREST
    if mode == "stretch":
        return (np.asarray(pil.resize((size, size), nearest)) > 0).astype(np.uint8)
    scale = size / min(w, h) if mode == "crop" else size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    pil = pil.resize((nw, nh), nearest)
    if mode == "crop":
        left, top = (nw - size) // 2, (nh - size) // 2
        pil = pil.crop((left, top, left + size, top + size))
    else:
        canvas = Image.new("L", (size, size))
        canvas.paste(pil, ((size - nw) // 2, (size - nh) // 2))
        pil = canvas
    return (np.asarray(pil) > 0).astype(np.uint8)


class MaskCache:
    """Resized (C, size, size) uint8 targets per sample, keyed by the files' paths and mtimes."""

    def __init__(self, cache_dir: Path | None, image_size: int, resize_mode: str) -> None:
        self.cache_dir = cache_dir / "seg-masks" if cache_dir is not None else None
        self.image_size = int(image_size)
        self.resize_mode = check_resize_mode(resize_mode)

    def _key(self, sample: SegSample) -> str:
        parts = [f"v{MASK_CACHE_VERSION}|{self.image_size}|{self.resize_mode}|{sample.image}"]
        for k, refs in enumerate(sample.masks):
            for ref in refs:
                st = ref.path.stat()
                parts.append(f"{k}|{ref.path.absolute()}|{ref.value}|{st.st_mtime_ns}|{st.st_size}")
        return hashlib.sha1("\n".join(parts).encode()).hexdigest()

    def target(self, sample: SegSample, problems: list[MaskProblem]) -> np.ndarray | None:
        """The sample's target, or None when a mask problem drops it (appended to ``problems``).

        Empty masks are appended too but do not drop the sample.
        """
        entry = None
        if self.cache_dir is not None:
            try:
                key = self._key(sample)
            except OSError as exc:
                path = next(r.path for refs in sample.masks for r in refs if not r.path.exists())
                problems.append(MaskProblem("unreadable", path, str(exc)))
                return None
            entry = self.cache_dir / key[:2] / f"{key}.npy"
            if entry.is_file():
                # A damaged entry is rebuilt below (and overwritten).
                with contextlib.suppress(OSError, ValueError, EOFError):
                    return np.load(entry, allow_pickle=False)
        try:
            with Image.open(sample.image) as pil:
                image_size = pil.size
        except (OSError, UnidentifiedImageError) as exc:
            raise ImageLoadError(f"{sample.image}: cannot read image ({exc})") from exc
        target = np.zeros((len(sample.masks), self.image_size, self.image_size), np.uint8)
        for k, refs in enumerate(sample.masks):
            union = None
            for ref in refs:
                try:
                    fg = read_mask(ref, image_size)
                except MaskProblem as problem:
                    problems.append(problem)
                    if problem.kind != "empty":
                        return None
                    continue
                union = fg if union is None else union | fg
            if union is not None:
                target[k] = resize_mask(union, self.image_size, self.resize_mode)
        if entry is not None:
            entry.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(entry, lambda p: save_npy(p, target))
        return target


def report_problems(problems: Sequence[MaskProblem], limit: int = 5) -> list[str]:
    """One warning line per problem kind: the count, what happens, the first files."""
    lines = []
    for kind, message in MaskProblem.MESSAGES.items():
        found = [p for p in problems if p.kind == kind]
        if found:
            shown = "; ".join(str(p) for p in found[:limit])
            more = f" (and {len(found) - limit} more)" if len(found) > limit else ""
            lines.append(f"{len(found)} {message}: {shown}{more}")
    return lines


class SegDataset(Dataset):
    """Normalised images (3, S, S) and float targets (C, S, S) of prepared samples."""

    def __init__(
        self,
        samples: Sequence[SegSample],
        targets: Sequence[np.ndarray],
        image_cache: PreprocessCache,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool = False,
    ) -> None:
        self.samples = list(samples)
        self.targets = list(targets)
        self.image_cache = image_cache
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.samples)

    def image_uint8(self, index: int) -> np.ndarray:
        """The resized RGB uint8 image (what predictions are overlaid on)."""
        return self.image_cache.load(self.samples[index].image)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = torch.from_numpy(self.image_uint8(index).copy()).permute(2, 0, 1).float() / 255.0
        target = torch.from_numpy(self.targets[index].astype(np.float32))
        if self.augment and torch.rand(()) < 0.5:
            # A small brightness/contrast jitter; no flips: left and right lung are anatomy.
            image = ((image - 0.5) * (0.8 + 0.4 * torch.rand(())) + 0.5).clamp(0, 1)
        return (image - self.mean) / self.std, target


# ---------------------------------------------------------------------------------------------
# Splits


def _as_records(samples: Sequence[SegSample]) -> list[Record]:
    # patient_split groups Records by patient id; the texts/labels are not used by it.
    return [
        Record(image=s.image, texts=[[""]], labels=[[]], patient_id=s.patient_id) for s in samples
    ]


def seg_split(
    samples: Sequence[SegSample], fractions: dict[str, float], seed: int
) -> dict[str, list[int]]:
    """Sample indices per split (train/val/test); no patient in two splits."""
    return patient_split(_as_records(samples), fractions, seed=seed)


def write_pretrain_split(
    pretrain_records: Sequence[Record],
    pretrain_folder: Path,
    excluded: Sequence[SegSample],
    output: Path,
    fractions: dict[str, float] | None = None,
    seed: int = 0,
) -> dict[str, int]:
    """A pretraining split file (``data.split.file``) that leaves out every patient and image of
    ``excluded`` (the segmentation set), so no segmentation image, nor another image of its
    patients, is seen in pretraining. Returns the number of images per split and excluded."""
    patients = {s.patient_id for s in excluded}
    names = {s.image.name for s in excluded}
    keep = [
        i
        for i, r in enumerate(pretrain_records)
        if r.patient_id not in patients and Path(r.image).name not in names
    ]
    inner = patient_split([pretrain_records[i] for i in keep], fractions, seed=seed)
    split = {name: [keep[j] for j in inner[name]] for name in SPLIT_NAMES}
    write_split_file(output, pretrain_records, split, root=pretrain_folder)
    counts = {name: len(idx) for name, idx in split.items()}
    counts["excluded"] = len(pretrain_records) - len(keep)
    return counts
