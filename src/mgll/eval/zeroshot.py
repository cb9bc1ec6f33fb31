"""``mgll zeroshot``: classify with the text tower, no training (CLIP's zero-shot protocol).

Each class gets a prompt ensemble; its text embedding is the mean of the L2-normalised prompt
embeddings, normalised again (CLIP's prompt ensembling). Images are embedded with the image
tower's projected output, normalised, and compared by cosine similarity times the model's
logit scale:

- binary / multi-class: softmax over the class prompts gives the class probabilities;
- multi-label: each label has a positive and a negative prompt set (``{}`` and ``no {}`` in the
  templates) and the label's score is the softmax probability of the positive one.

Prompts, by default: the texts the dataset itself attaches to single-class records of the level
in the *training* split (e.g. "A fundus photograph with a mild cataract." for CSDI), when every
class has between 1 and :data:`MAX_DATA_PROMPTS` distinct such texts (they are then templated
class prompts, the ones an MGLL model was pretrained with); otherwise :data:`DEFAULT_TEMPLATES`
filled with the class name. ``--template`` (repeatable) and ``--prompts FILE`` (JSON
``{class: [prompt, ...]}``) override them.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mgll.eval.data import TaskError

DEFAULT_TEMPLATES = (
    "{}.",
    "an image showing {}.",
    "a medical image of {}.",
    "a photo showing {}.",
)
NEGATIVE_FORM = "no {}"
MAX_DATA_PROMPTS = 10


def data_prompts(data: Any) -> dict[str, list[str]] | None:
    """Per class, the distinct texts of the training records of that single class at the level
    (None when some class has none or more than :data:`MAX_DATA_PROMPTS`)."""
    names = [lv.name for lv in data.records.levels]
    g = names.index(data.task.level)
    found: dict[str, set[str]] = {c: set() for c in data.task.classes}
    for i in data.rows["train"]:
        record = data.records.records[int(i)]
        positive = [data.task.classes[c] for c in np.flatnonzero(data.y[int(i)])]
        if len(positive) == 1:
            found[positive[0]].update(record.texts[g])
    if any(not 1 <= len(t) <= MAX_DATA_PROMPTS for t in found.values()):
        return None
    return {c: sorted(t) for c, t in found.items()}


def class_prompts(
    data: Any,
    templates: Sequence[str] | None = None,
    prompts: Mapping[str, Sequence[str]] | None = None,
) -> tuple[dict[str, list[str]], dict[str, list[str]] | None, str]:
    """(positive prompts per class, negative prompts per class for multi-label, source)."""
    classes = data.task.classes
    multilabel = data.task.type == "multilabel"
    if prompts is not None:
        missing = [c for c in classes if c not in prompts]
        if missing:
            raise TaskError(f"--prompts: no prompts for class(es) {missing}")
        positive = {c: list(prompts[c]) for c in classes}
        source = "user prompts"
    elif templates:
        positive = {c: [t.format(c) for t in templates] for c in classes}
        source = "user templates"
    else:
        from_data = None if multilabel else data_prompts(data)
        if from_data is not None:
            positive, source = from_data, "the dataset's class texts (training split)"
        else:
            positive = {c: [t.format(c) for t in DEFAULT_TEMPLATES] for c in classes}
            source = "default templates"
    negative = None
    if multilabel:
        used = list(templates) if templates else list(DEFAULT_TEMPLATES)
        negative = {c: [t.format(NEGATIVE_FORM.format(c)) for t in used] for c in classes}
    return positive, negative, source


def text_tower_level(model: Any, level: int) -> int:
    """The text tower that embeds texts of granularity ``level``: its own when the model has
    one per level, else the only one (CLIP-style models, levels beyond the trained ones)."""
    return level if model.text_per_level and level < len(model.text_towers) else 0


def text_embeddings(
    model: Any, prompts: Mapping[str, Sequence[str]], classes: Sequence[str], level: int
) -> torch.Tensor:
    """(C, D) normalised class embeddings: mean of each class's normalised prompt embeddings."""
    tower_level = text_tower_level(model, level)
    rows = []
    with torch.no_grad():
        for c in classes:
            emb = model.encode_text(list(prompts[c]), level=tower_level).float()
            emb = torch.nn.functional.normalize(emb, dim=-1).mean(0)
            rows.append(torch.nn.functional.normalize(emb, dim=-1))
    return torch.stack(rows)


def zero_shot_scores(
    image_emb: np.ndarray,
    positive: torch.Tensor,
    negative: torch.Tensor | None,
    logit_scale: float,
) -> np.ndarray:
    """Class scores from image embeddings (see module docstring)."""
    images = torch.nn.functional.normalize(torch.from_numpy(image_emb).float(), dim=-1)
    scale = float(np.exp(logit_scale))
    pos = scale * images @ positive.cpu().T
    if negative is None:
        return pos.softmax(dim=1).numpy()
    neg = scale * images @ negative.cpu().T
    return torch.stack([pos, neg], dim=-1).softmax(dim=-1)[..., 0].numpy()


def projected_features(
    model: Any,
    data: Any,
    *,
    name: str,
    run_config: dict[str, Any] | None = None,
    cache_dir: str | Path | bool | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    precision: str = "fp32",
    progress: bool = True,
) -> tuple[Any, Any]:
    """``model`` (an ``MGLLModel``, put in eval mode) as an encoder and its projected image
    embeddings of every record of ``data``: what zero-shot and retrieval compare texts with."""
    from mgll.eval.encoders import encoder_from_model
    from mgll.eval.features import extract_features

    encoder = encoder_from_model(model.eval(), name, run_config)
    features = extract_features(
        encoder,
        data.records,
        data.folder,
        projected=True,
        batch_size=batch_size,
        num_workers=num_workers,
        cache_dir=cache_dir,
        precision=precision,
        progress=progress,
    )
    return encoder, features


def zero_shot(
    model: Any,
    data: Any,
    output_dir: str | Path,
    *,
    name: str,
    run_config: dict[str, Any] | None = None,
    templates: Sequence[str] | None = None,
    prompts: Mapping[str, Sequence[str]] | None = None,
    seed: int = 0,
    n_resamples: int = 1000,
    cache_dir: str | Path | bool | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    precision: str = "fp32",
    progress: bool = True,
) -> dict[str, Any]:
    """Zero-shot classification of ``data``'s test split by ``model`` (an ``MGLLModel``);
    writes the output folder (same layout as the probe) and returns results.json's dict."""
    from mgll.eval.results import write_classification_outputs

    encoder, features = projected_features(
        model,
        data,
        name=name,
        run_config=run_config,
        cache_dir=cache_dir,
        batch_size=batch_size,
        num_workers=num_workers,
        precision=precision,
        progress=progress,
    )
    bad = features.unreadable
    rows = {k: v[~bad[v]] for k, v in data.rows.items()}
    positive, negative, source = class_prompts(data, templates, prompts)
    level = [lv.name for lv in data.records.levels].index(data.task.level)
    classes = data.task.classes
    pos_emb = text_embeddings(model, positive, classes, level)
    neg_emb = text_embeddings(model, negative, classes, level) if negative else None
    scale = float(model.logit_scale.detach())

    def scores(split: str) -> np.ndarray:
        return zero_shot_scores(features.features[rows[split]], pos_emb, neg_emb, scale)

    details = {
        "prompt_source": source,
        "prompts": positive,
        "negative_prompts": negative,
        "scale": float(np.exp(scale)),
        "features": "projected image embedding, L2-normalised",
    }
    return write_classification_outputs(
        output_dir,
        data,
        rows["test"],
        scores("test"),
        val_rows=rows["val"] if len(rows["val"]) else None,
        val_scores=scores("val") if len(rows["val"]) else None,
        protocol="zeroshot",
        encoder=encoder.describe(),
        details=details,
        seed=seed,
        n_resamples=n_resamples,
        notes=[f"{int(bad.sum())} unreadable image(s) left out"] if bad.any() else [],
        progress=progress,
    )


def load_prompts_file(path: str | Path) -> dict[str, list[str]]:
    """``--prompts FILE``: JSON ``{class: [prompt, ...]}`` (a single string is one prompt)."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise TaskError(f"--prompts {path}: cannot read it as JSON ({error})") from None
    if not isinstance(raw, dict):
        raise TaskError(f"--prompts {path}: expected an object {{class: [prompts]}}")
    return {str(k): [v] if isinstance(v, str) else [str(p) for p in v] for k, v in raw.items()}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model`` (a pretraining run folder or checkpoint)."""
    parser.add_argument(
        "--model",
        required=True,
        help="pretraining run folder or checkpoints/step_*.safetensors (image and text towers)",
    )


def load_run_model(spec: str, device: str) -> tuple[Any, dict[str, Any]]:
    """The ``MGLLModel`` and run config of ``--model`` on ``device``."""
    from mgll.training.checkpoint import load_model

    return load_model(spec, device)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``zeroshot`` sub-command."""
    from mgll.eval.cli import add_run_arguments, add_task_arguments

    parser = subparsers.add_parser(
        "zeroshot",
        help="zero-shot classification with class prompts",
        description="Zero-shot classification of a level with prompt ensembles (softmax over "
        "classes; a positive/negative prompt pair per label for multi-label levels).",
    )
    add_model_arguments(parser)
    add_task_arguments(parser)
    add_run_arguments(parser)
    parser.add_argument(
        "--template",
        action="append",
        metavar="TEXT",
        help="prompt template with {} for the class name (repeatable: an ensemble)",
    )
    parser.add_argument("--prompts", metavar="FILE", help="JSON {class: [prompt, ...]}")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``mgll zeroshot``."""
    from mgll.eval.cli import run_safely

    def body() -> int:
        from mgll.eval.cli import load_task, resolve_device, run_options
        from mgll.eval.probe import format_metrics

        model, config = load_run_model(args.model, resolve_device(args.device))
        data = load_task(args, config)
        results = zero_shot(
            model,
            data,
            args.output_dir,
            name=str(args.model),
            run_config=config,
            templates=args.template,
            prompts=load_prompts_file(args.prompts) if args.prompts else None,
            **run_options(args),
        )
        print(format_metrics(results))
        print(f"wrote {args.output_dir}")
        return 0

    return run_safely("zeroshot", body)
