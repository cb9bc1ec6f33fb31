"""Test-wide settings: never touch a model hub, never write into the user's cache."""

from __future__ import annotations

import os

import pytest

# Model hubs are unreachable in CI; without these each hub call retries for ~45 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_CACHE_VARS = ("MGLL_CACHE", "MGLL_CACHE_DIR")


@pytest.fixture(autouse=True, scope="session")
def _private_user_cache(tmp_path_factory):
    """Point the default preprocessing cache at a temporary folder (both variable names, since
    ``MGLL_CACHE`` wins over ``MGLL_CACHE_DIR``)."""
    old = {name: os.environ.get(name) for name in _CACHE_VARS}
    folder = str(tmp_path_factory.mktemp("mgll-user-cache"))
    for name in _CACHE_VARS:
        os.environ[name] = folder
    yield
    for name, value in old.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
