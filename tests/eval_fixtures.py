"""Helpers shared by tests/test_eval_*.py: a tiny synthetic downstream set and a briefly
pretrained run on the real chest X-rays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_fixtures import require_shared


def make_downstream(
    folder: Path,
    classes: tuple[str, ...] = ("0", "1", "2"),
    per_split: dict[str, int] | None = None,
    test_classes: tuple[str, ...] | None = None,
    seed: int = 0,
) -> Path:
    """An mgll-downstream folder (grade_Train/_Val/_Test.csv + PNGs) whose classes differ in
    brightness, so a probe of any encoder separates them; ``test_classes`` limits the test
    split to those classes (the format has no patient ids: each image is its own patient)."""
    rng = np.random.default_rng(seed)
    per_split = per_split or {"Train": 24, "Val": 12, "Test": 12}
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for split, n in per_split.items():
        allowed = test_classes if split == "Test" and test_classes else classes
        lines = ["image,grade"]
        for i in range(n):
            grade = allowed[i % len(allowed)]
            level = 40 + 60 * classes.index(grade)
            pixels = np.clip(level + rng.normal(0, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
            name = f"images/{split}_{i // 2}_{i % 2}_{grade}.png"
            Image.fromarray(pixels).save(folder / name)
            lines.append(f"{name},{grade}")
        (folder / f"grade_{split}.csv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="session")
def pretrained_run(tmp_path_factory) -> Path:
    """`mgll pretrain cpu-demo` with the test tower for 2 steps on the real chest X-rays."""
    from mgll.cli import main

    data = require_shared("covid-cxr").parent
    out = tmp_path_factory.mktemp("eval-run") / "run"
    argv = [
        "pretrain",
        "cpu-demo",
        "--data-root",
        str(data),
        "--output-dir",
        str(out),
        "model.image.arch=mgll-vit-test-32",
        "--max-steps",
        "2",
        "model.text.max_length=16",
        "train.batch_size=8",
        "log.progress_bar=false",
        "data.num_workers=0",
        "eval.every_epochs=100",
    ]
    assert main(argv) == 0
    return out
