"""Export an open_clip ViT image tower as a Hugging Face ``CLIPVisionModel`` folder.

This is the format LLaVA-style multimodal LLMs load as their vision tower
(``CLIPVisionModel.from_pretrained(DIR)``, then the patch tokens of a chosen layer's hidden
states), and what ``transformers`` pipelines and ``AutoModel`` understand.

The folder holds a ``CLIPVisionModelWithProjection`` (config, ``model.safetensors``) plus the
``CLIPImageProcessor`` config (``preprocessor_config.json``) with the tower's input size, mean
and std. Both ``CLIPVisionModel`` (the transformer; the projection weight is simply unused) and
``CLIPVisionModelWithProjection`` (adds ``image_embeds``, our image-text embedding) load it.

Correspondence with open_clip's ``VisionTransformer`` (pre-LN, class token, learnable positions):

=============================  ==================================================
open_clip                      transformers CLIP
=============================  ==================================================
``conv1`` (no bias)            ``embeddings.patch_embedding``
``class_embedding``            ``embeddings.class_embedding``
``positional_embedding``       ``embeddings.position_embedding`` (class token first)
``ln_pre``                     ``pre_layrnorm``
``attn.in_proj_*`` (q, k, v)   ``self_attn.{q,k,v}_proj`` (rows split in three)
``attn.out_proj``              ``self_attn.out_proj``
``ln_1`` / ``ln_2``            ``layer_norm1`` / ``layer_norm2``
``mlp.c_fc`` / ``mlp.c_proj``  ``mlp.fc1`` / ``mlp.fc2``
QuickGELU / GELU               ``hidden_act`` quick_gelu / gelu
``ln_post`` (class token)      ``post_layernorm`` (``pooler_output``)
``proj`` (width x D)           ``visual_projection.weight`` (D x width, transposed)
=============================  ==================================================

One difference is structural and documented for users: open_clip's patch tokens
(``output_tokens``) pass through ``ln_post``; transformers' ``last_hidden_state`` does not
(``post_layernorm(last_hidden_state)`` equals open_clip's tokens). Variants without a
transformers counterpart (attentional pooling, average pooling, layer scale, no ``ln_pre``,
custom attention blocks, timm or ResNet towers) are refused with a message naming the reason.
Patch dropout is allowed: it is only active in training, so inference is unchanged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mgll.errors import UserError
from mgll.models.hub import write_folder
from mgll.process import no_loading_bars

PROCESSOR_FILE = "preprocessor_config.json"


class HFExportError(UserError, ValueError):
    """The tower cannot be written as a transformers CLIP vision model; says why."""


def _check_supported(visual: nn.Module) -> None:
    """Raise :class:`HFExportError` unless ``visual`` is a plain open_clip CLIP ViT."""
    from open_clip.transformer import (
        LayerNorm,
        QuickGELU,
        ResidualAttentionBlock,
        VisionTransformer,
    )

    if not isinstance(visual, VisionTransformer):
        raise HFExportError(
            f"the hf-clip-vision format needs a ViT image tower; this one is "
            f"{type(visual).__name__} (a convolutional or timm tower): use the default "
            "open_clip export (`mgll export RUN --output FILE.safetensors`) instead"
        )
    refusals = {
        "attentional pooling (CoCa-style attn_pool)": getattr(visual, "attn_pool", None)
        is not None,
        f"pool_type {getattr(visual, 'pool_type', '?')!r} (transformers pools the class token)": (
            getattr(visual, "pool_type", "tok") != "tok"
        ),
        "no ln_pre (transformers always applies pre_layrnorm)": not isinstance(
            visual.ln_pre, nn.LayerNorm
        ),
        "no projection (proj is None)": visual.proj is None,
    }
    blocks = list(visual.transformer.resblocks)
    plain = [
        type(b) is ResidualAttentionBlock
        and isinstance(b.attn, nn.MultiheadAttention)
        and not hasattr(b, "ln_1_kv")
        for b in blocks
    ]
    refusals["custom attention blocks (qk-norm, scaled cosine or scale_* options)"] = not all(plain)
    if all(plain):
        refusals["layer scale (ls_init_value)"] = any(
            not (isinstance(b.ls_1, nn.Identity) and isinstance(b.ls_2, nn.Identity))
            for b in blocks
        )
        for act in {type(b.mlp.gelu): b.mlp.gelu for b in blocks}.values():
            exact_gelu = isinstance(act, nn.GELU) and act.approximate == "none"
            refusals[f"activation {type(act).__name__} (only GELU and QuickGELU map)"] = not (
                isinstance(act, QuickGELU) or exact_gelu
            )
    for name in ("ln_pre", "ln_post"):
        norm = getattr(visual, name)
        if isinstance(norm, nn.LayerNorm) and type(norm) not in (nn.LayerNorm, LayerNorm):
            refusals[f"{name} of type {type(norm).__name__}"] = True
    height, width = visual.image_size
    if height != width:
        refusals[f"non-square input {height}x{width}"] = True
    reasons = [reason for reason, refused in refusals.items() if refused]
    if reasons:
        raise HFExportError(
            "the image tower uses " + "; ".join(reasons) + ", which transformers' "
            "CLIPVisionModel cannot express: export it with the default open_clip format"
        )


def clip_vision_config(visual: nn.Module) -> Any:
    """The ``CLIPVisionConfig`` describing an open_clip ViT tower."""
    from open_clip.transformer import QuickGELU
    from transformers import CLIPVisionConfig

    _check_supported(visual)
    block = visual.transformer.resblocks[0]
    width = int(visual.conv1.out_channels)
    return CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=int(block.mlp.c_fc.out_features),
        projection_dim=int(visual.proj.shape[1]),
        num_hidden_layers=len(visual.transformer.resblocks),
        num_attention_heads=int(block.attn.num_heads),
        num_channels=int(visual.conv1.in_channels),
        image_size=int(visual.image_size[0]),
        patch_size=int(visual.patch_size[0]),
        hidden_act="quick_gelu" if isinstance(block.mlp.gelu, QuickGELU) else "gelu",
        layer_norm_eps=float(visual.ln_pre.eps),
    )


@torch.no_grad()
def to_clip_vision_model(visual: nn.Module) -> nn.Module:
    """A ``transformers.CLIPVisionModelWithProjection`` with the weights of ``visual``."""
    from transformers import CLIPVisionModelWithProjection

    config = clip_vision_config(visual)
    hf = CLIPVisionModelWithProjection(config).eval()
    vision = hf.vision_model

    def copy(target: torch.Tensor, source: torch.Tensor) -> None:
        if target.shape != source.shape:
            raise HFExportError(f"shape mismatch {tuple(source.shape)} -> {tuple(target.shape)}")
        target.copy_(source.detach().to(target.dtype))

    def copy_norm(target: nn.LayerNorm, source: nn.LayerNorm) -> None:
        copy(target.weight, source.weight)
        copy(target.bias, source.bias)

    def copy_linear(target: nn.Linear, source: nn.Linear) -> None:
        copy(target.weight, source.weight)
        copy(target.bias, source.bias)

    emb = vision.embeddings
    copy(emb.class_embedding, visual.class_embedding)
    copy(emb.patch_embedding.weight, visual.conv1.weight)
    copy(emb.position_embedding.weight, visual.positional_embedding)
    copy_norm(vision.pre_layrnorm, visual.ln_pre)
    for layer, block in zip(vision.encoder.layers, visual.transformer.resblocks, strict=True):
        q_w, k_w, v_w = block.attn.in_proj_weight.chunk(3, dim=0)
        q_b, k_b, v_b = block.attn.in_proj_bias.chunk(3, dim=0)
        attn = layer.self_attn
        for proj, weight, bias in ((attn.q_proj, q_w, q_b), (attn.k_proj, k_w, k_b),
                                   (attn.v_proj, v_w, v_b)):  # fmt: skip
            copy(proj.weight, weight)
            copy(proj.bias, bias)
        copy_linear(attn.out_proj, block.attn.out_proj)
        copy_norm(layer.layer_norm1, block.ln_1)
        copy_norm(layer.layer_norm2, block.ln_2)
        copy_linear(layer.mlp.fc1, block.mlp.c_fc)
        copy_linear(layer.mlp.fc2, block.mlp.c_proj)
    copy_norm(vision.post_layernorm, visual.ln_post)
    copy(hf.visual_projection.weight, visual.proj.t())
    return hf


def image_processor_config(preprocess_cfg: dict[str, Any], image_size: int) -> dict[str, Any]:
    """``CLIPImageProcessor`` settings reproducing open_clip's eval preprocessing (shorter side
    to the input size with bicubic resampling, centre crop, scale to [0, 1], normalise)."""
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": image_size},
        resample=3,  # PIL bicubic, open_clip's default interpolation
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[float(v) for v in preprocess_cfg["mean"]],
        image_std=[float(v) for v in preprocess_cfg["std"]],
        do_convert_rgb=True,
    )
    return processor.to_dict()


def export_hf_clip_vision(
    visual: nn.Module,
    preprocess_cfg: dict[str, Any],
    output_dir: str | os.PathLike,
    extra_info: dict[str, Any] | None = None,
) -> Path:
    """Write ``visual`` (an open_clip ViT) as a transformers CLIP vision model in ``output_dir``.

    Writes ``config.json``, ``model.safetensors``, ``preprocessor_config.json`` and
    ``mgll_export.json`` (where it came from). Files are written in a temporary folder that is
    renamed into place, so a failed export leaves nothing half-written. Returns the folder.
    """
    hf = to_clip_vision_model(visual)
    processor = image_processor_config(preprocess_cfg, int(hf.config.image_size))
    info = {"format": "hf-clip-vision", "class": "CLIPVisionModelWithProjection"}
    return _write_hf_folder(hf, Path(output_dir), {**info, **(extra_info or {})}, processor)


def _write_hf_folder(
    hf: nn.Module, output_dir: Path, info: dict[str, Any], processor: dict[str, Any] | None
) -> Path:
    """``save_pretrained`` of ``hf``, the processor config (if any) and ``mgll_export.json``,
    written in a temporary folder renamed into place (nothing half-written on failure)."""

    def write(folder: Path) -> None:
        with no_loading_bars():  # transformers' "Writing model shards" bar
            hf.save_pretrained(str(folder), safe_serialization=True)
        if processor is not None:
            (folder / PROCESSOR_FILE).write_text(json.dumps(processor, indent=2) + "\n")
        (folder / "mgll_export.json").write_text(json.dumps(info, indent=2) + "\n")

    try:
        return write_folder(output_dir, write)
    except ValueError as error:
        raise HFExportError(str(error)) from error


def export_hf_timm(
    visual: nn.Module,
    preprocess_cfg: dict[str, Any],
    output_dir: str | os.PathLike,
    extra_info: dict[str, Any] | None = None,
) -> Path:
    """Write a timm image tower's trunk as a transformers ``TimmWrapperModel`` in ``output_dir``.

    The folder loads with ``transformers.TimmWrapperModel.from_pretrained`` (pooled features:
    ``model(pixel_values).pooler_output``, the features mgll's probe reads) and
    ``TimmWrapperImageProcessor`` (the tower's size and mean/std). The image-text projection is
    not part of it (transformers' wrapper has no place for it); ``mgll_export.json`` says so.
    Needs a transformers release with ``TimmWrapperModel`` (4.48 or newer).
    """
    trunk = getattr(visual, "trunk", None)
    name = getattr(getattr(trunk, "pretrained_cfg", None), "get", lambda _k: None)("architecture")
    if trunk is None or not name:
        raise HFExportError(
            f"the hf-timm format needs a timm image tower (model.image.arch: timm:NAME); this "
            f"one is {type(visual).__name__}: use the default open_clip export instead"
        )
    try:
        from transformers import TimmWrapperConfig, TimmWrapperModel
    except ImportError:
        raise HFExportError(
            "the hf-timm format needs transformers >= 4.48 (TimmWrapperModel); pip install -U "
            "transformers, or use the default open_clip export"
        ) from None
    size = int(
        preprocess_cfg["size"]
        if isinstance(preprocess_cfg["size"], int)
        else preprocess_cfg["size"][0]
    )
    pretrained_cfg = {
        "input_size": [3, size, size],
        "mean": [float(v) for v in preprocess_cfg["mean"]],
        "std": [float(v) for v in preprocess_cfg["std"]],
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "num_classes": 0,
    }
    config = TimmWrapperConfig(architecture=name, do_pooling=True)
    config.pretrained_cfg = pretrained_cfg
    hf = TimmWrapperModel(config)
    hf.timm_model.load_state_dict(trunk.state_dict(), strict=True)
    info = {"format": "hf-timm", "class": "TimmWrapperModel", "projection": "not included"}
    return _write_hf_folder(hf, Path(output_dir), {**info, **(extra_info or {})}, None)
