"""Tiny stand-ins for the model and the datasets, following docs/architecture.md's contracts.

The training tests use them to exercise the trainer in seconds; they hold no tests themselves.
"""

from __future__ import annotations

import copy
import zlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from mgll.data import collate_samples
from mgll.training.config import DEFAULTS, set_dotted

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
    data_cfg: dict[str, Any], data_root: Any, *, image_size: int, mean: Any, std: Any, seed: int
) -> dict[str, FakeDataset]:
    assert image_size == IMAGE_SIZE
    n = int(data_cfg.get("train_size", 48))
    unreadable = tuple(data_cfg.get("unreadable", ()))
    missing = bool(data_cfg.get("missing_labels", True))
    return {
        "train": FakeDataset(n, 0, augment=True, unreadable=unreadable, missing_labels=missing),
        "val": FakeDataset(int(data_cfg.get("val_size", 12)), 10_000, augment=False),
        "test": FakeDataset(4, 20_000, augment=False),
    }


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
    """The model contract: ``model(images, texts)`` -> image_emb, text_embs, logit scale/bias."""

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        dim = int(cfg.get("embed_dim", 8))
        self.image_size = IMAGE_SIZE
        self.image_mean = (0.5, 0.5, 0.5)
        self.image_std = (0.25, 0.25, 0.25)
        self.image_tower = nn.Sequential(
            nn.Flatten(),
            nn.Linear(3 * IMAGE_SIZE * IMAGE_SIZE, 32),
            nn.LayerNorm(32),
            nn.GELU(),
            nn.Dropout(float(cfg.get("dropout", 0.0))),
            nn.Linear(32, dim),
        )
        self.text_tower = FakeTextTower(dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.get("init_logit_scale", 2.0))))
        self.logit_bias = nn.Parameter(torch.tensor(float(cfg.get("init_logit_bias", -2.0))))
        # Calls after which image embeddings turn NaN (tests the non-finite loss guard).
        self.nan_after = cfg.get("nan_after_calls")
        self.calls = 0
        self.grad_checkpointing = False

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


def fake_model(cfg: dict[str, Any]) -> FakeModel:
    return FakeModel(cfg)


FAKES = {
    "model_factory": fake_model,
    "dataset_builder": fake_datasets,
    "collate_fn": collate_samples,
}


def fake_config(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A resolved run config for the fakes (trainer sections from the real defaults)."""
    cfg = copy.deepcopy(DEFAULTS)
    cfg["model"] = {"embed_dim": 8}
    cfg["data"] = {"train_size": 48, "val_size": 12, "num_workers": 0}
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
        set_dotted(cfg, key, value)
    return cfg
