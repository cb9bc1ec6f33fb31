"""atomic_write: all or nothing, and files readable the way new files usually are."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from mgll.io import atomic_write


def test_written_file_follows_the_umask_even_when_the_writer_makes_it_private(tmp_path):
    target = tmp_path / "weights.safetensors"
    old = os.umask(0o022)
    try:
        atomic_write(target, lambda p: save_file({"w": torch.ones(2)}, str(p)))
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert list(tmp_path.iterdir()) == [target]


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "config.yaml"
    target.write_text("old\n")

    def broken(path):
        path.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_text() == "old\n"
    assert list(tmp_path.iterdir()) == [target]
