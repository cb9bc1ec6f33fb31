"""Validation during pretraining: loss terms and image->text retrieval per granularity level.

Retrieval at level g ranks, for every validation image, the distinct texts of that level:

* ``R@k``: the image's own text is among the k best-scored texts;
* ``P@k`` (label-aware precision): the fraction of the k best texts whose labels overlap the
  image's labels at that level, since several texts can be right (a text's labels are those of
  every sample that carries it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mgll.losses import label_presence
from mgll.metrics import retrieval_hits
from mgll.training.objective import Objective
from mgll.training.step import Precision


def _as_multi_hot(labels: torch.Tensor) -> torch.Tensor:
    """(N, C) 0/1 float matrix from class ids (-1 = missing) or multi-hot rows."""
    if labels.dim() == 2:
        return (labels != 0).float()
    classes = int(labels.max().item()) + 1 if labels.numel() else 0
    out = torch.zeros(labels.shape[0], max(classes, 1))
    present = labels >= 0
    out[present.nonzero().squeeze(1), labels[present]] = 1.0
    return out


def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    texts: Sequence[str],
    labels: torch.Tensor,
    recall_at: Sequence[int] = (1, 5),
    precision_at: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """Image->text retrieval over the distinct texts of one level.

    ``image_emb``/``text_emb`` are (N, D) (one text embedding per sample), ``texts`` the N
    strings and ``labels`` the level's (N,) ids or (N, C) multi-hot. Samples with an empty
    text are neither queries nor gallery; ``P@k`` uses only samples that carry a label. The
    ranking is :func:`mgll.metrics.retrieval_hits`, as in ``mgll retrieve``.
    """
    keep = [i for i, t in enumerate(texts) if t]
    if not keep:
        return {"queries": 0, "texts": 0}
    idx = torch.tensor(keep)
    images = F.normalize(image_emb[idx].float(), dim=-1)
    distinct: dict[str, int] = {}
    first_of: list[int] = []
    own = []
    for i in keep:
        if texts[i] not in distinct:
            distinct[texts[i]] = len(first_of)
            first_of.append(i)
        own.append(distinct[texts[i]])
    gallery = F.normalize(text_emb[torch.tensor(first_of)].float(), dim=-1)
    own_t = torch.tensor(own)
    hot = _as_multi_hot(labels)[idx]
    present = label_presence(labels)[idx]
    text_hot = torch.zeros(gallery.shape[0], hot.shape[1])
    text_hot.index_add_(0, own_t[present], hot[present])
    hits = retrieval_hits(
        (images @ gallery.T).numpy(),
        own_t.numpy(),
        hot.numpy(),
        (text_hot > 0).numpy(),
        sorted({*recall_at, *precision_at}),
        text_to_image=False,
    )
    out: dict[str, float] = {"queries": len(keep), "texts": gallery.shape[0]}
    for k in recall_at:
        out[f"R@{k}"] = float(hits[f"i2t_R@{k}"].mean())
    if bool(present.any()):
        labelled = present.numpy()
        for k in precision_at:
            out[f"P@{k}"] = float(hits[f"i2t_P@{k}"][labelled].mean())
    return out


@torch.no_grad()
def validate(
    model: nn.Module,
    objective: Objective,
    batches: Iterable[dict[str, Any]],
    level_names: Sequence[str],
    precision: Precision,
    device: torch.device,
    recall_at: Sequence[int] = (1, 5),
    precision_at: Sequence[int] = (1, 5),
) -> dict[str, Any]:
    """Mean loss terms over validation batches and retrieval metrics per level.

    ``model`` is the plain (not DDP-wrapped) model; the loss does not gather: this runs in one
    process. The model embeds every level (retrieval is reported for all of them); the loss
    reads the levels the objective picks, as in training.
    """
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    count = 0
    image_embs, text_embs, all_texts, all_labels = [], None, None, None
    for batch in batches:
        images = batch["images"].to(device, non_blocking=True)
        labels = [lab.to(device) for lab in batch["labels"]]
        all_levels = list(batch["texts"])
        loss_texts, loss_labels = objective.inputs(all_levels, labels)
        # The joined caption is not one of the levels: embed it in the same pass, after them.
        extra = loss_texts if objective.joins_levels else []
        with precision.autocast():
            out = model(images, [*all_levels, *extra])
        n = images.shape[0]
        if objective.joins_levels:
            caption_embs = out["text_embs"][len(all_levels) :]
        else:
            caption_embs = objective.pick(out["text_embs"])
        terms = objective({**out, "text_embs": caption_embs}, loss_labels, gather=False)
        for key, value in terms.items():
            sums[key] = sums.get(key, 0.0) + float(value) * n
        count += n
        image_embs.append(out["image_emb"].float().cpu())
        if text_embs is None:
            text_embs = [[] for _ in all_levels]
            all_texts = [[] for _ in all_levels]
            all_labels = [[] for _ in all_levels]
        for g in range(len(all_levels)):
            text_embs[g].append(out["text_embs"][g].float().cpu())
            all_texts[g].extend(all_levels[g])
            all_labels[g].append(batch["labels"][g].cpu())
    model.train(was_training)
    if count == 0:
        return {}
    result: dict[str, Any] = {key: value / count for key, value in sums.items()}
    result["samples"] = count
    images = torch.cat(image_embs)
    levels = {}
    for g, name in enumerate(level_names):
        levels[name] = retrieval_metrics(
            images,
            torch.cat(text_embs[g]),
            all_texts[g],
            torch.cat(all_labels[g]),
            recall_at,
            precision_at,
        )
    result["levels"] = levels
    return result
