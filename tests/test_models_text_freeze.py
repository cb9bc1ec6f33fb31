"""model.text.freeze: a frozen Hugging Face text tower trains only its projection."""

from __future__ import annotations

import pytest
import torch

from mgll.models import create_model
from test_models import hf_cfg, needs_minilm, tiny_cfg

STRINGS = ["a mild cataract", "a severe cataract", "a mild cataract", "no cataract at all"]


def frozen_cfg(freeze: bool = True) -> dict:
    cfg = hf_cfg()
    cfg["text"]["freeze"] = freeze
    return cfg


@needs_minilm
def test_frozen_tower_matches_the_trainable_one_in_eval_mode():
    torch.manual_seed(0)
    frozen = create_model(frozen_cfg()).text_towers[0]
    torch.manual_seed(0)
    plain = create_model(frozen_cfg(False)).text_towers[0].eval()
    with torch.no_grad():
        torch.testing.assert_close(frozen(STRINGS), plain(STRINGS), rtol=1e-5, atol=1e-5)


@needs_minilm
def test_frozen_encoder_keeps_its_weights_and_eval_mode_while_the_projection_trains():
    model = create_model(frozen_cfg())
    tower = model.text_towers[0]
    model.train()
    assert not tower.encoder.training and tower.proj.training
    encoder_before = {k: v.clone() for k, v in tower.encoder.state_dict().items()}
    proj_before = tower.proj.weight.detach().clone()
    trainable = [p for p in tower.parameters() if p.requires_grad]
    assert trainable == [tower.proj.weight]
    optimizer = torch.optim.SGD(trainable, lr=1.0)
    tower(STRINGS).pow(2).sum().backward()
    optimizer.step()
    assert not torch.equal(tower.proj.weight, proj_before)
    for key, value in tower.encoder.state_dict().items():
        assert torch.equal(value, encoder_before[key]), key


@needs_minilm
def test_frozen_tower_encodes_each_string_once_and_forgets_on_load():
    tower = create_model(frozen_cfg()).text_towers[0]
    batches: list[int] = []
    tower.encoder.register_forward_hook(
        lambda m, args, kw, out: batches.append(len(kw["input_ids"])), with_kwargs=True
    )
    first = tower(STRINGS)
    again = tower(["no cataract at all", "a mild cataract"])
    assert batches == [3]  # three distinct strings, encoded once; the second call looked up
    torch.testing.assert_close(again, first[[3, 0]])
    tower.load_state_dict(tower.state_dict())
    tower(["a mild cataract"])
    assert batches == [3, 1]  # loading weights emptied the lookup


def test_freeze_is_an_option_of_the_hf_tower_only():
    with pytest.raises(ValueError, match="freeze"):
        create_model(tiny_cfg(text={"type": "open_clip", "freeze": True}))
