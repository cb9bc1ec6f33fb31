"""Image decoding: formats detected from content, bit depths, alpha, palette, DICOM, npz, and
broken files that are named and skipped instead of crashing a run."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from data_fixtures import gradient, write_dicom, write_jpeg, write_png
from mgll.data import (
    ImageLoadError,
    LevelInfo,
    MultiGranularDataset,
    Record,
    RecordSet,
    collate_samples,
    detect_format,
    load_image,
)


def test_png_named_jpg_is_decoded_by_content(tmp_path):
    path = write_png(tmp_path / "really-a-png.jpg")
    assert detect_format(path.read_bytes()[:132]) == "png"
    image = load_image(path)
    assert image.shape == (24, 32, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[..., 0], gradient())
    np.testing.assert_array_equal(image[..., 0], image[..., 2])  # grayscale -> 3 equal channels


def test_jpeg_rgb(tmp_path):
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 0] = 200
    image = load_image(write_jpeg(tmp_path / "a.jpeg", rgb))
    assert image.shape == (16, 16, 3)
    assert abs(int(image[..., 0].mean()) - 200) <= 3 and image[..., 2].mean() < 10


def test_16bit_png_uses_the_full_range(tmp_path):
    # 12-bit data in a 16-bit container: dividing by 65535 would make it nearly black.
    values = np.linspace(1000, 4000, 32).astype(np.uint16)
    Image.fromarray(np.repeat(values[None, :], 8, axis=0)).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    image = load_image(tmp_path / "deep.png")
    assert image.dtype == np.uint8
    assert image[0, 0, 0] == 0 and image[0, -1, 0] == 255
    assert np.all(np.diff(image[0, :, 0].astype(int)) >= 0)  # order of intensities kept


def test_rgba_is_composited_on_black(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[..., 3] = 255
    rgba[0, :, 3] = 0  # transparent top row
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    image = load_image(tmp_path / "alpha.png")
    assert image.shape == (8, 8, 3)
    assert (image[0] == 0).all() and (image[1:] == 200).all()


def test_palette_png(tmp_path):
    pal = Image.new("P", (6, 4))
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    pal.putdata([1] * 12 + [2] * 12)
    pal.save(tmp_path / "palette.png")
    image = load_image(tmp_path / "palette.png")
    assert image[0, 0].tolist() == [255, 0, 0]
    assert image[-1, -1].tolist() == [0, 0, 255]


def test_npz_with_image_key_and_channels_first(tmp_path):
    chw = np.zeros((3, 10, 12), np.uint8)
    chw[1] = 77
    np.savez(tmp_path / "x.npz", image=chw, mask=np.ones((10, 12)))
    image = load_image(tmp_path / "x.npz")
    assert image.shape == (10, 12, 3) and int(image[..., 1].max()) == 77
    np.savez(tmp_path / "bad.npz", a=chw, b=chw)
    with pytest.raises(ImageLoadError, match="no array named 'image'"):
        load_image(tmp_path / "bad.npz")


def test_float_npz_is_scaled(tmp_path):
    np.savez(tmp_path / "f.npz", image=np.linspace(-1, 1, 20).reshape(4, 5).astype(np.float32))
    image = load_image(tmp_path / "f.npz")
    assert image[0, 0, 0] == 0 and image[-1, -1, 0] == 255


def test_dicom_monochrome1_is_inverted(tmp_path):
    pixels = np.tile(np.linspace(0, 4000, 16).astype(np.uint16), (8, 1))
    path = write_dicom(tmp_path / "scan.bin", pixels, "MONOCHROME1", slope=2.0, intercept=-100.0)
    assert detect_format(path.read_bytes()[:132]) == "dicom"  # found without a .dcm extension
    image = load_image(path)
    assert image.shape == (8, 16, 3)
    # MONOCHROME1: the largest stored value is the darkest pixel.
    assert image[0, 0, 0] == 255 and image[0, -1, 0] == 0
    assert np.all(np.diff(image[0, :, 0].astype(int)) <= 0)


def test_dicom_rescale_and_window(tmp_path):
    pixels = np.tile(np.arange(0, 1600, 100, dtype=np.uint16), (4, 1))  # 0..1500
    # Rescaled values are 2*v - 1000 in -1000..2000; the window [0, 1000] clips both ends.
    path = write_dicom(
        tmp_path / "w.dcm", pixels, "MONOCHROME2", slope=2.0, intercept=-1000.0, window=(500, 1000)
    )
    row = load_image(path)[0, :, 0].astype(int)
    rescaled = pixels[0] * 2.0 - 1000.0
    assert (row[rescaled <= 0] == 0).all()
    assert (row[rescaled >= 1000] == 255).all()
    inside = (rescaled > 0) & (rescaled < 1000)
    assert inside.sum() == 4
    expected = np.round(rescaled[inside] / 1000 * 255).astype(int)
    assert np.abs(row[inside] - expected).max() <= 1


def test_dicom_window_is_the_display_mapping(tmp_path):
    # Values 400..700 inside the window [0, 1000]: they keep their place in the window
    # (102..178), not stretched to 0..255 as a per-image min-max would.
    pixels = np.tile(np.array([400, 500, 600, 700], np.uint16), (2, 1))
    mono2 = write_dicom(tmp_path / "m2.dcm", pixels, "MONOCHROME2", window=(500, 1000))
    assert load_image(mono2)[0, :, 0].tolist() == [102, 128, 153, 178]
    mono1 = write_dicom(tmp_path / "m1.dcm", pixels, "MONOCHROME1", window=(500, 1000))
    assert load_image(mono1)[0, :, 0].tolist() == [153, 127, 102, 77]


def test_dicom_rgb_8bit_keeps_its_colours(tmp_path):
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 100, 150, 50  # a min-max stretch would change these
    path = write_dicom(tmp_path / "rgb.dcm", rgb, "RGB")
    np.testing.assert_array_equal(load_image(path), rgb)


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty"),
        (b"\xff\xd8\xff\xe0" + b"\x00garbage" * 20, "jpeg"),
        (b"hello, I am not an image at all" * 10, "not an image format this loader knows"),
    ],
)
def test_broken_files_raise_a_named_error(tmp_path, content, reason):
    path = tmp_path / "broken.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert str(path) in str(info.value) and reason in str(info.value)


def test_truncated_png_raises(tmp_path):
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)
    Image.fromarray(noise).save(buffer, "PNG")
    (tmp_path / "cut.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match=r"cut\.png"):
        load_image(tmp_path / "cut.png")


def test_missing_file_raises(tmp_path):
    with pytest.raises(ImageLoadError, match=r"nothere\.png"):
        load_image(tmp_path / "nothere.png")


def _records(paths):
    level = LevelInfo("finding", ["a", "b"], multi_label=False)
    recs = [
        Record(image=p, texts=[[f"text {i}"]], labels=[["a" if i == 0 else "b"]])
        for i, p in enumerate(paths)
    ]
    return RecordSet(levels=[level], records=recs, source="test")


def test_dataset_replaces_unreadable_images_and_counts_them(tmp_path):
    good0 = write_png(tmp_path / "good0.png")
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good2 = write_png(tmp_path / "good2.png")
    ds = MultiGranularDataset(_records([good0, bad, good2]), image_size=16)
    with pytest.warns(UserWarning, match="corrupt.jpg"):
        item = ds[1]
    # Deterministic replacement: the next readable sample, with its own texts and labels.
    assert item["index"] == 2 and item["texts"] == ["text 2"] and item["labels"] == [1]
    assert item["skipped"] == [str(bad)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time it is skipped without a new warning
        again = ds[1]
    assert again["index"] == 2 and again["skipped"] == [str(bad)]
    assert ds.skip_count == 2
    batch = collate_samples([ds[0], ds[1], ds[2]])
    assert batch["images"].shape == (3, 3, 16, 16)
    assert batch["indices"].tolist() == [0, 2, 2]
    assert batch["skipped"] == [str(bad)]
    assert torch.equal(batch["labels"][0], torch.tensor([0, 1, 1]))


def test_worker_processes_replace_broken_images_and_report_them(tmp_path):
    paths = [write_png(tmp_path / f"{i}.png", np.full((6, 6), 40 * i, np.uint8)) for i in range(6)]
    paths[1].write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    paths[4].unlink()
    ds = MultiGranularDataset(_records(paths), image_size=8)
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_samples)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the workers warn on their own stderr
        batches = list(loader)
    assert [b["indices"].tolist() for b in batches] == [[0, 2, 2], [3, 5, 5]]
    assert [b["skipped"] for b in batches] == [[str(paths[1])], [str(paths[4])]]


def test_dataset_with_only_broken_images_says_what_to_do(tmp_path):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"b{i}.png")
        paths[-1].write_bytes(b"nope")
    ds = MultiGranularDataset(_records(paths), image_size=8)
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="mgll data check"):
        ds[0]
