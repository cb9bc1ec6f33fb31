"""Checkpoints: model weights as safetensors, training state beside them, written atomically.

A checkpoint of step S in ``OUT/checkpoints/`` is two files:

- ``step_0000000S.safetensors``: the model's ``state_dict`` (metadata: step, epoch, the
  resolved run config as JSON and build facts such as the image tower's activation, so the
  file alone can rebuild the model);
- ``step_0000000S.state.pt``: the training state (optimizer, grad scaler, schedule position,
  step, epoch, position in the epoch, RNG states, config), saved with ``torch.save`` from
  tensors and plain Python containers only, and read back with ``weights_only=True`` so
  loading never unpickles arbitrary objects.

Each file is written to a temporary name and renamed into place; the state file is renamed
first, so a ``.safetensors`` file only exists once its checkpoint is complete.
"""

from __future__ import annotations

import json
import random
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors import torch as safetensors_torch
from torch import nn

from mgll.distributed import barrier, distributed_info, gather_objects
from mgll.errors import UserError
from mgll.io import atomic_write
from mgll.models import ModelConfig, create_model
from mgll.models.authors import is_torch_pickle
from mgll.schema import flatten

CHECKPOINT_SUBDIR = "checkpoints"
_NAME_RE = re.compile(r"^step_(\d+)\.safetensors$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, incomplete or does not fit: the message names the file."""


def weights_path(directory: Path, step: int) -> Path:
    """The weights file of the checkpoint of ``step`` in ``directory``."""
    return directory / f"step_{step:08d}.safetensors"


def state_path_for(weights: Path) -> Path:
    """The training-state file that belongs to a weights file."""
    return weights.with_name(weights.name[: -len(".safetensors")] + ".state.pt")


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``directory`` as ``(step, weights_path)``, oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _NAME_RE.match(path.name)
        if match and state_path_for(path).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def save_checkpoint(
    directory: Path,
    step: int,
    model: nn.Module,
    state: Mapping[str, Any],
    config: Mapping[str, Any],
    keep_last: int,
    extra_metadata: Mapping[str, Any] | None = None,
    kind: str = "pretrain",
) -> Path:
    """Write the checkpoint of ``step`` atomically, drop all but the newest ``keep_last``.

    ``extra_metadata``: the model's build facts (``MGLLModel.build_facts``), which
    :func:`load_model` needs to rebuild it. ``kind``: what wrote it (``pretrain``,
    ``finetune``), so a reader never takes one for the other.
    """
    directory.mkdir(parents=True, exist_ok=True)
    weights = weights_path(directory, step)
    state_file = state_path_for(weights)
    atomic_write(state_file, lambda tmp: torch.save(dict(state), tmp))
    metadata = {
        "format": "mgll-pretrain",
        "kind": kind,
        "step": str(step),
        "epoch": str(state.get("epoch", "")),
        "config": json.dumps(config),
        "extra": json.dumps(dict(extra_metadata or {})),
    }
    atomic_write(
        weights,
        lambda tmp: safetensors_torch.save_model(
            model, str(tmp), metadata=metadata, force_contiguous=True
        ),
    )
    for old_step, old_weights in list_checkpoints(directory)[:-keep_last]:
        if old_step == step:
            continue
        old_weights.unlink()  # the weights go first: without them the pair is not a checkpoint
        state_path_for(old_weights).unlink(missing_ok=True)
    return weights


def resolve_checkpoint(spec: str | Path, output_dir: Path | None = None) -> Path:
    """Turn ``latest``, a run folder, a checkpoints folder or a file into a weights path."""
    if str(spec) == "latest":
        if output_dir is None:
            raise CheckpointError("'latest' needs the run's output folder")
        spec = output_dir / CHECKPOINT_SUBDIR
        if not spec.is_dir():
            raise CheckpointError(
                f"no complete checkpoint to resume: {spec} does not exist (drop --resume to "
                "start a new run)"
            )
    path = Path(spec)
    if path.is_dir():
        folder = path / CHECKPOINT_SUBDIR if (path / CHECKPOINT_SUBDIR).is_dir() else path
        found = list_checkpoints(folder)
        if not found:
            raise CheckpointError(
                f"no complete checkpoint (step_*.safetensors with its .state.pt) in {folder}"
            )
        return found[-1][1]
    if path.name.endswith(".state.pt"):
        path = path.with_name(path.name[: -len(".state.pt")] + ".safetensors")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path


def _unreadable(path: Path, err: Exception) -> CheckpointError:
    return CheckpointError(
        f"{path} cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:200]}); it is "
        "damaged or was not written by mgll pretrain: use an older checkpoint of the run (its "
        "step_*.safetensors)"
    )


def read_header(weights: Path) -> dict[str, str]:
    """The metadata in a ``.safetensors`` file's header (empty when it has none): the one
    reader of a checkpoint's header. A file safetensors cannot open is refused naming it."""
    try:
        with safe_open(str(weights), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise _unreadable(weights, err) from err


def read_metadata(weights: Path) -> dict[str, Any]:
    """The step, epoch and run config stored in a checkpoint's safetensors header."""
    try:
        meta = read_header(weights)
    except CheckpointError as err:
        if is_torch_pickle(weights):  # e.g. one of the authors' checkpoint-*.pth files
            raise CheckpointError(
                f"{weights} is a PyTorch file, not an mgll pretraining checkpoint: the authors' "
                "released checkpoints are image encoders here (--encoder of probe, finetune and "
                "segment; mgll export --format open_clip or hf-clip-vision), not whole models"
            ) from err
        raise
    if meta.get("format") != "mgll-pretrain" or "config" not in meta:
        raise CheckpointError(
            f"{weights} is not an mgll pretraining checkpoint (no run config in its metadata)"
        )
    kind = checkpoint_kind(meta)
    if kind != "pretrain":
        raise CheckpointError(
            f"{weights} is a {kind} checkpoint, not a pretraining run's: give its folder as "
            "--encoder of mgll probe/finetune (the fine-tuned image tower), or give a "
            "pretraining run here"
        )
    return {
        "step": int(meta["step"]),
        "config": json.loads(meta["config"]),
        "extra": json.loads(meta.get("extra", "{}")),
    }


def checkpoint_kind(metadata: Mapping[str, str]) -> str:
    """What wrote a checkpoint, from its safetensors header: ``kind`` when stamped; before
    stamping, fine-tuning's run config was the only one with a ``protocol`` key."""
    if "kind" in metadata:
        return metadata["kind"]
    config = json.loads(metadata.get("config", "{}"))
    return "finetune" if config.get("protocol") == "finetune" else "pretrain"


def file_kind(path: Path) -> str | None:
    """What wrote the mgll checkpoint ``path`` (``pretrain``, ``finetune``, ``segment`` ...);
    None when it is not one (another safetensors file, or not a safetensors file at all)."""
    try:
        meta = read_header(path)
    except CheckpointError:
        return None
    return checkpoint_kind(meta) if meta.get("format") == "mgll-pretrain" else None


def load_weights(model: nn.Module, weights: Path) -> None:
    """Load a checkpoint's weights into ``model`` (strict: every key must match)."""
    try:
        missing, unexpected = safetensors_torch.load_model(model, str(weights), strict=False)
    except (SafetensorError, OSError) as err:
        raise _unreadable(weights, err) from err
    except RuntimeError as err:  # a tensor of another shape
        raise CheckpointError(
            f"{weights} does not fit the model built from the config: {err}"
        ) from err
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not fit the model built from the config: missing keys "
            f"{sorted(missing)[:5]}, unexpected keys {sorted(unexpected)[:5]}"
        )


def load_model(
    checkpoint: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict]:
    """Rebuild the ``MGLLModel`` of a pretraining checkpoint and load its weights.

    ``checkpoint`` is a ``step_*.safetensors`` file, a run folder or its ``checkpoints`` folder
    (the newest checkpoint is used). Returns the model in eval mode and the run config as
    saved in the checkpoint (a plain dict). This is the one way every consumer (export,
    evaluation, transfer) reads a pretrained run.
    """
    # here, not at the top: fine-tuning and segmentation read checkpoints without loading the
    # pretraining config (tests/test_import_graph.py); only reading a pretraining run needs it
    from mgll.training.config import migrate

    weights = resolve_checkpoint(checkpoint)
    meta = read_metadata(weights)
    model_cfg = ModelConfig.from_dict(migrate(meta["config"])["model"]).resolved()
    # The checkpoint holds every weight: nothing pretrained is fetched; the model's build
    # facts (saved beside the weights) pin what those weights had implied.
    model_cfg = model_cfg.for_rebuild(meta["extra"])
    model = create_model(model_cfg)
    load_weights(model, weights)
    # Where the pretrained start came from stays on record (exports, model cards).
    model.image_tower.weights_source = meta["extra"].get("image.weights")
    return model.to(device).eval(), meta["config"]


STATE_KEYS = ("step", "epoch", "epoch_step", "optimizer", "scaler", "rng", "config")


def load_state(weights: Path) -> dict[str, Any]:
    """Read the training state that belongs to a weights file (no arbitrary unpickling)."""
    path = state_path_for(weights)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {weights} cannot be resumed without it")
    try:
        # weights_only: tensors and plain containers only; anything else is refused, not run.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError (zip), EOFError, ...
        raise _unreadable(path, err) from err
    missing = [key for key in STATE_KEYS if key not in state] if isinstance(state, dict) else []
    if not isinstance(state, dict) or missing:
        raise CheckpointError(f"{path} is not an mgll training state (missing {missing})")
    return state


# --------------------------------------------------------------------------------------------
# A run's state: what both training engines save and resume through
# --------------------------------------------------------------------------------------------


def save_run_state(
    directory: Path,
    step: int,
    model: nn.Module,
    state: Mapping[str, Any],
    config: Mapping[str, Any],
    *,
    kind: str,
    keep_last: int,
    build_facts: Mapping[str, Any] | None = None,
) -> Path:
    """Checkpoint a run at ``step``: every rank calls this. Each rank's RNG state is gathered
    into the state's ``rng`` (a resume gives each rank its own back), rank 0 writes, and all
    wait for it. Returns the weights path (on every rank)."""
    rng = gather_objects(capture_rng_state())
    if distributed_info().is_main:
        saved = {**state, "rng": rng}
        save_checkpoint(directory, step, model, saved, config, keep_last, build_facts, kind)
    barrier()
    return weights_path(directory, step)


def load_run_state(
    weights: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    *,
    kind: str,
    config: Mapping[str, Any],
    rank: int = 0,
    noun: str = "config",
    free_keys: Sequence[str] = (),
    read_config: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Resume a run of ``kind`` from ``weights``: weights, optimizer, loss scaler (when it
    saved one) and this rank's RNG state; returns the saved state (position and the engine's
    own keys). Nothing in the run folder changes here.

    Refuses a checkpoint another kind of run wrote. Warns (rank 0) naming the keys of the
    saved config that ``config`` changes (``read_config`` first brings a config an older mgll
    saved up to date; ``free_keys``: prefixes that may change without changing what the run
    computes); ``noun`` is what the engine calls its config (``config``, ``settings``).
    """
    saved = load_state(weights)
    found = checkpoint_kind(read_header(weights))
    if found != kind:
        raise CheckpointError(
            f"{weights} is a {found} checkpoint; resume it with its own command (this run "
            f"writes {kind} checkpoints)"
        )
    old = read_config(saved["config"]) if read_config is not None else saved["config"]
    changed = config_changes(old, config, free_keys)
    if changed and rank == 0:
        differ = "a config that differs" if noun == "config" else f"{noun} that differ"
        print(
            f"warning: resuming {weights} with {differ} in: {', '.join(changed)}", file=sys.stderr
        )
    load_weights(model, weights)
    try:
        optimizer.load_state_dict(saved["optimizer"])
    except ValueError as err:  # parameter groups of another model or optimizer setup
        raise CheckpointError(
            f"{state_path_for(weights)}: its optimizer state does not fit this model ({err}); "
            f"resume with the {noun} the run was started with"
        ) from err
    if saved["scaler"]:  # empty when saved without fp16 loss scaling: start a fresh one
        scaler.load_state_dict(saved["scaler"])
    rng = saved["rng"]  # one state per rank (a single dict before the epoch engine existed)
    restore_rng_state(rng if isinstance(rng, dict) else rng[rank if rank < len(rng) else 0])
    return saved


def config_changes(
    old: Mapping[str, Any], new: Mapping[str, Any], free_keys: Sequence[str] = ()
) -> list[str]:
    """Dotted keys of a checkpoint's config ``old`` whose value ``new`` changes, sorted. Keys
    ``old`` lacks were not recorded by the mgll that wrote it; keys starting with one of
    ``free_keys`` may change without changing what the run computes."""
    a, b = flatten(old), flatten(new)
    return [
        key
        for key in sorted(a)
        if key in b and _plain(a[key]) != _plain(b[key]) and not key.startswith(tuple(free_keys))
    ]


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# --------------------------------------------------------------------------------------------
# RNG states as tensors and plain containers (what weights_only loading accepts)
# --------------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU (and CUDA) generator states."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
