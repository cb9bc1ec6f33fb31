"""Process-wide settings changed for one scope only, and put back when it ends.

Environment variables and torch's global switches outlive the call that sets them; a library
that changes them without restoring surprises whoever runs next in the same process (a test,
a notebook, a second run). Every such change in mgll goes through these context managers.
Beside them, :func:`seed_everything`: the random state every run starts from (MONAI's
``set_determinism`` idea: one call, in one place).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Iterator

import numpy as np
import torch


@contextlib.contextmanager
def environment_defaults(**values: str) -> Iterator[None]:
    """Set the variables that are not set already; remove them again when the scope ends."""
    added = [name for name in values if name not in os.environ]
    for name in added:
        os.environ[name] = values[name]
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def offline_hubs() -> contextlib.AbstractContextManager[None]:
    """Model hubs offline unless the user said otherwise (``HF_HUB_OFFLINE``): a hub call on a
    machine without network otherwise retries for about 45 s before failing."""
    return environment_defaults(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices): what a run's random draws start from."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


@contextlib.contextmanager
def torch_settings(deterministic: bool, cuda: bool) -> Iterator[None]:
    """Deterministic kernels, or cuDNN autotuning and TF32 on CUDA, for the scope only.

    Deterministic mode: ``torch.use_deterministic_algorithms`` (errors if an op has no
    deterministic version), cuDNN without autotuning, and the cuBLAS workspace setting that
    deterministic cuBLAS needs.
    """
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    env = environment_defaults(CUBLAS_WORKSPACE_CONFIG=":4096:8") if deterministic else None
    try:
        with env or contextlib.nullcontext():
            if deterministic:
                torch.use_deterministic_algorithms(True)
                torch.backends.cudnn.benchmark = False
                torch.backends.cudnn.deterministic = True
            elif cuda:
                torch.backends.cudnn.benchmark = True
                torch.backends.cuda.matmul.allow_tf32 = True
                torch.backends.cudnn.allow_tf32 = True
            yield
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[1:3]
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[3:]


class _DropRandomInitNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")


@contextlib.contextmanager
def quiet_random_init() -> Iterator[None]:
    """Hide open_clip's "No pretrained weights loaded ... initialized randomly" warning.

    mgll builds towers without weights on purpose (random init, or weights that a checkpoint
    loads next); open_clip logs that notice on the root logger every time. Filtered for the
    scope only.
    """
    notice = _DropRandomInitNotice()
    root = logging.getLogger()
    root.addFilter(notice)
    try:
        yield
    finally:
        root.removeFilter(notice)


@contextlib.contextmanager
def no_loading_bars() -> Iterator[None]:
    """Hide the Hugging Face "Loading weights" progress bar for the scope (restored after)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
