"""Segmentation decoders on an open_clip image tower, built from MONAI's UNETR blocks.

Features come from the tower's own ``forward_intermediates`` (open_clip), so every tower mgll
builds is read the same way:

- ViT towers (one stride, the patch size ``p = 2**k``): patch tokens of ``k`` depths spread
  evenly over the blocks (for 12 blocks and p=16: blocks 3, 6, 9, 12, as in UNETR). The deepest
  is the bottleneck; the shallower ones are brought to strides ``p/2 ... 2`` by MONAI's
  ``UnetrPrUpBlock`` (transposed convolutions), the shallowest to the finest stride;
- convolutional towers (ModifiedResNet, timm CNNs): their stages at strides 4..32, projected by
  ``UnetrBasicBlock``; a U-Net/FPN over the pyramid.

Then one decoder for both: ``UnetrUpBlock`` steps from the bottleneck up to full resolution,
each concatenating the skip at its stride, the last one a ``UnetrBasicBlock`` on the image
itself (UNETR's full-resolution path), and ``UnetOutBlock`` to one logit map per class.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mgll.errors import UserError

NORM = "instance"


class DecoderError(UserError, ValueError):
    """The tower cannot be given a decoder; the message says why."""


def _channels(stride: int, feature_size: int) -> int:
    """UNETR's width plan: feature_size at full resolution, doubling per halving, at most 8x."""
    return feature_size * min(stride, 8)


class SegmentationModel(nn.Module):
    """An open_clip image tower plus a UNETR-style decoder: (N, 3, S, S) -> (N, C, S, S) logits.

    ``freeze_encoder`` keeps the tower's weights fixed (and in eval mode); otherwise it is fine-
    tuned (give it a smaller learning rate: :meth:`param_groups`).
    """

    def __init__(
        self,
        tower: nn.Module,
        num_classes: int,
        image_size: int,
        feature_size: int = 16,
        freeze_encoder: bool = False,
    ) -> None:
        super().__init__()
        self.tower = tower
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            for p in tower.parameters():
                p.requires_grad_(False)
        self.image_size = int(image_size)
        self.indices, shapes = self._plan(tower, self.image_size)
        strides = [self.image_size // shape[2] for shape in shapes]
        dims = 2
        self.skips = nn.ModuleList()
        skip_strides: list[int] = []
        if len(set(strides)) == 1:  # a ViT: every depth at the patch stride
            k = len(self.indices)  # the patch size is 2**k (checked in _plan)
            for m in range(1, k):  # depth m-1 (shallowest first) -> stride 2**m
                channels = _channels(2**m, feature_size)
                self.skips.append(_pr_up(shapes[m - 1][1], channels, num_layer=k - m - 1))
                skip_strides.append(2**m)
        else:  # a pyramid of stages
            for shape, stride in zip(shapes[:-1], strides[:-1], strict=True):
                self.skips.append(
                    _basic(dims, shape[1], _channels(stride, feature_size), kernel_size=1)
                )
                skip_strides.append(stride)
        self.skip_strides = skip_strides
        self.image_block = _basic(dims, 3, feature_size, kernel_size=3)
        # Up path: bottleneck -> each skip (deepest first) -> full resolution.
        from monai.networks.blocks import UnetOutBlock, UnetrUpBlock

        self.ups = nn.ModuleList()
        in_channels, in_stride = shapes[-1][1], strides[-1]
        for stride in [*sorted(skip_strides, reverse=True), 1]:
            out_channels = _channels(stride, feature_size)
            self.ups.append(
                UnetrUpBlock(
                    spatial_dims=dims,
                    in_channels=in_channels,
                    out_channels=out_channels,
                    kernel_size=3,
                    upsample_kernel_size=in_stride // stride,
                    norm_name=NORM,
                    res_block=True,
                )
            )
            in_channels, in_stride = out_channels, stride
        self.head = UnetOutBlock(
            spatial_dims=dims, in_channels=feature_size, out_channels=num_classes
        )

    @staticmethod
    def _plan(tower: nn.Module, image_size: int) -> tuple[list[int], list[torch.Size]]:
        """Which intermediates to read, and their shapes for a probe image."""
        from open_clip.transformer import VisionTransformer

        probe = torch.zeros(1, 3, image_size, image_size, device=next(tower.parameters()).device)
        if not hasattr(tower, "forward_intermediates"):
            raise DecoderError(
                f"the image tower {type(tower).__name__} has no forward_intermediates; "
                "segmentation needs an open_clip ViT or convolutional tower"
            )
        if isinstance(tower, VisionTransformer):
            patch = int(tower.patch_size[0])
            k = int(math.log2(patch))
            if 2**k != patch or k < 1:
                raise DecoderError(
                    f"patch size {patch} is not a power of two; the UNETR decoder upsamples by 2"
                )
            layers = len(tower.transformer.resblocks)
            # With fewer blocks than depths (tiny test towers) a block feeds two levels.
            indices = [max(0, round(layers * i / k) - 1) for i in range(1, k + 1)]
        else:
            with torch.no_grad():
                every = tower.forward_intermediates(probe, intermediates_only=True)
            sizes = [t.shape[2] for t in every["image_intermediates"]]
            # The last intermediate of each resolution (a stage's output), strides 2..32.
            indices = [
                i for i in range(len(sizes)) if i + 1 == len(sizes) or sizes[i + 1] != sizes[i]
            ]
        was_training = tower.training
        tower.eval()
        with torch.no_grad():
            shapes = [t.shape for t in _intermediates(tower, probe, indices)]
        tower.train(was_training)
        for shape in shapes:
            if image_size % shape[2]:
                raise DecoderError(f"a feature map of {shape[2]} px does not divide {image_size}")
        return indices, shapes

    def param_groups(self, lr: float, encoder_lr: float) -> list[dict]:
        """Optimizer groups: the decoder at ``lr``, the tower (unless frozen) at ``encoder_lr``;
        each group's ``lr_scale`` is its share of ``lr`` (what the epoch engine's schedule
        multiplies)."""
        decoder = [p for n, p in self.named_parameters() if not n.startswith("tower.")]
        groups = [{"params": decoder, "lr": lr, "lr_scale": 1.0}]
        if not self.freeze_encoder:
            tower = list(self.tower.parameters())
            groups.append({"params": tower, "lr": encoder_lr, "lr_scale": encoder_lr / lr})
        return groups

    def train(self, mode: bool = True) -> SegmentationModel:
        """Train mode for the decoder; a frozen tower stays in eval mode."""
        super().train(mode)
        if self.freeze_encoder:
            self.tower.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) normalised images -> (N, C, S, S) logits."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            features = _intermediates(self.tower, images, self.indices)
        skips = [block(f) for block, f in zip(self.skips, features[:-1], strict=True)]
        by_stride = dict(zip(self.skip_strides, skips, strict=True))
        x = features[-1]
        for up, stride in zip(self.ups, [*sorted(by_stride, reverse=True), 1], strict=True):
            skip = by_stride[stride] if stride != 1 else self.image_block(images)
            x = up(x, skip)
        return self.head(x)


def _intermediates(tower: nn.Module, images: torch.Tensor, indices: list[int]) -> list:
    """The tower's intermediates at ``indices`` (in that order; an index may repeat)."""
    unique = sorted(set(indices))
    out = tower.forward_intermediates(images, indices=unique, intermediates_only=True)
    by_index = dict(zip(unique, out["image_intermediates"], strict=True))
    return [by_index[i] for i in indices]


def _basic(dims: int, in_channels: int, out_channels: int, kernel_size: int) -> nn.Module:
    from monai.networks.blocks import UnetrBasicBlock

    return UnetrBasicBlock(
        spatial_dims=dims,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=kernel_size,
        stride=1,
        norm_name=NORM,
        res_block=True,
    )


def _pr_up(in_channels: int, out_channels: int, num_layer: int) -> nn.Module:
    from monai.networks.blocks import UnetrPrUpBlock

    return UnetrPrUpBlock(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=out_channels,
        num_layer=num_layer,
        kernel_size=3,
        stride=1,
        upsample_kernel_size=2,
        norm_name=NORM,
        conv_block=True,
        res_block=True,
    )
