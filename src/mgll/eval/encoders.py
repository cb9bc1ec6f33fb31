"""One loader for every image encoder that downstream evaluation compares.

``load_encoder(spec)`` accepts:

- a pretraining run folder, its ``checkpoints`` folder or a ``step_*.safetensors`` file (through
  :func:`mgll.training.checkpoint.load_model`);
- an exported encoder: ``FILE.safetensors`` with its ``FILE.json`` sidecar, or an export folder
  (through :func:`mgll.models.load_image_encoder`);
- ``open_clip:ARCH:TAG`` (an open_clip pretrained tag, e.g. ``open_clip:ViT-B-16:openai``, or a
  local checkpoint path as TAG) and ``hf-hub:org/repo`` (an open_clip model on the Hub);
- ``random:ARCH[:SEED]``: the tower of ARCH (any open_clip or shipped mgll architecture, or
  ``timm:NAME[@SIZE]``) with a seeded random initialisation, the floor every pretrained encoder
  must clear;
- ``timm:NAME[@SIZE]``: a timm architecture with its ImageNet weights as they are (offline for
  the EfficientNet-Lite family: :mod:`mgll.models.timm_tower`), at SIZE pixels (default the
  architecture's): the general-domain baseline that domain pretraining starts from;
- one of the authors' released checkpoints (``checkpoint-19.pth``; recognised from its content,
  read safely: :mod:`mgll.models.authors`): their ViT-L-14 at 224 px, ImageNet mean/std.

Baselines and our models therefore go through the same tower class, preprocessing settings and
feature extraction code.

Which features: :meth:`Encoder.encode` returns the *pooled features before the final linear
projection* into the image-text space (open_clip ViT: the pooled, layer-normed token before
``proj``; towers without a separate projection, e.g. ModifiedResNet, return their output). A
linear probe on them can express anything a probe on the projected embedding can (the
projection is linear), the projection may shrink the dimension, and it was trained only to
align with text; CLIP's own linear-probe protocol uses these features for the same reason.
``encode(images, projected=True)`` returns the image-text embedding instead (what zero-shot and
retrieval compare with text).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mgll.errors import UserError
from mgll.eval.options import resolve_device
from mgll.models import (
    ImageConfig,
    PretrainedWeightsError,
    load_image_encoder,
    register_model_configs,
)
from mgll.models.authors import AuthorsCheckpointError, is_torch_pickle, load_authors_checkpoint
from mgll.models.export import FOLDER_SIDECAR
from mgll.models.image_tower import authors_image_tower, build_open_clip
from mgll.models.timm_tower import TIMM_PREFIX, build_timm_tower, is_timm_arch
from mgll.schema import ConfigError
from mgll.training.checkpoint import (
    CheckpointError,
    file_kind,
    list_checkpoints,
    load_model,
    read_header,
)

ACCEPTED_FORMS = (
    "a pretraining run folder or its checkpoints/step_*.safetensors file",
    "an exported encoder (FILE.safetensors with its FILE.json sidecar, or an export folder, "
    "written by `mgll export`)",
    "open_clip:ARCH:TAG (an open_clip pretrained tag or a local checkpoint, e.g. "
    "open_clip:ViT-B-16:openai)",
    "hf-hub:ORG/REPO (an open_clip model on the Hugging Face Hub)",
    "random:ARCH[:SEED] (a seeded random-init tower, e.g. random:mgll-vit-tiny-64:0 or "
    "random:timm:tf_efficientnet_lite0@224:0)",
    "timm:NAME[@SIZE] (a timm architecture with its ImageNet weights, e.g. "
    "timm:tf_efficientnet_lite0)",
    "one of the authors' released MGLL checkpoints (checkpoint-*.pth, read without unpickling)",
)


class EncoderError(UserError, ValueError):
    """An encoder spec that cannot be loaded; the message names it and the accepted forms."""

    def __init__(self, spec: str, reason: str) -> None:
        forms = "; ".join(ACCEPTED_FORMS)
        super().__init__(f"encoder {spec!r}: {reason.rstrip('. ')}. Accepted forms: {forms}")
        self.spec = spec
        self.reason = reason


class Encoder(nn.Module):
    """An image tower with what is needed to preprocess for it and to name it.

    ``tower`` is open_clip's vision module (``model.visual``), ``(N, 3, H, W)`` normalised images
    in. ``name`` is the spec it was loaded from, ``kind`` one of ``run``, ``export``,
    ``open_clip``, ``random``, ``authors``. ``run_config`` is the pretraining run's config for
    run encoders (None otherwise): evaluation takes its default split from it.
    """

    def __init__(
        self,
        tower: nn.Module,
        *,
        name: str,
        kind: str,
        arch: str,
        image_size: int,
        image_mean: tuple[float, ...],
        image_std: tuple[float, ...],
        embed_dim: int,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.tower = tower
        self.name = name
        self.kind = kind
        self.arch = arch
        self.image_size = int(image_size)
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        self.embed_dim = int(embed_dim)  # size of the projected (image-text) embedding
        self.run_config = run_config
        self._feature_dim: int | None = None
        self._digest: str | None = None

    @classmethod
    def from_tower(
        cls, tower: Any, name: str, kind: str, run_config: dict[str, Any] | None = None
    ) -> Encoder:
        """The encoder of one of mgll's image towers (``ImageTower``, an exported
        ``ImageEncoder``): its ``visual`` module and what it says of its input and output."""
        return cls(
            tower.visual,
            name=name,
            kind=kind,
            arch=tower.arch,
            image_size=_square(tower.image_size),
            image_mean=tower.image_mean,
            image_std=tower.image_std,
            embed_dim=tower.embed_dim,
            run_config=run_config,
        )

    @property
    def device(self) -> torch.device:
        """Where the tower's weights are."""
        return next(self.tower.parameters()).device

    @property
    def feature_dim(self) -> int:
        """Size D of :meth:`encode`'s (pre-projection) features."""
        if self._feature_dim is None:
            probe = torch.zeros(1, 3, self.image_size, self.image_size, device=self.device)
            was_training = self.tower.training
            self.tower.eval()
            with torch.no_grad():
                self._feature_dim = int(self.encode(probe).shape[1])
            self.tower.train(was_training)
        return self._feature_dim

    def encode(self, images: torch.Tensor, projected: bool = False) -> torch.Tensor:
        """(N, 3, H, W) normalised images -> (N, D) features, not L2-normalised.

        ``projected=False`` (the probe's features): pooled features before the image-text
        projection; ``projected=True``: the tower's output embedding (``embed_dim``).
        """
        if projected:
            return self.tower(images)
        trunk = getattr(self.tower, "trunk", None)
        if trunk is not None:  # open_clip's TimmModel: trunk (pooled) -> head (projection)
            features = trunk(images)
            if features.ndim == 2:
                return features
            return self.tower(images)
        with _without_projection(self.tower):
            return self.tower(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`encode` (pre-projection features)."""
        return self.encode(images)

    def weights_digest(self) -> str:
        """SHA-1 of the tower's architecture and weights: what a feature cache is keyed by."""
        if self._digest is None:
            digest = hashlib.sha1(f"{self.arch}|{self.image_size}".encode())
            for key, tensor in sorted(self.tower.state_dict().items()):
                digest.update(key.encode())
                # flat: 0-d tensors (BatchNorm's batch counter) cannot be viewed as bytes
                data = tensor.detach().to("cpu").contiguous().reshape(-1)
                digest.update(str(data.dtype).encode())
                digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
            self._digest = digest.hexdigest()
        return self._digest

    def describe(self) -> dict[str, Any]:
        """What results files record about the encoder."""
        return {
            "spec": self.name,
            "kind": self.kind,
            "arch": self.arch,
            "image_size": self.image_size,
            "feature_dim": self.feature_dim,
            "embed_dim": self.embed_dim,
            "weights_sha1": self.weights_digest(),
        }


@contextlib.contextmanager
def _without_projection(tower: nn.Module) -> Iterator[None]:
    """Run an open_clip VisionTransformer without its final ``proj`` (restored afterwards)."""
    proj = getattr(tower, "proj", None)
    if not isinstance(proj, torch.Tensor):
        yield
        return
    tower.proj = None
    try:
        yield
    finally:
        tower.proj = proj


def _square(size: Any) -> int:
    if isinstance(size, int):
        return size
    height, width = (int(v) for v in size)
    if height != width:
        raise ValueError(f"non-square input size {size} is not supported by evaluation")
    return height


def _from_timm(spec: str, kind: str, arch: str, pretrained: str | None) -> Encoder:
    """``timm:NAME[@SIZE]``: the timm tower with ``pretrained`` weights (None: random)."""
    name, _, size_text = arch.partition("@")
    if size_text and not size_text.isdigit():
        raise EncoderError(spec, f"the size {size_text!r} after @ is not a whole number")
    size = int(size_text) if size_text else None
    try:
        tower = build_timm_tower(
            ImageConfig(arch=name, pretrained=pretrained, image_size=size), None
        )
    except (PretrainedWeightsError, ConfigError) as error:
        raise EncoderError(spec, str(error)) from error
    return Encoder(
        tower.visual.eval(),
        name=spec,
        kind=kind,
        arch=arch,
        image_size=_square(tower.image_size),
        image_mean=tower.image_mean,
        image_std=tower.image_std,
        embed_dim=tower.embed_dim,
    )


def _from_open_clip_build(spec: str, kind: str, arch: str, pretrained: str | None) -> Encoder:
    if is_timm_arch(arch):
        return _from_timm(spec, kind, arch, pretrained)

    register_model_configs()
    try:
        build = build_open_clip(ImageConfig(arch=arch, pretrained=pretrained), None, False)
    except (PretrainedWeightsError, ValueError, RuntimeError, OSError) as error:
        raise EncoderError(spec, str(error)) from error
    preprocess = build.preprocess_cfg
    return Encoder(
        build.clip.visual.eval(),
        name=spec,
        kind=kind,
        arch=arch,
        image_size=_square(preprocess["size"]),
        image_mean=tuple(preprocess["mean"]),
        image_std=tuple(preprocess["std"]),
        embed_dim=int(build.open_clip_cfg["embed_dim"]),
    )


def _random(spec: str, rest: str) -> Encoder:
    prefix = TIMM_PREFIX if rest.startswith(TIMM_PREFIX) else ""
    arch, _, seed_text = rest[len(prefix) :].partition(":")
    arch = prefix + arch if arch else ""
    if not arch:
        raise EncoderError(spec, "random: needs an architecture name")
    try:
        seed = int(seed_text) if seed_text else 0
    except ValueError:
        raise EncoderError(spec, f"the seed {seed_text!r} is not an integer") from None
    # The tower's initialisation is drawn from its own seeded generator state, so the same spec
    # gives the same weights whatever ran before, and the caller's RNG is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _from_open_clip_build(spec, "random", arch, None)


def encoder_from_model(
    model: nn.Module, name: str, run_config: dict[str, Any] | None = None
) -> Encoder:
    """The :class:`Encoder` of an ``MGLLModel``'s image tower (shares its weights)."""
    return Encoder.from_tower(model.image_tower, name, "run", run_config)


def _from_run(spec: str, path: Path) -> Encoder:
    try:
        model, run_config = load_model(path)
    except (CheckpointError, ConfigError, ValueError, KeyError, OSError) as error:
        raise EncoderError(spec, str(error)) from error
    return encoder_from_model(model, spec, run_config)


def _from_export(spec: str, path: Path) -> Encoder:
    try:
        exported = load_image_encoder(path)
    except (FileNotFoundError, ValueError, KeyError, OSError) as error:
        raise EncoderError(spec, str(error)) from error
    return Encoder.from_tower(exported, spec, "export")


def _from_authors(spec: str, path: Path) -> Encoder:
    try:
        checkpoint = load_authors_checkpoint(path, "for an open_clip one use open_clip:ARCH:FILE")
        tower = authors_image_tower(checkpoint)
    except AuthorsCheckpointError as error:
        raise EncoderError(spec, str(error)) from error
    return Encoder.from_tower(tower, spec, "authors")


FINETUNE_WEIGHTS = "best.safetensors"  # what `mgll finetune` keeps: the best validation epoch


def _from_finetune(spec: str, folder: Path) -> Encoder:
    """The fine-tuned image tower of an ``mgll finetune`` output folder: the encoder it started
    from (recorded in its checkpoint) with the tower weights of ``best.safetensors``."""
    from safetensors.torch import load_file

    found = list_checkpoints(folder / "checkpoints")
    weights = folder / FINETUNE_WEIGHTS
    if not found or not weights.is_file():
        raise EncoderError(spec, f"this fine-tuning folder lacks {FINETUNE_WEIGHTS} or checkpoints")

    started_from = json.loads(read_header(found[-1][1])["config"])["encoder"]
    try:
        encoder = load_encoder(started_from)
    except EncoderError as error:
        raise EncoderError(
            spec, f"the encoder it was fine-tuned from cannot be loaded ({error.reason})"
        ) from error
    prefix = "encoder.tower."
    state = {
        k[len(prefix) :]: v for k, v in load_file(str(weights)).items() if k.startswith(prefix)
    }
    try:
        encoder.tower.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise EncoderError(spec, f"{weights} does not fit {started_from}: {error}") from error
    encoder.name, encoder.kind, encoder._digest = spec, "finetune", None
    return encoder.eval()


def _from_path(spec: str, path: Path) -> Encoder:
    if path.is_dir():
        if (path / FOLDER_SIDECAR).is_file():
            return _from_export(spec, path)
        found = sorted((path / "checkpoints").glob("step_*.safetensors"))
        found = found or sorted(path.glob("step_*.safetensors"))
        if found and file_kind(found[-1]) == "finetune":
            return _from_finetune(spec, found[-1].parent.parent)  # OUT/checkpoints/step_*
        if found or (path / "checkpoints").is_dir():
            return _from_run(spec, path)
        raise EncoderError(
            spec, "this folder holds neither checkpoints/ of a run nor an exported encoder"
        )
    if path.name.endswith(".state.pt"):
        return _from_run(spec, path)

    if is_torch_pickle(path):
        return _from_authors(spec, path)
    if path.suffix == ".safetensors":
        kind = file_kind(path)
        if kind == "finetune":
            return _from_finetune(spec, path.parent.parent)
        if kind == "pretrain":
            return _from_run(spec, path)
        sidecar = path.with_suffix(".json")
        if sidecar.is_file():
            try:
                fmt = json.loads(sidecar.read_text()).get("mgll", {}).get("format")
            except (json.JSONDecodeError, AttributeError):
                fmt = None
            if fmt is not None:
                return _from_export(spec, path)
        raise EncoderError(
            spec,
            "this .safetensors file is neither an mgll pretraining checkpoint nor an exported "
            f"encoder (no mgll sidecar {sidecar.name} beside it)",
        )
    raise EncoderError(spec, "this file is not a .safetensors checkpoint or export")


def load_encoder(spec: str | Path, device: str | torch.device = "cpu") -> Encoder:
    """Load the image encoder named by ``spec`` (see the module docstring) in eval mode.

    Raises :class:`EncoderError` naming the spec and the accepted forms when it cannot be
    loaded (a missing file, weights that cannot be downloaded offline, an unknown architecture).
    """
    text = str(spec)
    if text.startswith("random:"):
        encoder = _random(text, text[len("random:") :])
    elif text.startswith("open_clip:"):
        arch, _, tag = text[len("open_clip:") :].partition(":")
        if not arch or not tag:
            raise EncoderError(
                text, "open_clip: needs ARCH:TAG (use random:ARCH for an untrained tower)"
            )
        encoder = _from_open_clip_build(text, "open_clip", arch, tag)
    elif text.startswith("hf-hub:"):
        encoder = _from_open_clip_build(text, "open_clip", text, None)
    elif text.startswith("timm:"):
        encoder = _from_timm(text, "imagenet", text, "imagenet")
    else:
        path = Path(text).expanduser()
        if not path.exists():
            raise EncoderError(text, "no such file or folder, and not a recognised prefix")
        encoder = _from_path(text, path)
    return encoder.to(device).eval()


def text_tower_level(model: Any, level: int) -> int:
    """The text tower of a run model that embeds texts of granularity ``level``: its own when
    the model has one per level, else the only one (CLIP-style models, levels beyond the
    trained ones). Zero-shot and retrieval embed their texts through it."""
    return level if model.text_per_level and level < len(model.text_towers) else 0


def load_run_model(spec: str | Path, device: str = "auto") -> tuple[Any, dict[str, Any]]:
    """The ``MGLLModel`` (image and text towers) and run config of a pretraining run folder or
    checkpoint (``--model``) on ``device`` (``auto``: cuda when available)."""
    return load_model(spec, resolve_device(device))
