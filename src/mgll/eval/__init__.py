"""Downstream evaluation of image encoders (docs/evaluation.md).

``encoders`` loads any encoder (run, export, open_clip, random init) through one code path;
``features`` extracts and caches features; ``probe``, ``finetune``, ``zeroshot`` and
``retrieve`` are the protocols; ``compare`` pairs two result folders; the metrics live in
:mod:`mgll.metrics`. Submodules import torch; this package itself stays light so the CLI's help
is fast.
"""
