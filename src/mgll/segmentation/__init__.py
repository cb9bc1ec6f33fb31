"""Segmentation transfer: a decoder on a pretrained image tower, trained on image/mask data.

``mgll segment`` (:mod:`mgll.segmentation.cli`) is the entry point; the pieces are
:mod:`~mgll.segmentation.data` (samples, the covid-cxr-seg adapter, folder and table forms, mask
cache), :mod:`~mgll.segmentation.decoders` (UNETR-style decoder for ViT towers, FPN for
convolutional ones) and :mod:`~mgll.segmentation.train` (training, MONAI metrics, bootstrap CIs,
prediction PNGs).
"""
