"""The benchmark's one doorway into :mod:`mgll.eval`: task data, encoders and the protocols.

Every call from ``mgll.benchmark`` into the evaluation package is in this module, so a change of
eval's signatures is adapted here once. Each protocol writes one ordinary ``mgll.eval`` output
folder (results.json, predictions.csv, ...) and returns its results dict.

``paper-finetune`` is the authors' downstream recipe (HUANGLIZI/MGLL ``exps/downstream.sh``,
``main_finetune.py``) written out in :data:`PAPER_FINETUNE` as the settings of
:class:`mgll.eval.finetune.FineTuneConfig`; :func:`run_protocol` applies all of it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from mgll.benchmark.tasks import BenchmarkError, BenchmarkTask

PROTOCOLS = ("probe", "finetune", "paper-finetune", "zeroshot")
# The authors' downstream recipe, verbatim (issue 18 section 3; blr 1e-3 x batch 32 / 256), as
# FineTuneConfig's keys: 50 epochs, 1 warm-up epoch then per-step half cosine, AdamW(0.9, 0.95).
# Their random crop's scale is not in the recipe's notes: torchvision's RandomResizedCrop
# default (0.08 to all of the area) is used.
PAPER_FINETUNE: dict[str, Any] = {
    "epochs": 50,
    "warmup_epochs": 1.0,
    "lr": 1.25e-4,
    "weight_decay": 1e-3,
    "betas": [0.9, 0.95],
    "eps": 1e-8,
    "batch_size": 32,
    "grad_clip": 10.0,
    "augmentation": {
        "hflip": 0.5,
        "vflip": 0.5,
        "rotation": 30.0,
        "brightness": 0.6,
        "contrast": 0.6,
        "saturation": 0.6,
        "hue": 0.0,
        "crop_scale": 0.08,
    },
    "head": "projected",  # the projected output (768-d for ViT-L-14)
    "select_by": "accuracy",  # the epoch with the best validation accuracy
}


def finetune_config(protocol: str, epochs: int | None = None) -> Any:
    """The :class:`~mgll.eval.finetune.FineTuneConfig` of ``finetune`` (mgll's defaults) or
    ``paper-finetune`` (:data:`PAPER_FINETUNE`), with ``epochs`` when given."""
    from mgll.eval.finetune import FineTuneConfig

    cfg = FineTuneConfig.from_dict(PAPER_FINETUNE if protocol == "paper-finetune" else {})
    return dataclasses.replace(cfg, epochs=int(epochs)) if epochs else cfg


def resolve_level(task: BenchmarkTask, data_root: str | Path | None) -> str:
    """The task's level name (a level index is looked up in the dataset's levels)."""
    if isinstance(task.level, str) and not task.level.isdigit():
        return task.level
    from mgll.data.build import load_records
    from mgll.data.spec import is_spec_path

    path = task.data_path(data_root)
    if is_spec_path(path):  # a spec names its own paths
        records, _ = load_records(task.source or str(path), None)
    else:
        records, _ = load_records(task.source, path, options=task.options)
    names = [level.name for level in records.levels]
    index = int(task.level)
    if not 0 <= index < len(names):
        raise BenchmarkError(
            f"task {task.name}: level {index} is out of range; {records.source} has levels {names}"
        )
    return names[index]


def load_task_data(task: BenchmarkTask, data_root: str | Path | None) -> Any:
    """The task's :class:`~mgll.eval.task.EvalData` on its split."""
    from mgll.data.spec import is_spec_path
    from mgll.eval.task import load_eval_data

    path = task.data_path(data_root)
    source = task.source
    if source is None and is_spec_path(path):
        source = str(path)
    data = load_eval_data(
        path,
        resolve_level(task, data_root),
        data_format=source,
        options=task.options,
        split=task.split,
    )
    if task.type not in (None, data.task.type) and task.type != "segmentation":
        raise BenchmarkError(
            f"task {task.name}: the data's level {data.task.level!r} is {data.task.type}, the "
            f"task says {task.type}; check the level"
        )
    return data


def load_encoder(spec: str) -> Any:
    """The image encoder named by ``spec`` (any form ``mgll probe --encoder`` takes)."""
    from mgll.eval.encoders import load_encoder as load

    return load(spec)


def with_train_fraction(data: Any, fraction: float, seed: int) -> Any:
    """``data`` whose training rows are the seeded ``fraction`` draw of its patients."""
    from mgll.eval.task import label_fraction_rows

    if fraction >= 1:
        return data
    return dataclasses.replace(
        data, rows={**data.rows, "train": label_fraction_rows(data, fraction, seed)}
    )


def train_classes(data: Any, fraction: float, seed: int) -> int:
    """How many classes the training draw holds (a draw of one class cannot train a head)."""
    import numpy as np

    rows = with_train_fraction(data, fraction, seed).rows["train"]
    y = data.y[rows]
    if data.task.type == "multilabel":
        return int((y.sum(0) > 0).sum())
    return len(np.unique(y.argmax(1)))


def run_protocol(
    protocol: str,
    encoder_spec: str,
    data: Any,
    output_dir: Path,
    *,
    fraction: float,
    seed: int,
    epochs: int | None,
    n_resamples: int,
    cache_dir: str | Path | bool | None,
    device: str,
    progress: bool,
) -> dict[str, Any]:
    """Run one (protocol, encoder, fraction, seed) into ``output_dir``; its results dict."""
    from mgll.eval.options import EvalOptions

    options = EvalOptions(
        device=device,
        seed=seed,
        n_resamples=n_resamples,
        cache_dir=cache_dir,
        quiet=not progress,
    )
    if protocol == "probe":
        from mgll.eval.probe import linear_probe

        return linear_probe(
            load_encoder(encoder_spec), data, output_dir, options, label_fractions=(fraction,)
        )
    if protocol in ("finetune", "paper-finetune"):
        from mgll.eval.finetune import fine_tune

        return fine_tune(
            load_encoder(encoder_spec),
            with_train_fraction(data, fraction, seed),
            output_dir,
            options,
            finetune_config(protocol, epochs),
            resume="latest" if _has_checkpoint(output_dir) else None,
        )
    if protocol == "zeroshot":
        from mgll.eval.encoders import load_run_model
        from mgll.eval.zeroshot import zero_shot

        model, run_config = load_run_model(encoder_spec, device)
        return zero_shot(
            model.eval(), data, output_dir, options, name=encoder_spec, run_config=run_config
        )
    raise BenchmarkError(f"--protocol: unknown protocol {protocol!r}; use {', '.join(PROTOCOLS)}")


def _has_checkpoint(folder: Path) -> bool:
    from mgll.training import checkpoint as ckpt

    return bool(ckpt.list_checkpoints(folder / ckpt.CHECKPOINT_SUBDIR))


def read_unit(folder: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """A finished unit's (results.json, predictions) or None when it has not finished."""
    from mgll.eval.results import read_predictions, read_results

    if not (folder / "results.json").is_file():
        return None
    return read_results(folder), read_predictions(folder)


def resolve_device(name: str) -> str:
    """``auto`` -> cuda when available, else cpu (as the evaluation commands read --device)."""
    from mgll.eval.options import resolve_device as resolve

    return resolve(name)
