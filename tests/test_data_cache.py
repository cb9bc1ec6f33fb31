"""The preprocessing cache: reused across epochs and runs, rebuilt when the source or size
changes, and identical in output to decoding without it."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from data_fixtures import gradient, write_png
from mgll.data import (
    ImageLoadError,
    LevelInfo,
    MultiGranularDataset,
    PreprocessCache,
    Record,
    RecordSet,
)
from mgll.data.cache import load_resized, resize_square


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


def test_default_cache_dir_is_the_user_cache_never_the_dataset(tmp_path, monkeypatch):
    import mgll.data.cache as cache_module

    dataset = tmp_path / "set"
    dataset.mkdir()
    monkeypatch.setenv("MGLL_CACHE_DIR", str(tmp_path / "user"))
    # A writable dataset folder is still never used (data folders are read, never written).
    assert cache_module.default_cache_dir(dataset) == tmp_path / "user" / "preprocess"
    blocked = tmp_path / "file"
    blocked.write_text("x")
    monkeypatch.setenv("MGLL_CACHE_DIR", str(blocked / "inside"))  # under a file: unwritable
    assert cache_module.default_cache_dir(dataset) is None
