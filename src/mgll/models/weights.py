"""Where pretrained weights come from, and clear failures when they cannot be had.

A weights source in a config is one of: an open_clip pretrained tag of the architecture
(``openai``), a Hugging Face Hub id (``hf-hub:org/repo`` or ``hf-hub:org/repo/file``), or a
local checkpoint file or folder. Downloads go through open_clip / huggingface_hub, so a
connected machine caches them as usual; offline, the error says which weights and what to do.
"""

from __future__ import annotations

from pathlib import Path

import open_clip

from mgll.errors import UserError

HF_HUB_PREFIX = "hf-hub:"

# open_clip's own preference when a folder holds several checkpoints, safetensors first.
CHECKPOINT_NAMES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "model.safetensors",
    "open_clip_pytorch_model.bin",
    "pytorch_model.bin",
    "model.pt",
    "model.pth",
)
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class PretrainedWeightsError(UserError, RuntimeError):
    """Pretrained weights named in a config could not be found, downloaded or loaded."""


def offline_hint(what: str) -> str:
    """The advice appended to every 'weights unavailable' error."""
    return (
        f"If this machine has no internet access, download {what} on a connected machine "
        "(it lands in the Hugging Face / open_clip cache, ~/.cache/huggingface) and copy the "
        "cache here, or point the config at a local path instead."
    )


def find_checkpoint_in_dir(folder: Path) -> Path:
    """The checkpoint file inside ``folder`` (well-known names first, then any weights file)."""
    for name in CHECKPOINT_NAMES:
        if (folder / name).is_file():
            return folder / name
    candidates = sorted(
        (p for p in folder.iterdir() if p.suffix in CHECKPOINT_SUFFIXES),
        key=lambda p: (p.suffix != ".safetensors", p.name),
    )
    if not candidates:
        raise PretrainedWeightsError(
            f"{folder}: no checkpoint file in this folder (looked for "
            f"{', '.join(CHECKPOINT_NAMES)} or any *{'/*'.join(CHECKPOINT_SUFFIXES)}). "
            "Point the config at the checkpoint file."
        )
    return candidates[0]


def resolve_image_weights(arch: str, source: str, field: str) -> tuple[str | None, Path | None]:
    """Split an image-tower weights source into (open_clip tag, local checkpoint file).

    Hub ids are downloaded here (through open_clip's helper) so that the caller only ever sees
    a tag or a file. ``field`` is the config key, used in error messages.
    """
    if source.startswith(HF_HUB_PREFIX):
        return None, _download_hub_checkpoint(source[len(HF_HUB_PREFIX) :], field)
    path = Path(source).expanduser()
    if path.is_file():
        return None, path
    if path.is_dir():
        return None, find_checkpoint_in_dir(path)
    if open_clip.get_pretrained_cfg(arch, source):
        return source, None
    tags = open_clip.list_pretrained_tags_by_model(arch)
    raise PretrainedWeightsError(
        f"{field}: {source!r} is neither an existing local file/folder nor a pretrained tag of "
        f"open_clip architecture {arch!r} (its tags: {', '.join(tags) if tags else 'none'}). "
        "Give the path of a checkpoint (.safetensors/.pt/.bin, or a folder holding one), an "
        "'hf-hub:org/repo' id, or one of the tags."
    )


def _download_hub_checkpoint(hub_id: str, field: str) -> Path:
    parts = hub_id.split("/", 2)
    repo_id, filename = "/".join(parts[:2]), (parts[2] if len(parts) > 2 else "")
    try:
        if filename:
            file = open_clip.pretrained.download_pretrained_from_hf(repo_id, filename=filename)
        else:
            file = open_clip.pretrained.download_pretrained_from_hf(repo_id)
    except Exception as error:
        raise PretrainedWeightsError(
            f"{field}: could not fetch weights 'hf-hub:{hub_id}' ({error}). "
            + offline_hint(f"'hf-hub:{hub_id}'")
        ) from error
    return Path(file)


def download_failure(arch: str, tag: str, field: str, error: Exception) -> PretrainedWeightsError:
    """The error raised when open_clip cannot download the weights of a pretrained tag."""
    return PretrainedWeightsError(
        f"{field}: could not download the open_clip weights {arch!r} pretrained={tag!r} "
        f"({error}). "
        + offline_hint(f"them (open_clip.create_model({arch!r}, pretrained={tag!r}))")
        + " A local path given as pretrained must be a checkpoint file or a folder holding one."
    )
