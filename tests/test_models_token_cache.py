"""TokenCache and the text towers' use of it: same ids as the tokenizer, only new strings
tokenised, least recently used strings dropped first, the same embeddings with and without."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mgll.models import create_model
from mgll.models.config import ModelConfig
from mgll.models.packing import upload
from mgll.models.token_cache import TokenCache
from mgll.schema import ConfigError
from test_models import MINILM, needs_minilm, tiny_cfg


class SpyTokenizer:
    """Ids from characters; records every list of strings it was asked to tokenise."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, strings: list[str]) -> list[list[int]]:
        self.calls.append(list(strings))
        return [[ord(c) for c in s] for s in strings]


def test_cache_returns_the_tokenizers_ids_and_tokenises_each_new_string_once():
    spy, cache = SpyTokenizer(), TokenCache(size=10)
    first = cache(["ab", "c", "ab"], spy)
    assert [a.tolist() for a in first] == [[97, 98], [99], [97, 98]]
    assert all(a.dtype == np.int32 for a in first)
    assert spy.calls == [["ab", "c"]]  # the repeat within a call is tokenised once
    second = cache(["c", "de", "ab"], spy)
    assert [a.tolist() for a in second] == [[99], [100, 101], [97, 98]]
    assert spy.calls == [["ab", "c"], ["de"]]
    assert (cache.hits, cache.misses, len(cache)) == (2, 3, 3)


def test_cache_drops_the_least_recently_used_string_first():
    spy, cache = SpyTokenizer(), TokenCache(size=2)
    cache(["a", "b"], spy)
    cache(["a"], spy)  # a is now the most recently used
    cache(["c"], spy)  # over size: b goes
    spy.calls.clear()
    cache(["a", "c", "b"], spy)
    assert spy.calls == [["b"]]
    assert len(cache) == 2


def test_more_new_strings_than_the_size_are_all_returned_and_the_last_kept():
    spy, cache = SpyTokenizer(), TokenCache(size=2)
    out = cache(["a", "b", "c"], spy)
    assert [a.tolist() for a in out] == [[97], [98], [99]]
    spy.calls.clear()
    cache(["b", "c", "a"], spy)
    assert spy.calls == [["a"]]


def test_size_zero_keeps_nothing_and_negative_is_refused():
    spy, cache = SpyTokenizer(), TokenCache(size=0)
    cache(["a"], spy)
    cache(["a"], spy)
    assert spy.calls == [["a"], ["a"]]
    assert len(cache) == 0
    with pytest.raises(ValueError, match="token cache size"):
        TokenCache(size=-1)


@pytest.mark.parametrize("bad", [-1, 2.5, "many", True])
def test_config_refuses_a_token_cache_that_is_not_a_count(bad):
    with pytest.raises(ConfigError, match=r"model\.text\.token_cache"):
        ModelConfig.from_dict(tiny_cfg(text={"type": "open_clip", "token_cache": bad}))


def _embeddings_with_and_without_cache(cfg_of_size, texts):
    """Each model's text embeddings for two calls (the second hits the cache), same weights."""
    torch.manual_seed(0)
    cached = create_model(cfg_of_size(100)).eval()
    uncached = create_model(cfg_of_size(0)).eval()
    uncached.load_state_dict(cached.state_dict())
    with torch.no_grad():
        a = [cached.text_towers[0](texts), cached.text_towers[0](texts[::-1])]
        b = [uncached.text_towers[0](texts), uncached.text_towers[0](texts[::-1])]
    return cached, uncached, a, b


TEXTS = ["left lower lobe opacity", "no acute finding", "cardiomegaly", "no acute finding"]


@pytest.mark.parametrize(
    "cfg_of_size",
    [
        pytest.param(
            lambda n: tiny_cfg(text={"type": "open_clip", "token_cache": n}), id="open_clip"
        ),
        pytest.param(
            lambda n: tiny_cfg(text={"type": "hf", "name": str(MINILM), "token_cache": n}),
            id="hf",
            marks=needs_minilm,
        ),
    ],
)
def test_towers_give_the_same_embeddings_with_the_cache_and_tokenise_only_new_strings(cfg_of_size):
    cached, uncached, with_cache, without = _embeddings_with_and_without_cache(cfg_of_size, TEXTS)
    for a, b in zip(with_cache, without, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    tower = cached.text_towers[0]
    assert tower.token_cache.misses == 3  # three distinct strings, tokenised once each
    assert tower.token_cache.hits == 4  # the second call; a repeat within a call is no hit
    assert len(uncached.text_towers[0].token_cache) == 0


@needs_minilm
def test_each_text_tower_keeps_its_own_token_cache():
    """Towers of other tokenizers (open_clip's, MiniLM's) or lengths (4, 32 tokens) see the
    same string in turn: each embeds it as its uncached twin does, with its own ids."""
    long = "left lower lobe opacity with a small effusion and no pneumothorax"

    def text_cfg(n, **text):
        return tiny_cfg(text={**text, "token_cache": n})

    kinds = {
        "open_clip": lambda n: text_cfg(n, type="open_clip"),
        "hf-4": lambda n: text_cfg(n, type="hf", name=str(MINILM), max_length=4),
        "hf-32": lambda n: text_cfg(n, type="hf", name=str(MINILM), max_length=32),
    }
    towers, twins = {}, {}
    for name, cfg_of_size in kinds.items():
        torch.manual_seed(0)
        towers[name] = create_model(cfg_of_size(100)).eval().text_towers[0]
        twins[name] = create_model(cfg_of_size(0)).eval().text_towers[0]
        twins[name].load_state_dict(towers[name].state_dict())
    with torch.no_grad():
        for name in kinds:  # each tower after the others have tokenised the same string
            torch.testing.assert_close(towers[name]([long]), twins[name]([long]), rtol=0, atol=0)
    lengths = {name: len(towers[name].token_cache([long], None)[0]) for name in kinds}
    assert lengths == {"open_clip": 32, "hf-4": 4, "hf-32": 22}
    assert len({id(t.token_cache) for t in towers.values()}) == 3


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
        ),
    ],
)
def test_upload_gives_the_same_values_on_the_device(device):
    ids = torch.randint(0, 30000, (7, 77), generator=torch.Generator().manual_seed(0))
    on_device = upload(ids, device)
    assert on_device.device.type == device
    torch.testing.assert_close(on_device.cpu(), ids, rtol=0, atol=0)
