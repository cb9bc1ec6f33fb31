"""The preprocessing cache: reused across epochs and runs, rebuilt when the source or size
changes, and identical in output to decoding without it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_fixtures import gradient, spec_dataset, write_png
from mgll.cli import main
from mgll.data import (
    ImageLoadError,
    LevelInfo,
    MultiGranularDataset,
    PreprocessCache,
    Record,
    RecordSet,
    build_datasets,
)
from mgll.data.cache import default_cache_dir, load_resized, resize_square


def _entries(cache_dir):
    return sorted(p for p in cache_dir.rglob("*.npy"))


def test_entries_are_reused_across_instances(tmp_path):
    src = write_png(tmp_path / "x.png")
    cache_dir = tmp_path / "cache"
    first = PreprocessCache(cache_dir, 16)
    a = first.load(src)
    assert (first.hits, first.misses) == (0, 1)
    assert len(_entries(cache_dir)) == 1
    second = PreprocessCache(cache_dir, 16)  # a new run reading the same folder
    b = second.load(src)
    assert (second.hits, second.misses) == (1, 0)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, load_resized(src, 16))
    assert a.shape == (16, 16, 3) and a.dtype == np.uint8


def test_modified_source_is_rebuilt(tmp_path):
    src = write_png(tmp_path / "x.png")
    cache = PreprocessCache(tmp_path / "cache", 16)
    before = cache.load(src)
    write_png(src, 255 - gradient())  # same name, new content
    after = cache.load(src)
    assert cache.misses == 2 and cache.hits == 0
    np.testing.assert_array_equal(after, load_resized(src, 16))
    assert not np.array_equal(before, after)


def test_touched_source_is_rebuilt(tmp_path):
    src = write_png(tmp_path / "x.png")
    cache = PreprocessCache(tmp_path / "cache", 16)
    cache.load(src)
    entry_before = cache.entry_path(src)
    stat = src.stat()
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    assert cache.entry_path(src) != entry_before
    cache.load(src)
    assert cache.misses == 2
    assert len(_entries(tmp_path / "cache")) == 2


def test_size_and_mode_are_part_of_the_key(tmp_path):
    src = write_png(tmp_path / "x.png")
    small = PreprocessCache(tmp_path / "cache", 8).load(src)
    big_cache = PreprocessCache(tmp_path / "cache", 20)
    big = big_cache.load(src)
    padded_cache = PreprocessCache(tmp_path / "cache", 20, "pad")
    padded = padded_cache.load(src)
    assert small.shape == (8, 8, 3) and big.shape == (20, 20, 3) and padded.shape == (20, 20, 3)
    assert big_cache.misses == 1 and padded_cache.misses == 1
    assert len(_entries(tmp_path / "cache")) == 3
    assert (padded[0] == 0).all()  # a 24x32 image padded to square has black bands


@pytest.mark.parametrize("damage", [b"half-written", b""])  # b"": np.load raises EOFError
def test_damaged_entry_is_rebuilt_with_a_warning(tmp_path, damage):
    src = write_png(tmp_path / "x.png")
    cache = PreprocessCache(tmp_path / "cache", 16)
    good = cache.load(src)
    cache.entry_path(src).write_bytes(damage)
    with pytest.warns(UserWarning, match="unreadable"):
        again = cache.load(src)
    np.testing.assert_array_equal(good, again)
    assert np.load(cache.entry_path(src)).shape == (16, 16, 3)


def test_broken_source_is_not_cached(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    cache = PreprocessCache(tmp_path / "cache", 16)
    with pytest.raises(ImageLoadError, match=r"bad\.png"):
        cache.load(bad)
    assert _entries(tmp_path / "cache") == []


def test_unwritable_cache_warns_once_and_still_serves_images(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")  # the cache folder cannot be created under a file
    cache = PreprocessCache(blocker / "cache", 8)
    sources = [write_png(tmp_path / f"{i}.png", np.roll(gradient(), i, axis=1)) for i in range(3)]
    with pytest.warns(UserWarning, match="cannot write the preprocessing cache") as caught:
        images = [cache.load(src) for src in sources]
    assert len(caught) == 1 and not cache.writable
    assert all(im.shape == (8, 8, 3) for im in images) and cache.misses == 3


def test_resize_crop_keeps_the_centre():
    image = np.zeros((10, 30, 3), np.uint8)
    image[:, 10:20] = 255  # a bright centre third
    out = resize_square(image, 10, "crop")
    assert out.shape == (10, 10, 3) and out.min() >= 250


def test_dataset_output_is_the_same_with_and_without_cache(tmp_path):
    paths = [write_png(tmp_path / f"{i}.png", np.roll(gradient(), i, axis=1)) for i in range(3)]
    records = RecordSet(
        levels=[LevelInfo("l", ["x"])],
        records=[Record(image=p, texts=[["t"]], labels=[["x"]]) for p in paths],
    )
    plain = MultiGranularDataset(records, image_size=12)
    cache = PreprocessCache(tmp_path / "cache", 12)
    cached = MultiGranularDataset(records, image_size=12, cache=cache)
    for epoch in range(2):  # second epoch is served from the cache
        cached.set_epoch(epoch)
        for i in range(3):
            assert torch.equal(plain[i]["image"], cached[i]["image"])
    assert cache.misses == 3 and cache.hits == 3


def test_user_cache_location_reads_mgll_cache_then_the_old_name(tmp_path, monkeypatch):
    from mgll.data.cache import user_cache_location

    monkeypatch.setenv("MGLL_CACHE", str(tmp_path / "new"))
    monkeypatch.setenv("MGLL_CACHE_DIR", str(tmp_path / "old"))
    assert user_cache_location() == (tmp_path / "new", "$MGLL_CACHE")
    monkeypatch.delenv("MGLL_CACHE")
    assert user_cache_location() == (tmp_path / "old", "$MGLL_CACHE_DIR")  # still honoured
    monkeypatch.delenv("MGLL_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if sys.platform.startswith("linux"):
        assert user_cache_location() == (tmp_path / "xdg" / "mgll", "the user cache")


def test_default_cache_dir_is_per_dataset_in_the_user_cache(tmp_path, monkeypatch):
    import mgll.data.cache as cache_module

    one, two = tmp_path / "a" / "set", tmp_path / "b" / "set"  # same name, different data
    one.mkdir(parents=True)
    two.mkdir(parents=True)
    monkeypatch.setenv("MGLL_CACHE", str(tmp_path / "user"))
    first = cache_module.default_cache_dir(one)
    second = cache_module.default_cache_dir(two)
    assert first.parent == tmp_path / "user" / "preprocess" and first.name.startswith("set-")
    assert first != second and second.parent == first.parent
    assert json.loads((first / "dataset.json").read_text()) == {"dataset": str(one.resolve())}
    # The same dataset reached through another spelling of its path shares the folder.
    assert cache_module.default_cache_dir(tmp_path / "a" / ".." / "a" / "set") == first
    assert list(one.iterdir()) == []  # data folders are read, never written
    # An explicit root (data.cache_dir) is used the same way, even inside the dataset.
    inside = cache_module.default_cache_dir(one, one / ".mgll-cache")
    assert inside == one / ".mgll-cache" / "preprocess" / first.name
    blocked = tmp_path / "file"
    blocked.write_text("x")
    monkeypatch.setenv("MGLL_CACHE", str(blocked / "inside"))  # under a file: unwritable
    assert cache_module.default_cache_dir(one) is None


def _listing(folder: Path) -> list[tuple[str, int, int]]:
    """Every file and folder below ``folder`` with its size and modification time."""
    return sorted(
        (str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
    )


def test_a_default_run_leaves_the_dataset_folder_as_it_was(tmp_path, monkeypatch, capsys):
    """Loading through build_datasets (which fills the cache) and `mgll data check` write
    nothing into the dataset folder; `mgll cache info` shows the entries, `clear` removes them."""
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    spec = spec_dataset(dataset, n=6)
    before = _listing(dataset)
    user = tmp_path / "user"
    monkeypatch.setenv("MGLL_CACHE", str(user))
    cfg = {"source": str(spec), "split": {"train": 0.5, "val": 0.5, "test": 0.0}}
    datasets = build_datasets(cfg, None, image_size=8, mean=(0.5,) * 3, std=(0.5,) * 3, seed=0)
    for ds in datasets.values():
        for i in range(len(ds)):
            ds[i]
    assert main(["data", "check", str(spec)]) == 0
    assert _listing(dataset) == before
    cached = list(user.rglob("*.npy"))
    assert len(cached) == 6 and all("8px-crop-v" in str(p) for p in cached)

    capsys.readouterr()
    assert main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert f"cache: {user / 'preprocess'} (from $MGLL_CACHE)" in out
    assert "total: 1 dataset(s), 6 entries" in out
    assert str(dataset.resolve()) in out
    assert "8px-crop-v" in out
    size = sum(p.stat().st_size for p in user.rglob("*") if p.is_file())
    assert f"{size / 1024:.1f} KiB" in out

    # Both errors go through mgll.cli.main's one handler: one line, usage 2, bad input 1.
    assert main(["cache", "clear"]) == 2  # not a terminal: needs --yes
    err = capsys.readouterr().err
    assert err.startswith("mgll cache clear: error: would delete 6 entries") and "pass --yes" in err
    assert err.count("\n") == 1
    assert len(list(user.rglob("*.npy"))) == 6
    assert main(["cache", "clear", str(tmp_path / "elsewhere"), "--yes"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mgll cache clear: error: nothing cached for") and err.count("\n") == 1
    assert main(["cache", "clear", str(spec), "--yes"]) == 0  # a spec names its folder
    assert "deleted 6 entries" in capsys.readouterr().out
    assert not list(user.rglob("*.npy")) and _listing(dataset) == before


def test_cache_clear_all_or_one_dataset_by_name(tmp_path, capsys):
    root = tmp_path / "root"
    src = write_png(tmp_path / "x.png")
    names = []
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        folder = default_cache_dir(tmp_path / name, root)
        PreprocessCache(folder, 8).load(src)
        names.append(folder.name)
    legacy = root / "preprocess" / "ab"  # an entry from before per-dataset folders
    legacy.mkdir()
    (legacy / f"ab{'0' * 38}.npy").write_bytes(b"x" * 10)
    (root / "preprocess" / "keep.txt").write_text("not ours")
    assert main(["cache", "info", "--cache-dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert "total: 3 dataset(s), 3 entries" in out and "older mgll versions" in out
    assert main(["cache", "clear", names[0], "--cache-dir", str(root), "--yes"]) == 0
    assert {p.name for p in (root / "preprocess").iterdir()} == {"ab", names[1], "keep.txt"}
    assert main(["cache", "clear", "--cache-dir", str(root), "-y"]) == 0
    assert "deleted 2 entries" in capsys.readouterr().out
    assert [p.name for p in (root / "preprocess").iterdir()] == ["keep.txt"]  # only ours go
    assert main(["cache", "clear", "--cache-dir", str(root), "-y"]) == 0
    assert "nothing to clear" in capsys.readouterr().out


def test_cache_clear_asks_on_a_terminal(tmp_path, monkeypatch, capsys):
    root = tmp_path / "root"
    (tmp_path / "set").mkdir()
    cache = PreprocessCache(default_cache_dir(tmp_path / "set", root), 8)
    cache.load(write_png(tmp_path / "x.png"))
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    answers = iter(["n", "yes"])
    monkeypatch.setattr("builtins.input", lambda prompt: next(answers))
    assert main(["cache", "clear", "--cache-dir", str(root)]) == 1
    assert "nothing deleted" in capsys.readouterr().out
    assert len(list(root.rglob("*.npy"))) == 1
    assert main(["cache", "clear", "--cache-dir", str(root)]) == 0
    assert not list(root.rglob("*.npy"))
