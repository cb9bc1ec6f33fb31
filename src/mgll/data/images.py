"""Image decoding: JPEG/PNG (8/16 bit, grayscale, RGBA, palette), DICOM, .npz/.npy.

The format is detected from the file's first bytes, never from its extension: real datasets
ship PNGs named ``.jpg``. Every decoder returns the same thing, an RGB ``uint8`` array
(H, W, 3), so the cache and the transforms see one kind of image.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

# A truncated file must raise, not decode into a half-grey image that trains silently.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageLoadError(Exception):
    """An image could not be read; the message names the file and the reason."""


def detect_format(head: bytes) -> str:
    """Format name from a file's first 132+ bytes: png, jpeg, dicom, npz, npy, or pil (other
    formats Pillow may know, such as TIFF or BMP)."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "npz"
    return "pil"


def load_image(path: str | Path) -> np.ndarray:
    """Decode ``path`` into an RGB uint8 array (H, W, 3).

    Raises :class:`ImageLoadError` naming the file when it is missing, empty, truncated or not
    an image; callers decide whether to skip it.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageLoadError(f"{path}: cannot read file ({exc.strerror or exc})") from exc
    return decode_image_bytes(data, path)


def decode_image_bytes(data: bytes, source: str | Path) -> np.ndarray:
    """Decode an image held in memory (a file's bytes, a tar member) into RGB uint8 (H, W, 3).

    ``source`` names it in the :class:`ImageLoadError` raised when it is empty, truncated or
    not an image.
    """
    if not data:
        raise ImageLoadError(f"{source}: file is empty")
    kind = detect_format(data[:132])
    try:
        if kind == "dicom":
            array = _decode_dicom(data, Path(source))
        elif kind in ("npz", "npy"):
            array = _decode_numpy(data, kind)
        else:
            array = _decode_pil(data)
    except ImageLoadError:
        raise
    except UnidentifiedImageError as exc:  # its own message only names a BytesIO object
        raise ImageLoadError(
            f"{source}: not an image format this loader knows ({kind}: starts with "
            f"{data[:8]!r}); replace or remove the file, or run `mgll data check` to list all "
            "such files"
        ) from exc
    except Exception as exc:  # decoders raise many types; all mean "this file is unusable"
        raise ImageLoadError(
            f"{source}: cannot decode as {kind} ({type(exc).__name__}: {exc})"
        ) from exc
    return to_rgb_uint8(array, source=source)


def _decode_pil(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # forces the full decode so truncation is caught here
        if im.mode == "P":
            # Palette images may carry transparency; go through RGBA so it is handled below.
            im = im.convert("RGBA")
        if im.mode in ("RGBA", "LA", "PA"):
            # Composite on black: X-ray borders are black, and alpha is not a medical signal.
            rgba = im.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
            im = Image.alpha_composite(background, rgba).convert("RGB")
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            return np.asarray(im).astype(np.float32)
        if im.mode not in ("L", "RGB"):
            im = im.convert("RGB")
        return np.asarray(im)


def _decode_numpy(data: bytes, kind: str) -> np.ndarray:
    buffer = io.BytesIO(data)
    if kind == "npy":
        return np.load(buffer, allow_pickle=False)
    try:
        archive = np.load(buffer, allow_pickle=False)
    except zipfile.BadZipFile as exc:
        raise ValueError(f"not a valid .npz archive ({exc})") from exc
    with archive:
        keys = list(archive.keys())
        if "image" in keys:
            return archive["image"]
        if len(keys) == 1:
            return archive[keys[0]]
        raise ValueError(
            f".npz has no array named 'image' (arrays: {keys}); store the image as 'image'"
        )


def _decode_dicom(data: bytes, path: Path) -> np.ndarray:
    try:
        import pydicom
    except ImportError as exc:
        raise ImageLoadError(
            f"{path}: is a DICOM file, but pydicom is not installed; run pip install 'mgll[dicom]'"
        ) from exc
    ds = pydicom.dcmread(io.BytesIO(data))
    pixels = ds.pixel_array
    if pixels.ndim == 4 or (pixels.ndim == 3 and ds.get("SamplesPerPixel", 1) == 1):
        pixels = pixels[0]  # multi-frame: the first frame represents the series image
    if ds.get("SamplesPerPixel", 1) != 1:
        return pixels  # colour (RGB after pydicom's conversion): 8-bit stays as stored
    pixels = pixels.astype(np.float32)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    pixels = pixels * slope + intercept
    windowed = _apply_window(pixels, ds)
    if windowed is not None:
        pixels = windowed
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        # MONOCHROME1 stores high values as dark; invert so bone is bright as in MONOCHROME2.
        pixels = 255 - pixels if windowed is not None else pixels.max() + pixels.min() - pixels
    return pixels


def _first(value: object) -> float | None:
    """The first number of a DICOM value that may be multi-valued (WindowCenter "40\\400")."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None  # type: ignore[index, arg-type]
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _apply_window(pixels: np.ndarray, ds: object) -> np.ndarray | None:
    """The file's first VOI window (WindowCenter/Width) mapped linearly onto 0..255 (uint8), or
    None when it has none. The window is the display mapping, so values keep their place in it
    rather than being stretched to the image's own range."""
    center = _first(getattr(ds, "WindowCenter", None))
    width = _first(getattr(ds, "WindowWidth", None))
    if center is None or width is None or width <= 1:
        return None
    low = center - width / 2.0
    scaled = (np.clip(pixels, low, low + width) - low) * (255.0 / width)
    return np.rint(scaled).astype(np.uint8)


def to_rgb_uint8(array: np.ndarray, source: str | Path = "<array>") -> np.ndarray:
    """Any 2-D or 3-D image array -> RGB uint8 (H, W, 3).

    uint8 is kept as is; other types (16-bit, float, rescaled DICOM) are min-max scaled per
    image, because their ranges vary (12-bit in 16-bit containers, Hounsfield units...).
    """
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # channels-first (C, H, W) arrays, common in .npz
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape[-1] == 4:
        array = array[..., :3]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
        raise ImageLoadError(
            f"{source}: image array has shape {array.shape}; expected (H, W), (H, W, 1|3|4) "
            "or (1|3|4, H, W)"
        )
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ImageLoadError(f"{source}: image has no pixels (shape {array.shape})")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        values = array.astype(np.float32)
        finite = np.isfinite(values)
        if not finite.all():
            values = np.where(finite, values, 0.0)
        low, high = float(values.min()), float(values.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        array = np.clip((values - low) * scale + 0.5, 0, 255).astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    return np.ascontiguousarray(array)
