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

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mgll.eval.encoders import text_tower_level
from mgll.eval.features import projected_features
from mgll.eval.options import DEFAULT_OPTIONS, EvalOptions
from mgll.eval.results import write_classification_outputs
from mgll.eval.task import EvalData, TaskError, check_scorable

DEFAULT_TEMPLATES = (
    "{}.",
    "an image showing {}.",
    "a medical image of {}.",
    "a photo showing {}.",
)

NEGATIVE_FORM = "no {}"
MAX_DATA_PROMPTS = 10


def data_prompts(data: EvalData) -> dict[str, list[str]] | None:
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
    data: EvalData,
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


def class_embeddings(
    model: Any, prompts: Mapping[str, Sequence[str]], classes: Sequence[str], level: int
) -> torch.Tensor:
    """(C, D) normalised class embeddings, row k for ``classes[k]``: the mean of that class's
    normalised prompt embeddings, normalised again (CLIP's prompt ensembling)."""
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


@dataclass(frozen=True)
class ZeroShotClassifier:
    """A task's class embeddings (and, multi-label, the negative ones) with the model's logit
    scale and the prompts they came from: :meth:`scores` classifies image embeddings."""

    positive: torch.Tensor
    negative: torch.Tensor | None
    logit_scale: float
    prompts: dict[str, list[str]]
    negative_prompts: dict[str, list[str]] | None
    source: str

    def scores(self, image_emb: np.ndarray) -> np.ndarray:
        """(N, C) class scores of (N, D) projected image embeddings."""
        return zero_shot_scores(image_emb, self.positive, self.negative, self.logit_scale)

    def details(self) -> dict[str, Any]:
        """What results.json records about the prompts."""
        return {
            "prompt_source": self.source,
            "prompts": self.prompts,
            "negative_prompts": self.negative_prompts,
            "scale": float(np.exp(self.logit_scale)),
            "features": "projected image embedding, L2-normalised",
        }


def build_zero_shot_classifier(
    model: Any,
    data: EvalData,
    templates: Sequence[str] | None = None,
    prompts: Mapping[str, Sequence[str]] | None = None,
) -> ZeroShotClassifier:
    """The zero-shot classifier of ``data``'s task (open_clip's ``build_zero_shot_classifier``):
    prompts per class (:func:`class_prompts`, from ``data``'s training rows by default),
    embedded with ``model``'s text tower of the task's level. Every zero-shot caller (``mgll
    zeroshot``, the demo, the benchmark) scores through it."""
    positive, negative, source = class_prompts(data, templates, prompts)
    level = [lv.name for lv in data.records.levels].index(data.task.level)
    classes = data.task.classes
    return ZeroShotClassifier(
        positive=class_embeddings(model, positive, classes, level),
        negative=class_embeddings(model, negative, classes, level) if negative else None,
        logit_scale=float(model.logit_scale.detach()),
        prompts=positive,
        negative_prompts=negative,
        source=source,
    )


def zero_shot(
    model: Any,
    data: EvalData,
    output_dir: str | Path,
    options: EvalOptions = DEFAULT_OPTIONS,
    *,
    name: str,
    run_config: dict[str, Any] | None = None,
    templates: Sequence[str] | None = None,
    prompts: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Zero-shot classification of ``data``'s test split by ``model`` (an ``MGLLModel``);
    writes the output folder (same layout as the probe) and returns results.json's dict."""
    check_scorable(data)
    encoder, features = projected_features(model, data, options, name=name, run_config=run_config)
    bad = features.unreadable
    rows = {k: v[~bad[v]] for k, v in data.rows.items()}
    classifier = build_zero_shot_classifier(model, data, templates, prompts)
    has_val = len(rows["val"]) > 0
    return write_classification_outputs(
        output_dir,
        data,
        rows["test"],
        classifier.scores(features.features[rows["test"]]),
        val_rows=rows["val"] if has_val else None,
        val_scores=classifier.scores(features.features[rows["val"]]) if has_val else None,
        protocol="zeroshot",
        encoder=encoder.describe(),
        details=classifier.details(),
        seed=options.seed,
        n_resamples=options.n_resamples,
        notes=[f"{int(bad.sum())} unreadable image(s) left out"] if bad.any() else [],
        progress=options.progress,
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
