"""Test-wide settings: never touch a model hub, never write into the user's cache."""

from __future__ import annotations

import os

import pytest

# Model hubs are unreachable in CI; without these each hub call retries for ~45 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def _private_user_cache(tmp_path_factory):
    """Point the default preprocessing cache of read-only datasets at a temporary folder."""
    old = os.environ.get("MGLL_CACHE_DIR")
    os.environ["MGLL_CACHE_DIR"] = str(tmp_path_factory.mktemp("mgll-user-cache"))
    yield
    if old is None:
        os.environ.pop("MGLL_CACHE_DIR", None)
    else:
        os.environ["MGLL_CACHE_DIR"] = old
