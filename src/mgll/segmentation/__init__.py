"""Segmentation transfer: a decoder on a pretrained image tower, trained on image/mask data.

:func:`mgll.segmentation.run.segment` runs the protocol as a library function; ``mgll segment``
(:mod:`~mgll.segmentation.cli`) fills its :class:`~mgll.segmentation.config.SegmentationConfig`
from flags, a YAML file and ``key=value`` overrides. The pieces are
:mod:`~mgll.segmentation.sources` (the registry of mask formats: covid-cxr-seg, mask folder,
mask table), :mod:`~mgll.segmentation.data` (samples, mask cache, patient split),
:mod:`~mgll.segmentation.decoders` (UNETR-style decoder for ViT towers, FPN for convolutional
ones) and :mod:`~mgll.segmentation.train` (the training loop, MONAI metrics, bootstrap CIs,
prediction PNGs).
"""
