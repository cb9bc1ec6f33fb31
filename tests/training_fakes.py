"""Tiny stand-ins for the model and the data, following docs/architecture.md's contracts.

The training tests use them to exercise the trainer in seconds; they hold no tests themselves.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from mgll.data import DataConfig, collate_samples
from mgll.models import ModelConfig
from mgll.schema import set_dotted
from mgll.training.config import RunConfig

IMAGE_SIZE = 8
LEVEL_CLASSES = (["normal", "pneumonia", "other"], ["viral", "bacterial", "fungal", "ards"])


@dataclass(frozen=True)
class FakeLevel:
    name: str
    vocabulary: list[str]
    multi_label: bool


class FakeDataset(Dataset):
    """Deterministic images with random augmentation; level 0 single-label, level 1 multi-hot."""

    def __init__(
        self,
        size: int,
        offset: int,
        augment: bool,
        unreadable: tuple[int, ...] = (),
        missing_labels: bool = True,
    ):
        self.size = size
        self.offset = offset
        self.augment = augment
        self.unreadable = unreadable
        self.missing_labels = missing_labels
        self.levels = [
            FakeLevel("finding", LEVEL_CLASSES[0], False),
            FakeLevel("organism", LEVEL_CLASSES[1], True),
        ]

    def __len__(self) -> int:
        return self.size

    def _labels(self, i: int) -> tuple[int, torch.Tensor]:
        k = i + self.offset
        coarse = k % 3
        fine = torch.zeros(4)
        fine[k % 4] = 1.0
        if k % 5 == 0:
            fine[(k + 1) % 4] = 1.0
        if self.missing_labels and k % 7 == 3:  # a sample missing its fine level
            fine.zero_()
        return coarse, fine

    def __getitem__(self, i: int) -> dict[str, Any]:
        skipped = []
        if i in self.unreadable:  # replaced by the next sample, as the real dataset does
            skipped.append(f"images/broken-{i + self.offset}.png")
            i = (i + 1) % self.size
        gen = torch.Generator().manual_seed(1000 + i + self.offset)
        coarse, fine = self._labels(i)
        image = torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=gen) + coarse
        if self.augment:  # global RNG, as torchvision's random transforms use
            image = image + 0.1 * torch.randn_like(image)
            if torch.rand(()) < 0.5:
                image = image.flip(-1)
        names = [LEVEL_CLASSES[1][c] for c in fine.nonzero().flatten().tolist()]
        return {
            "image": image,
            "texts": [
                f"a chest x-ray showing {LEVEL_CLASSES[0][coarse]}",
                " and ".join(names) if names else "no organism reported",
            ],
            "labels": [coarse, fine],
            "index": i,
            "skipped": skipped,
        }


def fake_datasets(
    options: dict[str, Any], *, image_size: int, seed: int = 0
) -> dict[str, FakeDataset]:
    """Train/val/test fakes; ``options`` (``data.options``) sizes them and plants problems."""
    assert image_size == IMAGE_SIZE
    n = int(options.get("train_size", 48))
    unreadable = tuple(options.get("unreadable", ()))
    missing = bool(options.get("missing_labels", True))
    return {
        "train": FakeDataset(n, 0, augment=True, unreadable=unreadable, missing_labels=missing),
        "val": FakeDataset(int(options.get("val_size", 12)), 10_000, augment=False),
        "test": FakeDataset(4, 20_000, augment=False),
    }


@dataclass
class FakeData:
    """The data builder's result (``mgll.data.PreparedData``'s face): levels, then datasets."""

    config: DataConfig
    seed: int

    @property
    def levels(self) -> list[FakeLevel]:
        return FakeDataset(1, 0, augment=False).levels

    def datasets(self, *, image_size: Any, mean: Any, std: Any) -> dict[str, FakeDataset]:
        return fake_datasets(self.config.options, image_size=image_size, seed=self.seed)


def fake_data(cfg: DataConfig, data_root: Any, seed: int) -> FakeData:
    return FakeData(cfg, seed)


class FakeTextTower(nn.Module):
    """Hashes words into an embedding bag: deterministic for a string, no tokenizer files."""

    def __init__(self, dim: int, buckets: int = 97):
        super().__init__()
        self.buckets = buckets
        self.embed = nn.EmbeddingBag(buckets, 16, mode="mean")
        self.proj = nn.Linear(16, dim)

    def forward(self, strings: list[str]) -> torch.Tensor:
        ids, offsets = [], []
        for s in strings:
            offsets.append(len(ids))
            ids.extend(zlib.crc32(w.encode()) % self.buckets for w in (s.split() or [""]))
        device = self.proj.weight.device
        return self.proj(
            self.embed(torch.tensor(ids, device=device), torch.tensor(offsets, device=device))
        )


class FakeModel(nn.Module):
    """The model contract (``mgll.models.ContrastiveModel``) in a few small layers."""

    def __init__(
        self,
        embed_dim: int = 8,
        init_logit_scale: float = 2.0,
        init_logit_bias: float = -2.0,
        dropout: float = 0.0,
        nan_after_calls: int | None = None,
    ):
        super().__init__()
        dim = embed_dim
        self.image_size = IMAGE_SIZE
        self.image_mean = (0.5, 0.5, 0.5)
        self.image_std = (0.25, 0.25, 0.25)
        self.text_per_level = False
        self.image_tower = nn.Sequential(
            nn.Flatten(),
            nn.Linear(3 * IMAGE_SIZE * IMAGE_SIZE, 32),
            nn.LayerNorm(32),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(32, dim),
        )
        self.text_tower = FakeTextTower(dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias)))
        # Calls after which image embeddings turn NaN (tests the non-finite loss guard).
        self.nan_after = nan_after_calls
        self.calls = 0
        self.grad_checkpointing = False

    def build_facts(self) -> dict[str, Any]:
        return {}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(self, images: torch.Tensor, texts: list[list[str]]) -> dict[str, Any]:
        self.calls += 1
        image_emb = self.image_tower(images)
        if self.nan_after is not None and self.calls > self.nan_after:
            image_emb = image_emb * float("nan")
        return {
            "image_emb": image_emb,
            "text_embs": [self.text_tower(level) for level in texts],
            "logit_scale": self.logit_scale,
            "logit_bias": self.logit_bias,
        }


def fake_model_factory(**knobs: Any):
    """A model factory (``(ModelConfig, G) -> model``) building FakeModels with ``knobs``
    (``dropout``, ``nan_after_calls``) on top of the config's size and logit init."""

    def factory(cfg: ModelConfig, num_levels: int) -> FakeModel:
        return FakeModel(
            embed_dim=cfg.embed_dim or 8,
            init_logit_scale=cfg.init_logit_scale,
            init_logit_bias=cfg.init_logit_bias,
            **knobs,
        )

    return factory


FAKES = {
    "model_factory": fake_model_factory(),
    "data_builder": fake_data,
    "collate_fn": collate_samples,
}


def fake_config(overrides: dict[str, Any] | None = None) -> RunConfig:
    """A resolved run config for the fakes (trainer sections from the real defaults)."""
    raw: dict[str, Any] = {
        "model": {
            "image": {"arch": "fake"},
            "embed_dim": 8,
            "init_logit_scale": 2.0,
            "init_logit_bias": -2.0,
        },
        "data": {"options": {"train_size": 48, "val_size": 12}, "num_workers": 0},
    }
    settings = {
        "train.epochs": 2,
        "train.batch_size": 16,
        "train.lr": 5e-3,
        "train.warmup_epochs": 0.5,
        "train.device": "cpu",
        "log.every_steps": 1,
        "log.progress_bar": False,
        "checkpoint.every_steps": 2,
        "checkpoint.keep_last": 2,
    }
    settings.update(overrides or {})
    for key, value in settings.items():
        set_dotted(raw, key, value)
    return RunConfig.from_dict(raw)
