"""Tiny segmentation datasets on disk: a covid-cxr-seg look-alike and a mask folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def rgba_mask(path: Path, box: tuple[int, int, int, int], size=(40, 30), colour=(0, 200, 0)):
    """An RGBA mask like covid-cxr-seg's: opaque black, one colour inside ``box`` (l, t, r, b)."""
    array = np.zeros((size[1], size[0], 4), np.uint8)
    array[..., 3] = 255
    left, top, right, bottom = box
    array[top:bottom, left:right, :3] = colour
    Image.fromarray(array, "RGBA").save(path)
    return path


def covid_seg_folder(root: Path) -> Path:
    """A 3-image covid-cxr-seg look-alike: both lungs, one GGO, a probe tag without a mask."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = ["Template Name,Filename,Mask"]
    for i in range(3):
        Image.fromarray(np.full((30, 40, 3), 60 * i, np.uint8)).save(root / "images" / f"x{i}.png")
        rgba_mask(root / "masks" / f"l{i}.png", (2, 2, 18, 28))
        rgba_mask(root / "masks" / f"r{i}.png", (22, 2, 38, 28))
        rows += [f"Left Lung,x{i}.png,masks/l{i}.png", f"Right Lung,x{i}.png,masks/r{i}.png"]
    rgba_mask(root / "masks" / "g0.png", (4, 4, 10, 10))
    rows += ["Ground Glass Opacities,x0.png,masks/g0.png", "Monitoring Probes,x1.png,"]
    (root / "structure.csv").write_text("\n".join(rows) + "\n")
    (root / "metadata.csv").write_text("patientid,filename\n7,x0.png\n7,x1.png\n8,x2.png\n")
    return root


def write_toy_folder(root: Path, n: int = 8) -> Path:
    """Images with a bright square; the mask is that square."""
    rng = np.random.default_rng(0)
    for name in ("images", "masks"):
        (root / name).mkdir(parents=True)
    for i in range(n):
        image = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
        mask = np.zeros((32, 32), np.uint8)
        top, left = rng.integers(0, 16, 2)
        image[top : top + 12, left : left + 12] = 220
        mask[top : top + 12, left : left + 12] = 255
        Image.fromarray(image).save(root / "images" / f"t{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"t{i}.png")
    return root
