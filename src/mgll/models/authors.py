"""The authors' released MGLL checkpoints (HUANGLIZI/MGLL), read safely and as they are.

Their training scripts save ``torch.save({'model', 'optimizer', 'epoch', 'scaler', 'args'})``
(``util/misc.py`` ``save_model``), ``args`` being the run's ``argparse.Namespace``. ``model`` is
the state dict of their pretraining module: ``clip.*`` is an open_clip ``ViT-L-14`` built with
``force_custom_text=True`` (``clip.visual.*``: the image tower, 296 tensors; ``clip.text.*``: its
text tower; ``clip.logit_scale``), beside ``logit_scale`` and, depending on the variant,
``text_model.*`` (Bio_ClinicalBERT and its projection), ``text2visual.*`` and ``visual2text.*``.
A file re-saved from a ``DistributedDataParallel`` model carries ``module.`` before every key.

Files are recognised by what they hold, never by their name, and read with
``torch.load(weights_only=True)`` allowing ``argparse.Namespace`` and nothing else: a file that
needs any other object (a booby-trapped pickle whose ``__reduce__`` calls ``os.system``) is
refused before anything in it runs.

The image tower is open_clip's ``ViT-L-14`` with exact GELU (not the QuickGELU variant):
open_clip >= 2.29 builds GELU for ``ViT-L-14`` even with OpenAI weights, and so did their runs.
Their pretraining normalised with the ImageNet mean/std (images at 512 px, resized to 224 inside
the model); features are therefore taken at 224 px with ImageNet mean/std (see docs/models.md,
"The authors' checkpoints", for where their fine-tuning differs).
"""

from __future__ import annotations

import argparse
import dataclasses
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from open_clip.transform import PreprocessCfg
from torch import nn

from mgll.errors import UserError

AUTHORS_ARCH = "ViT-L-14"
IMAGE_SIZE = 224
# Their pretraining transforms (main_pretrain.py): what the tower's features expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# (Their downstream fine-tuning, main_finetune.py, used 0.5 / 0.5: see docs/models.md.)

VISUAL_PREFIX = "clip.visual."
DDP_PREFIX = "module."
# The only class (besides tensors and plain containers) a checkpoint may ask for.
ALLOWED_GLOBALS = (argparse.Namespace,)
# The parts of their model a checkpoint may hold, by key prefix (reported, not all used).
PARTS = ("clip.visual", "clip.text", "text_model", "text2visual", "visual2text")
# open_clip's CLIP keeps these text modules at the top; CustomTextCLIP (theirs) under ``text.``.
_CLIP_TEXT_MODULES = ("token_embedding", "positional_embedding", "transformer", "ln_final",
                      "text_projection", "attn_mask")  # fmt: skip


class AuthorsCheckpointError(UserError, ValueError):
    """A PyTorch checkpoint that was refused or cannot be read; the message names the file."""


def is_torch_pickle(path: str | Path) -> bool:
    """Whether ``path`` holds a ``torch.save`` file (a zip archive with a ``data.pkl`` member,
    or a legacy pickle stream), judged from its content, not its name. A zip archive too
    damaged to list (a cut download) counts, so that reading it reports the damage."""
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as handle:
        head = handle.read(2)
    if head == b"PK":
        try:
            with zipfile.ZipFile(path) as archive:
                return any(name.endswith("data.pkl") for name in archive.namelist())
        except zipfile.BadZipFile:
            return True
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5  # pickle protocol 2-5


def _refusal_reason(error: Exception) -> str | None:
    """What the file asked for, from torch's weights-only error; None when the error is not a
    refusal (a cut pickle stream raises the same exception type)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        match = re.search(r"GLOBAL (\S+)", line)
        if match:
            return f"the Python object {match.group(1)}"
    for line in lines:
        if "Unsupported" in line:
            return line.rstrip(".")
    return None


def safe_load(path: str | Path) -> Any:
    """Read a ``torch.save`` file without running anything stored in it.

    ``torch.load(weights_only=True)`` with ``argparse.Namespace`` allowed for this call only;
    zip archives are memory-mapped, so tensors nobody uses (an optimizer's state) cost nothing.
    Raises :class:`AuthorsCheckpointError` naming the file when it is refused or unreadable.
    """
    path = Path(path)
    mmap = zipfile.is_zipfile(path)  # legacy (non-zip) files cannot be memory-mapped
    try:
        with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        reason = _refusal_reason(error)
        if reason is None:
            raise _damaged(path, error) from error
        raise AuthorsCheckpointError(
            f"{path}: refused: reading it would need {reason}, and mgll reads "
            "PyTorch files with torch.load(weights_only=True) allowing only tensors, plain "
            "containers and argparse.Namespace, so nothing stored in a file can run; convert "
            "the weights to safetensors where you trust the file, or use another copy"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise _damaged(path, error) from error


def _damaged(path: Path, error: Exception) -> AuthorsCheckpointError:
    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
    return AuthorsCheckpointError(
        f"{path}: cannot be read as a PyTorch checkpoint ({type(error).__name__}: {first}); "
        "the file is truncated or damaged: download it again"
    )


@dataclass
class AuthorsCheckpoint:
    """The weights of one of the authors' checkpoints, ``module.`` prefixes removed."""

    path: Path
    state: dict[str, torch.Tensor]
    epoch: int | None
    args: dict[str, Any]

    @property
    def parts(self) -> list[str]:
        """Which of :data:`PARTS` the checkpoint holds (e.g. ``clip.text`` or ``text_model``)."""
        return [p for p in PARTS if any(k.startswith(p + ".") for k in self.state)]

    def visual_state(self) -> dict[str, torch.Tensor]:
        """The image tower's tensors, keyed as open_clip's ``VisionTransformer``."""
        n = len(VISUAL_PREFIX)
        return {k[n:]: v for k, v in self.state.items() if k.startswith(VISUAL_PREFIX)}

    def clip_state(self, clip: nn.Module) -> dict[str, torch.Tensor]:
        """The ``clip.*`` tensors keyed for the open_clip model ``clip``.

        Theirs is a ``CustomTextCLIP`` (text under ``text.``); a plain ``CLIP`` keeps the same
        text modules at the top level, so the prefix is dropped for it.
        """
        state = {k[len("clip.") :]: v for k, v in self.state.items() if k.startswith("clip.")}
        if hasattr(clip, "text"):
            return state
        flat = {}
        for key, value in state.items():
            rest = key[len("text.") :] if key.startswith("text.") else None
            if rest is not None and rest.split(".")[0] in _CLIP_TEXT_MODULES:
                key = rest
            flat[key] = value
        return flat


def preprocess_cfg() -> dict[str, Any]:
    """open_clip's preprocessing settings for the authors' tower: 224 px, ImageNet mean/std."""
    return dataclasses.asdict(PreprocessCfg(size=IMAGE_SIZE, mean=IMAGENET_MEAN, std=IMAGENET_STD))


def _model_state(content: Any) -> dict[str, torch.Tensor] | None:
    """The model state dict of a loaded file if it is in the authors' layout, else None."""
    state = content.get("model") if isinstance(content, dict) and "model" in content else content
    if not isinstance(state, dict):
        return None
    state = {
        (k[len(DDP_PREFIX) :] if isinstance(k, str) and k.startswith(DDP_PREFIX) else k): v
        for k, v in state.items()
    }
    if not any(isinstance(k, str) and k.startswith(VISUAL_PREFIX) for k in state):
        return None
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def read_authors_checkpoint(path: str | Path) -> AuthorsCheckpoint | None:
    """The authors' checkpoint in ``path``, or None for a PyTorch file in another layout.

    Refused and unreadable files raise :class:`AuthorsCheckpointError` (see :func:`safe_load`).
    """
    path = Path(path)
    content = safe_load(path)
    state = _model_state(content)
    if state is None:
        return None
    meta = content if isinstance(content, dict) else {}
    args = meta.get("args")
    epoch = meta.get("epoch")
    return AuthorsCheckpoint(
        path=path,
        state=state,
        epoch=int(epoch) if isinstance(epoch, int) else None,
        args=dict(vars(args)) if isinstance(args, argparse.Namespace) else {},
    )


def load_authors_checkpoint(path: str | Path, instead: str) -> AuthorsCheckpoint:
    """:func:`read_authors_checkpoint` for callers that take nothing else: a PyTorch file in
    another layout is an :class:`AuthorsCheckpointError` ending with ``instead`` (what to use)."""
    checkpoint = read_authors_checkpoint(path)
    if checkpoint is None:
        raise AuthorsCheckpointError(
            f"{path}: a PyTorch file, but not in the authors' MGLL layout (a 'model' state dict "
            f"with clip.visual.* keys, as saved by HUANGLIZI/MGLL); {instead}"
        )
    return checkpoint
