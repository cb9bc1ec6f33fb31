"""Train and eval transforms (METHOD.md section 4: flips, rotation, colour jitter, random crop).

Images arrive already decoded and resized to a square uint8 array (from the cache or from
:func:`mgll.data.cache.load_resized`), so the transforms only augment and normalise; this keeps
the per-step work small and identical with or without the cache.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torchvision import transforms as T

from mgll.errors import DataError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The authors' downstream recipe; documented in docs/data.md.
DEFAULT_AUGMENTATION: dict[str, float] = {
    "hflip": 0.5,
    "vflip": 0.0,
    "rotation": 10.0,
    "brightness": 0.2,
    "contrast": 0.2,
    "saturation": 0.0,
    "hue": 0.0,
    # random crop: the smallest share of the image's area a crop keeps (RandomResizedCrop's
    # scale (crop_scale, 1), aspect 3/4 to 4/3), resized back to the input size; 0 = off
    "crop_scale": 0.0,
}


def augmentation_options(cfg: Mapping[str, Any] | bool | None) -> dict[str, float]:
    """Merge user options over the defaults; ``False`` turns all augmentation off."""
    if cfg is False:
        return {k: 0.0 for k in DEFAULT_AUGMENTATION}
    options = dict(DEFAULT_AUGMENTATION)
    if cfg in (None, True):
        return options
    if not isinstance(cfg, Mapping):
        raise DataError(f"data.augmentation: expected a mapping, true or false, got {cfg!r}")
    unknown = set(cfg) - set(options)
    if unknown:
        raise DataError(
            f"data.augmentation: unknown option(s) {sorted(unknown)}; known: {sorted(options)}"
        )
    for key, value in cfg.items():
        options[key] = float(value)
    if not 0.0 <= options["crop_scale"] <= 1.0:
        raise DataError(
            f"data.augmentation.crop_scale: {options['crop_scale']} is not an area share in "
            "[0, 1] (0 = no random crop, e.g. 0.08 as torchvision's RandomResizedCrop)"
        )
    return options


class RandomAreaCrop:
    """A random crop of ``scale_min`` to all of the image's area (aspect 3/4 to 4/3), resized
    back to the image's size: torchvision's RandomResizedCrop with the output size taken from
    the input, since images arrive already at the model's size."""

    def __init__(self, scale_min: float) -> None:
        self.scale = (float(scale_min), 1.0)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        top, left, height, width = T.RandomResizedCrop.get_params(
            image, scale=list(self.scale), ratio=[3 / 4, 4 / 3]
        )
        size = list(image.shape[-2:])
        return T.functional.resized_crop(image, top, left, height, width, size, antialias=True)


class ImageTransform:
    """Square RGB uint8 array (H, W, 3) -> normalised float tensor (3, H, W), with optional
    augmentation. A class rather than a closure so data-loader workers can pickle it."""

    def __init__(
        self,
        *,
        train: bool,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        augmentation: Mapping[str, Any] | bool | None = None,
    ) -> None:
        self.train = train
        self.mean = torch.tensor(tuple(mean), dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(tuple(std), dtype=torch.float32).view(3, 1, 1)
        steps: list[Callable[[torch.Tensor], torch.Tensor]] = []
        if train:
            opts = augmentation_options(augmentation)
            if opts["crop_scale"] > 0:  # first: the crop is resized back before the rest
                steps.append(RandomAreaCrop(opts["crop_scale"]))
            if opts["hflip"] > 0:
                steps.append(T.RandomHorizontalFlip(opts["hflip"]))
            if opts["vflip"] > 0:
                steps.append(T.RandomVerticalFlip(opts["vflip"]))
            if opts["rotation"] > 0:
                steps.append(T.RandomRotation(opts["rotation"], fill=0))
            jitter = [opts[k] for k in ("brightness", "contrast", "saturation", "hue")]
            if any(v > 0 for v in jitter):
                steps.append(T.ColorJitter(*jitter))
        self.augment = T.Compose(steps) if steps else None

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        if not image.flags.writeable or not image.flags.c_contiguous:
            image = np.array(image)  # torch refuses read-only arrays (PIL and np.load give them)
        tensor = torch.from_numpy(image).permute(2, 0, 1)  # uint8 (3, H, W)
        if self.augment is not None:
            tensor = self.augment(tensor)
        return (tensor.float().div_(255.0) - self.mean) / self.std


def build_transform(
    *,
    train: bool,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    augmentation: Mapping[str, Any] | bool | None = None,
) -> ImageTransform:
    """The train (augmenting) or eval transform for square uint8 images."""
    return ImageTransform(train=train, mean=mean, std=std, augmentation=augmentation)
