"""``mgll finetune``: full fine-tuning of an encoder with a linear head (METHOD.md section 4).

:func:`fine_tune` reads like pretraining's ``train``: :func:`build` (model, data, optimizer,
loss and validation), :func:`mgll.training.epochs.fit` (epochs, validation, the best epoch
kept), :func:`score` (the test split, once, with the best epoch). The engine brings the run
lock, SIGINT/SIGTERM stops with a checkpoint at the step reached (exit 130/143), resumption
(``--resume latest|PATH``, bit-identical to a run that never stopped), precision, clipping, the
per-step schedule and DDP under ``torchrun``; checkpoints are stamped ``kind: finetune``.

The settings are one typed section, :class:`FineTuneConfig` (read by
:func:`mgll.schema.from_mapping`: an unknown key is one error naming its closest valid key).
mgll's defaults: 50 epochs, batch 32, AdamW(0.9, 0.999) with lr 1.25e-4 and weight decay 1e-3
(not on biases, norms and embeddings: :func:`mgll.training.optim.parameter_groups`), a linear
warm-up over the first epoch then a half-cosine rate, no clipping, flips / +-10 degree rotation /
colour jitter 0.2 (:data:`mgll.data.transforms.DEFAULT_AUGMENTATION`), the head on the
pre-projection features (the probe's; the unused projection is frozen) and the epoch with the
best validation macro AUC kept (accuracy breaks ties). The authors' recipe differs in betas,
clipping, augmentation, head and selection (``mgll.benchmark.protocols.PAPER_FINETUNE``).
Optional layer-wise lr decay (``layer_decay: 0.75``) scales block ``i`` of a ViT by
``decay ** (depth + 1 - i)``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from mgll.data.cache import PreprocessCache, default_cache_dir
from mgll.data.dataset import MultiGranularDataset
from mgll.data.transforms import DEFAULT_AUGMENTATION, build_transform
from mgll.eval.encoders import Encoder, load_encoder
from mgll.eval.options import DEFAULT_OPTIONS, EvalOptions
from mgll.eval.results import write_classification_outputs
from mgll.eval.task import EvalData, TaskError, check_scorable
from mgll.metrics import classification_metrics
from mgll.process import seed_everything
from mgll.schema import (
    ConfigError,
    build_section,
    from_mapping,
    read_config_file,
    to_dict,
)
from mgll.training.epochs import (
    EpochResult,
    EpochSettings,
    RunScope,
    SupervisedTask,
    fit,
    run_scope,
)
from mgll.training.optim import parameter_groups as decay_groups
from mgll.training.step import Precision

_AUG = DEFAULT_AUGMENTATION


@dataclass(frozen=True)
class Augmentation:
    """``augmentation``: training-image augmentation (:mod:`mgll.data.transforms`; 0 = off)."""

    hflip: float = _AUG["hflip"]  # probability
    vflip: float = _AUG["vflip"]
    rotation: float = _AUG["rotation"]  # degrees, +-
    brightness: float = _AUG["brightness"]  # colour jitter strengths
    contrast: float = _AUG["contrast"]
    saturation: float = _AUG["saturation"]
    hue: float = _AUG["hue"]
    crop_scale: float = _AUG["crop_scale"]  # random crop: smallest area share kept; 0 = off

    @classmethod
    def off(cls) -> Augmentation:
        """No augmentation at all (``--no-augmentation``)."""
        return cls(**{f.name: 0.0 for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class FineTuneConfig:
    """The settings of a fine-tuning run (``mgll finetune --config FILE.yaml key=value``)."""

    epochs: int = 50
    batch_size: int = 32  # samples per optimizer step, all processes together
    lr: float = 1.25e-4  # peak lr, per step: linear warm-up then half cosine to 0
    weight_decay: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float | None = None  # max global gradient norm; null = off
    warmup_epochs: float = 1.0
    layer_decay: float | None = None  # layer-wise lr decay of a ViT, e.g. 0.75; null = off
    augmentation: Augmentation = field(default_factory=Augmentation)
    head: Literal["features", "projected"] = "features"  # what the linear head reads
    select_by: Literal["auc_macro", "accuracy"] = "auc_macro"  # the validation epoch kept

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if len(self.betas) != 2:
            raise ConfigError(f"betas must be two numbers, got {self.betas!r}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"grad_clip must be > 0 or null, got {self.grad_clip}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ConfigError(f"layer_decay must be in (0, 1] or null, got {self.layer_decay}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | FineTuneConfig | None) -> FineTuneConfig:
        """The typed settings of a plain mapping (a YAML file, a recipe)."""
        return from_mapping(cls, data)

    def to_dict(self) -> dict[str, Any]:
        """The plain nested dict (what checkpoints and results.json record)."""
        return to_dict(self)


def load_finetune_config(
    path: str | Path | None = None, overrides: Sequence[tuple[str, Any]] = ()
) -> FineTuneConfig:
    """The settings of a YAML file (or the defaults), then ``(dotted key, value)`` overrides."""
    raw, origin = read_config_file(path)
    return build_section(FineTuneConfig, raw, origin, overrides)


class FineTuneModel(nn.Module):
    """The encoder's tower and a linear head on its pre-projection features (``features``) or
    on its projected image-text embedding (``projected``, the authors' choice)."""

    def __init__(self, encoder: Encoder, n_classes: int, head: str = "features") -> None:
        super().__init__()
        self.encoder = encoder
        self.projected = head == "projected"
        width = encoder.embed_dim if self.projected else encoder.feature_dim
        self.head = nn.Linear(width, n_classes)
        proj = getattr(encoder.tower, "proj", None)
        if isinstance(proj, nn.Parameter) and not self.projected:
            proj.requires_grad_(False)  # not used by the pre-projection features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.encode(images, projected=self.projected))


def _layer_of(name: str, depth: int) -> int:
    """Layer index for layer-wise lr decay: embeddings 0, ViT block i -> i + 1, rest depth + 1."""
    match = re.search(r"transformer\.resblocks\.(\d+)\.", name)
    if match:
        return int(match.group(1)) + 1
    if any(k in name for k in ("conv1", "class_embedding", "positional_embedding", "ln_pre")):
        return 0
    return depth + 1


def parameter_groups(model: FineTuneModel, weight_decay: float, layer_decay: float | None):
    """AdamW groups: the pretraining engine's decay / no-decay split, each scaled per layer
    (``lr_scale``) when ``layer_decay`` is set."""
    groups = decay_groups(model, weight_decay)
    if not layer_decay:
        for group in groups:
            group["lr_scale"] = 1.0
        return groups
    blocks = getattr(getattr(model.encoder.tower, "transformer", None), "resblocks", [])
    depth = len(blocks)
    names = {id(p): n for n, p in model.named_parameters()}
    scaled = []
    for group in groups:
        by_layer: dict[int, list[nn.Parameter]] = {}
        for p in group["params"]:
            by_layer.setdefault(_layer_of(names[id(p)], depth), []).append(p)
        for layer, params in sorted(by_layer.items()):
            scaled.append(
                {
                    "params": params,
                    "weight_decay": group["weight_decay"],
                    "lr_scale": layer_decay ** (depth + 1 - layer),
                }
            )
    return scaled


class _LabelledImages(torch.utils.data.Dataset):
    """Images of one split with the task's label rows (merged classes already applied)."""

    def __init__(self, images: Any, y: np.ndarray) -> None:
        self.images, self.y = images, torch.from_numpy(y.astype(np.float32))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        item = self.images[index]
        j = item["index"]  # the replacement's label when an image could not be read
        return item["image"], self.y[j], index

    def set_epoch(self, epoch: int) -> None:
        """The epoch the images' random draws belong to (the engine's SeededSamples)."""
        self.images.set_epoch(epoch)


def _datasets(
    encoder: Encoder, data: EvalData, augmentation: Augmentation, seed: int
) -> dict[str, Any]:
    cache_dir = default_cache_dir(data.folder)
    out = {}
    for split in ("train", "val", "test"):
        rows = data.rows[split]
        images = MultiGranularDataset(
            data.records.subset([int(i) for i in rows]),
            image_size=encoder.image_size,
            transform=build_transform(
                train=split == "train",
                mean=encoder.image_mean,
                std=encoder.image_std,
                augmentation=augmentation,
            ),
            cache=PreprocessCache(cache_dir, encoder.image_size) if cache_dir else None,
            seed=seed,
        )
        out[split] = _LabelledImages(images, data.y[rows])
    return out


def _scores(logits: torch.Tensor, task_type: str) -> torch.Tensor:
    return logits.sigmoid() if task_type == "multilabel" else logits.softmax(1)


@torch.no_grad()
def predict(
    model: nn.Module, dataset: Any, task_type: str, precision: Any, batch_size: int, workers: int
) -> np.ndarray:
    """(N, C) class scores of a split, in dataset order."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    device = next(model.parameters()).device
    model.eval()
    out = []
    for images, _, _ in loader:
        with precision.autocast():
            logits = model(images.to(device, non_blocking=True))
        out.append(_scores(logits.float(), task_type).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0))


@dataclass
class FineTuneRun:
    """What :func:`build` makes: the model, the three splits, the engine's task."""

    model: FineTuneModel
    datasets: dict[str, Any]
    task: SupervisedTask
    criterion: str


def _rank_by(select_by: str, auc_defined: bool):
    """The tuple an epoch is kept by: validation accuracy alone (the authors'), or macro AUC
    with accuracy breaking ties (accuracy alone when no validation class has both labels)."""
    if select_by == "accuracy":
        return lambda row: (row["val_accuracy"],), "validation accuracy"

    def by_auc(row: Mapping[str, Any]) -> tuple[float, ...]:
        auc = row.get("val_auc_macro")
        return (auc if auc is not None else -1.0, row["val_accuracy"])

    return by_auc, "validation macro AUC" if auc_defined else "validation accuracy"


def build(
    encoder: Encoder,
    data: EvalData,
    cfg: FineTuneConfig,
    options: EvalOptions,
    device: torch.device,
) -> FineTuneRun:
    """Model (tower + head), datasets, AdamW, the loss and the validation of a run."""
    task = data.task
    model = FineTuneModel(encoder, len(task.classes), cfg.head).to(device)
    datasets = _datasets(encoder, data, to_dict(cfg.augmentation), options.seed)
    optimizer = torch.optim.AdamW(
        parameter_groups(model, cfg.weight_decay, cfg.layer_decay),
        lr=cfg.lr,
        betas=(cfg.betas[0], cfg.betas[1]),
        eps=cfg.eps,
    )
    loss_fn = nn.BCEWithLogitsLoss() if task.type == "multilabel" else nn.CrossEntropyLoss()

    def loss(net: nn.Module, batch: Any) -> torch.Tensor:
        images, y, _ = batch
        target = y if task.type == "multilabel" else y.argmax(1)
        return loss_fn(net(images).float(), target)

    val_y = data.y[data.rows["val"]].astype(int)
    present = [c for c in range(val_y.shape[1]) if 0 < val_y[:, c].sum() < len(val_y)]

    def validate(net: nn.Module, precision: Any) -> dict[str, Any]:
        scores = predict(
            net, datasets["val"], task.type, precision, options.batch_size, options.num_workers
        )
        m = classification_metrics(
            val_y, scores, task.type, classes=task.classes, macro_classes=present
        )
        return {
            "val_auc_macro": m["auc_macro"] if present else None,
            "val_accuracy": m["accuracy"],
        }

    rank, criterion = _rank_by(cfg.select_by, bool(present))
    config = {
        "protocol": "finetune",
        "encoder": encoder.name,  # what a fine-tuning folder as --encoder starts from
        **cfg.to_dict(),
        "precision": options.precision,
        "seed": options.seed,
    }
    engine_task = SupervisedTask(
        model=model,
        train_set=datasets["train"],
        loss=loss,
        validate=validate,
        rank=rank,
        optimizer=optimizer,
        config=config,
    )
    return FineTuneRun(model, datasets, engine_task, criterion)


def fine_tune(
    encoder: Encoder,
    data: EvalData,
    output_dir: str | Path,
    options: EvalOptions = DEFAULT_OPTIONS,
    cfg: FineTuneConfig | Mapping[str, Any] | None = None,
    resume: str | Path | None = None,
) -> dict[str, Any] | None:
    """Fine-tune ``encoder`` (an :class:`~mgll.eval.encoders.Encoder` or a spec) with a linear
    head on ``data`` with the settings ``cfg``; write the output folder (probe layout plus
    ``checkpoints/`` and ``best.safetensors``) and return results.json's dict (None on ranks
    other than 0). ``resume``: ``latest`` or a checkpoint path. ``options.batch_size`` batches
    the scoring of the validation and test images; ``cfg.batch_size`` is the training batch."""
    cfg = FineTuneConfig.from_dict(cfg)
    check_scorable(data)
    if isinstance(encoder, (str, Path)):
        encoder = load_encoder(encoder)
    if len(data.rows["val"]) == 0:
        raise TaskError("the validation split is empty: fine-tuning picks its epoch on it")
    with run_scope(output_dir, options.device, resume) as scope:
        seed_everything(options.seed)
        run = build(encoder, data, cfg, options, scope.device)
        settings = EpochSettings.from_config(  # epochs, batch_size, lr, warm-up, grad_clip
            cfg,
            precision=options.precision,
            seed=options.seed,
            num_workers=options.num_workers,
            kind="finetune",
            progress=options.progress,
        )
        result = fit(scope, run.task, settings)
        if not scope.info.is_main:
            return None
        return score(run, result, scope, data, options)


def score(
    run: FineTuneRun, result: EpochResult, scope: RunScope, data: EvalData, options: EvalOptions
) -> dict[str, Any]:
    """Score validation and test once with the best epoch's weights; write the outputs."""
    from safetensors.torch import load_model

    load_model(run.model, str(result.best_weights))
    precision = Precision(options.precision, scope.device)  # type: ignore[arg-type]
    scores = {
        split: predict(
            run.model,
            run.datasets[split],
            data.task.type,
            precision,
            options.batch_size,
            options.num_workers,
        )
        for split in ("val", "test")
    }
    details = {
        **run.task.config,
        "world_size": scope.info.world_size,
        "best_epoch": result.best_epoch,
        "criterion": run.criterion,
        "history": result.history,
        "train_seconds": result.seconds,
        "n_train": len(data.rows["train"]),
        "n_val": len(data.rows["val"]),
    }
    return write_classification_outputs(
        scope.output_dir,
        data,
        data.rows["test"],
        scores["test"],
        val_rows=data.rows["val"],
        val_scores=scores["val"],
        protocol="finetune",
        encoder=run.model.encoder.describe(),
        details=details,
        seed=options.seed,
        n_resamples=options.n_resamples,
        progress=options.progress,
    )
