"""Explanation heatmaps: where in an image does the model see a text?

Grad-CAM (the ``grad-cam`` package, ``pytorch_grad_cam``) on the image-text similarity
``cos(image_emb, text_emb)``: the gradient of the similarity with respect to the activations of
the image tower's last stage weights those activations, and their positive sum is the map.

The layer depends on the tower mgll built (:func:`cam_layer`):

- open_clip ``VisionTransformer``: the input LayerNorm of the last block, over patch tokens
  (class token dropped, tokens reshaped to the patch grid);
- open_clip ``ModifiedResNet`` (RN50 etc.): the last bottleneck of ``layer4``;
- open_clip ``TimmModel``: the last stage of a convolutional timm trunk (``stages`` or
  ``layer4``), or the last block of a timm ViT (its prefix tokens dropped).

``mgll explain IMAGE... --model RUN --text "..." --output-dir OUT`` writes, per image and text,
an overlay PNG and the raw map (``.npy``, the input's size, values in [0, 1]) plus
``explanations.json`` with the similarities.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mgll.data.cache import load_resized
from mgll.errors import UserError
from mgll.eval.options import resolve_device
from mgll.io import atomic_write, save_npy
from mgll.models.factory import from_pretrained
from mgll.models.hub import CONFIG_FILE
from mgll.training.checkpoint import load_model

OVERLAY_SIZE = 256
CAM_METHODS = {"gradcam": "GradCAM", "hirescam": "HiResCAM", "gradcam++": "GradCAMPlusPlus"}


class ExplainError(UserError, ValueError):
    """A tower or input the explanation cannot handle; the message says why."""


def _token_grid(skip: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """(N, L, C) tokens -> (N, C, h, w), dropping the first ``skip`` (class/prefix) tokens."""

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, skip:, :]
        side = math.isqrt(patches.shape[1])
        if side * side != patches.shape[1]:
            raise ExplainError(f"{patches.shape[1]} patch tokens do not form a square grid")
        return patches.reshape(patches.shape[0], side, side, patches.shape[2]).permute(0, 3, 1, 2)

    return reshape


def cam_layer(visual: nn.Module) -> tuple[nn.Module, Callable | None]:
    """The layer Grad-CAM reads for an open_clip image tower, and its token-to-grid reshape."""
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, VisionTransformer):
        if getattr(visual, "attn_pool", None) is not None:
            raise ExplainError("Grad-CAM of attention-pooled ViT towers is not supported")
        return visual.transformer.resblocks[-1].ln_1, _token_grid(1)
    if isinstance(visual, ModifiedResNet):
        return visual.layer4[-1], None
    trunk = getattr(visual, "trunk", None)  # open_clip's TimmModel
    if trunk is not None:
        for name in ("stages", "layer4"):
            stage = getattr(trunk, name, None)
            if stage is not None:
                return (stage[-1] if isinstance(stage, nn.Sequential) else stage), None
        blocks = getattr(trunk, "blocks", None)
        if blocks is not None:
            return blocks[-1].norm1, _token_grid(int(getattr(trunk, "num_prefix_tokens", 1)))
    raise ExplainError(
        f"no Grad-CAM layer known for an image tower of type {type(visual).__name__}"
    )


class TextSimilarity(nn.Module):
    """Images -> (N, T) cosine similarities with fixed text embeddings (Grad-CAM's 'logits')."""

    def __init__(self, visual: nn.Module, text_emb: torch.Tensor) -> None:
        super().__init__()
        self.visual = visual
        self.register_buffer("text_emb", F.normalize(text_emb.detach(), dim=-1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised images -> (N, T) similarities."""
        return F.normalize(self.visual(images), dim=-1) @ self.text_emb.t()


def gradcam_maps(
    model: Any, images: torch.Tensor, texts: Sequence[str], method: str = "gradcam"
) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM maps (N, T, H, W) in [0, 1] and similarities (N, T) of ``images`` for ``texts``.

    ``model`` is an ``MGLLModel``; ``images`` are normalised for its image tower.
    """
    import pytorch_grad_cam

    if method not in CAM_METHODS:
        raise ExplainError(f"--method: {method!r} is not one of {sorted(CAM_METHODS)}")
    cam_class = getattr(pytorch_grad_cam, CAM_METHODS[method])
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    visual = model.image_tower.visual
    with torch.no_grad():
        text_emb = model.encode_text(list(texts))
    wrapper = TextSimilarity(visual, text_emb).eval()
    layer, reshape = cam_layer(visual)
    device = next(visual.parameters()).device
    images = images.to(device)
    requires = [p.requires_grad for p in visual.parameters()]
    maps = np.zeros((images.shape[0], len(texts), images.shape[2], images.shape[3]), np.float32)
    try:
        for p in visual.parameters():  # frozen weights would leave the activations without grad
            p.requires_grad_(True)
        with torch.enable_grad(), cam_class(wrapper, [layer], reshape_transform=reshape) as cam:
            for t in range(len(texts)):
                targets = [ClassifierOutputTarget(t)] * images.shape[0]
                maps[:, t] = cam(input_tensor=images, targets=targets)
        with torch.no_grad():
            similarity = wrapper(images).cpu().numpy()
    finally:
        for p, flag in zip(visual.parameters(), requires, strict=True):
            p.requires_grad_(flag)
    return maps, similarity


def load_explain_model(spec: str | os.PathLike, device: str = "auto") -> Any:
    """An ``MGLLModel`` from a save_pretrained folder, a run folder or a checkpoint file, on
    ``device`` (``auto``: cuda when available)."""
    path, device = Path(spec), resolve_device(device)
    if (path / CONFIG_FILE).is_file():
        return from_pretrained(path, device)
    model, _ = load_model(path, device)
    return model


def _resize_map(heat: np.ndarray, side: int) -> np.ndarray:
    """A [0, 1] map resized (bilinear) to side x side."""
    from PIL import Image

    if heat.shape[0] == side:
        return heat
    resized = Image.fromarray(heat.astype(np.float32), mode="F").resize(
        (side, side), Image.BILINEAR
    )
    return np.clip(np.asarray(resized), 0.0, 1.0)


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:limit] or "text"


def explain_images(
    model: Any,
    image_paths: Sequence[str | os.PathLike],
    texts: Sequence[str],
    output_dir: str | os.PathLike,
    method: str = "gradcam",
) -> list[dict[str, Any]]:
    """Write Grad-CAM overlays (PNG) and raw maps (.npy) for every image and text.

    Images are decoded like pretraining's (any format mgll reads) and resized with the model's
    preprocessing (shorter side, centre crop). Returns one entry per image and text, also
    written to ``explanations.json``.
    """
    from PIL import Image
    from pytorch_grad_cam.utils.image import show_cam_on_image

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    size = model.image_size if isinstance(model.image_size, int) else model.image_size[0]
    mean = torch.tensor(model.image_mean).view(3, 1, 1)
    std = torch.tensor(model.image_std).view(3, 1, 1)
    entries = []
    for path in image_paths:
        rgb = load_resized(path, size, "crop")
        tensor = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255.0
        # Overlays are drawn at >= OVERLAY_SIZE px (small towers see 64 px); the .npy stays at
        # the model's input size.
        side = max(size, OVERLAY_SIZE)
        view = load_resized(path, side, "crop").astype(np.float32) / 255.0
        maps, similarity = gradcam_maps(model, ((tensor - mean) / std)[None], texts, method)
        for t, text in enumerate(texts):
            stem = f"{Path(path).stem}__{_slug(text)}"
            heat = maps[0, t]
            overlay = show_cam_on_image(view, _resize_map(heat, view.shape[0]), use_rgb=True)
            png, npy = output_dir / f"{stem}.png", output_dir / f"{stem}.npy"
            atomic_write(png, lambda p, a=overlay: Image.fromarray(a).save(p, format="PNG"))
            atomic_write(npy, lambda p, a=heat: save_npy(p, a))
            entries.append(
                {
                    "image": str(path),
                    "text": text,
                    "similarity": float(similarity[0, t]),
                    "overlay": png.name,
                    "map": npy.name,
                }
            )
    summary = output_dir / "explanations.json"
    atomic_write(summary, lambda p: p.write_text(json.dumps(entries, indent=2) + "\n"))
    return entries
