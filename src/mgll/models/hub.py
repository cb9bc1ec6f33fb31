"""Whole-model folders written by ``save_pretrained``, with a model card.

A folder written by :func:`save_pretrained` holds

- ``config.json``: the run config (its ``model`` section rebuilds the towers; ``data``, ``loss``
  and ``train`` say how the weights were made), the number of text towers and the resolved
  image activation, so the folder alone rebuilds the model;
- ``model.safetensors``: the ``MGLLModel`` state dict;
- ``README.md``: a Hugging Face model card (training data, config, metrics of the run, intended
  use and the "not for clinical use" note).

:func:`mgll.models.factory.from_pretrained` (``mgll.from_pretrained``) reads it back: a
folder in, a model out, beside ``create_model``, so this module never imports the factory
(the model's ``save_pretrained`` calls this module). The text tower of an ``hf`` type is
rebuilt from its named Hugging Face model (tokenizer and architecture) and then receives the
saved weights, so that model must be available (installed, cached or on the Hub) where the
folder is loaded.
``mgll export RUN --format mgll-pretrained --output-dir DIR`` writes a run's folder.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import save_model

from mgll.errors import ModelFileError
from mgll.io import give_usual_modes
from mgll.models.config import ModelConfig
from mgll.schema import flatten, to_dict

FORMAT_NAME = "mgll-pretrained"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
NOT_FOR_CLINICAL_USE = (
    "**Not for clinical use.** This model is a research artefact: it has not been validated "
    "for diagnosis, triage or any decision about a patient, and it inherits the biases and "
    "label noise of its (small, public) training data."
)


def write_folder(output_dir: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Create ``output_dir`` through ``write(temporary folder)``, then rename it into place.

    A failure leaves no half-written folder. An existing non-empty ``output_dir`` is refused
    (ModelFileError) rather than mixed with the new files.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise ModelFileError(f"--output-dir: {output_dir} exists and is not an empty folder")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_dir.with_name(f".{output_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        give_usual_modes(tmp)
        if output_dir.exists():
            output_dir.rmdir()
        tmp.rename(output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output_dir


def _model_section(model: Any, run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``model`` config that rebuilds ``model`` without fetching pretrained image weights."""
    section = ModelConfig.from_dict(run_config.get("model", run_config))
    return to_dict(section.for_rebuild(model.build_facts()))


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _weights_line(model: Any) -> list[str]:
    """The card's line on where the image tower's pretrained start came from (if known)."""
    weights = model.build_facts().get("image.weights")
    if not weights:
        return []
    digest = f", sha256 `{weights['sha256']}`" if weights.get("sha256") else ""
    return [f"- Image tower started from `{weights['source']}` (`{weights['file']}`{digest})"]


def model_card(
    model: Any, run_config: Mapping[str, Any], metrics: Mapping[str, Any] | None = None
) -> str:
    """A Hugging Face model card (YAML front matter + Markdown) for ``model``."""
    data = run_config.get("data", {}) or {}
    loss = run_config.get("loss", {}) or {}
    train = run_config.get("train", {}) or {}
    section = _model_section(model, run_config)
    text = section.get("text", {})
    source = data.get("source") or data.get("path") or "unknown"
    lines = [
        "---",
        "library_name: mgll",
        "tags: [mgll, clip, medical-imaging, vision-language, contrastive-learning]",
        "pipeline_tag: zero-shot-image-classification",
        "---",
        "",
        f"# MGLL image-text model ({section['image'].get('arch')})",
        "",
        "A dual image-text encoder pretrained with "
        f"{'MGLL (multi-granular language learning)' if loss.get('name') == 'mgll' else loss.get('name', '?') + ' loss'} "  # noqa: E501
        "with the `mgll` library.",
        "",
        NOT_FOR_CLINICAL_USE,
        "",
        "## Model",
        "",
        f"- Image tower: open_clip `{section['image'].get('arch')}`, input "
        f"{model.image_size} px, mean {list(model.image_mean)}, std {list(model.image_std)}",
        *_weights_line(model),
        f"- Text tower: `{text.get('type', 'open_clip')}`"
        + (f" (`{text['name']}`)" if text.get("name") else "")
        + f", {len(model.text_towers)} tower(s)",
        f"- Embedding size: {model.embed_dim}",
        f"- Parameters: {sum(p.numel() for p in model.parameters()):,}",
        "",
        "## Training data",
        "",
        f"- Dataset: `{source}` (folder `{data.get('path')}`), granularity levels: "
        f"{data.get('levels') or 'all the adapter provides'}",
        f"- Split: {json.dumps(data.get('split'))} (patient-level; test patients are never "
        "trained on)",
        "",
        "## Training configuration",
        "",
        f"- Loss: `{loss.get('name')}`, weights {json.dumps(loss.get('weights'))}",
        f"- Epochs {train.get('epochs')}, batch size {train.get('batch_size')}, lr "
        f"{train.get('lr')}, weight decay {train.get('weight_decay')}, precision "
        f"{train.get('precision')}, seed {train.get('seed')}",
        f"- The full run config is in `{CONFIG_FILE}` (`run_config`).",
        "",
        "## Metrics",
        "",
    ]
    if metrics:
        split = metrics.get("split", "val")
        lines += [f"Last validation of the run ({split} split, step {metrics.get('step')}):", ""]
        lines += ["| metric | value |", "| --- | --- |"]
        skip = {"kind", "split", "step", "epoch"}
        lines += [f"| {k} | {_fmt(v)} |" for k, v in flatten(metrics, "/").items() if k not in skip]
    else:
        lines.append("No validation metrics were recorded for this run.")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import mgll",
        'model = mgll.from_pretrained("THIS_FOLDER")',
        "image_emb = model.encode_image(images)  # (N, 3, H, W) normalised with the mean/std above",
        'text_emb = model.encode_text(["ground-glass opacity"])',
        "```",
        "",
    ]
    return "\n".join(lines)


def save_pretrained(
    model: Any,
    directory: str | os.PathLike,
    run_config: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` (an ``MGLLModel``) as a folder that :func:`from_pretrained` reads.

    ``run_config`` is the run's config (or just its ``model`` section); a model loaded with
    :func:`from_pretrained` remembers its own, so it can be re-saved without one. ``metrics``
    (e.g. the run's last validation row) go into the model card.
    """
    run_config = run_config if run_config is not None else getattr(model, "run_config", None)
    if run_config is None:
        raise ValueError(
            "save_pretrained needs the run config (run_config=...); mgll.training.checkpoint."
            "load_model returns it beside the model"
        )
    config = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "model": _model_section(model, run_config),
        "run_config": dict(run_config),
        "metrics": dict(metrics or {}),
    }
    card = model_card(model, run_config, metrics)

    def write(folder: Path) -> None:
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str) + "\n")
        save_model(model, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
        (folder / CARD_FILE).write_text(card)

    return write_folder(directory, write)


def push_to_hub(directory: str | os.PathLike, repo_id: str, private: bool = True) -> str:
    """Upload a saved folder to the Hugging Face Hub (needs network and a login token)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(directory), repo_id=repo_id)
    return str(info)
