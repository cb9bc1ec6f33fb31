"""One training step: accumulation gives the big-batch gradient, precision, non-finite guard."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mgll.data import collate_samples
from mgll.training.objective import Objective
from mgll.training.optim import lr_at, parameter_groups
from mgll.training.step import (
    NonFiniteLossError,
    Precision,
    forward_backward,
    optimizer_step,
)
from mgll.training.trainer import train
from mgll.training.validation import retrieval_metrics
from training_fakes import FAKES, FakeModel, fake_config, fake_datasets, fake_model_factory


def _batch(n: int = 16):
    data = fake_datasets({"train_size": n}, image_size=8)["train"]
    torch.manual_seed(0)
    return collate_samples([data[i] for i in range(n)])


def _grads(model, loss_cfg, batch, accum, precision="fp32"):
    model.zero_grad(set_to_none=True)
    objective = Objective.from_config(loss_cfg, len(batch["texts"]))
    texts, labels = objective.inputs(batch["texts"], batch["labels"])
    terms = forward_backward(
        model,
        objective.loss,
        batch["images"],
        texts,
        labels,
        Precision(precision, torch.device("cpu")),
        accum_steps=accum,
        step=1,
    )
    return terms, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_name", ["mgll", "clip"])
@pytest.mark.parametrize("accum", [2, 4])
def test_accumulation_gives_the_big_batch_gradient(loss_name, accum):
    cfg = fake_config({"loss.name": loss_name})
    torch.manual_seed(0)
    model = FakeModel().double()
    batch = _batch()
    batch["images"] = batch["images"].double()
    ref_terms, ref = _grads(model, cfg.loss, batch, accum=1)
    terms, got = _grads(model, cfg.loss, batch, accum=accum)
    assert set(got) == set(ref)
    for name in ref:  # logit_scale/bias included: their gradient is taken exactly once
        torch.testing.assert_close(got[name], ref[name], rtol=1e-9, atol=1e-12, msg=name)
    for key in ref_terms:
        torch.testing.assert_close(terms[key], ref_terms[key])


def test_accumulation_replays_dropout_so_live_embeddings_equal_the_cached_ones():
    torch.manual_seed(0)
    model = FakeModel(dropout=0.5)
    seen = []
    model.register_forward_hook(lambda mod, args, out: seen.append(out["image_emb"].detach()))
    _grads(model, fake_config().loss, _batch(), accum=2)
    # Calls: micro-batch 0 and 1 without gradient, then 0 and 1 again with gradient.
    assert len(seen) == 4
    assert torch.equal(seen[2], seen[0]) and torch.equal(seen[3], seen[1])
    assert not torch.equal(seen[0], seen[1])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_train_close_to_fp32(precision, tmp_path):
    from safetensors.torch import load_file

    from mgll.training.run_log import read_metrics

    rows = {}
    for name in ("fp32", precision):
        cfg = fake_config({"train.precision": name, "train.max_steps": 3})
        train(cfg, ".", tmp_path / name, **FAKES)
        rows[name] = [r for r in read_metrics(tmp_path / name) if r["kind"] == "train"]
        weights = load_file(tmp_path / name / "checkpoints" / "step_00000003.safetensors")
        assert all(torch.isfinite(w).all() for w in weights.values())
    # bf16 follows fp32 step by step; fp16's gradient scaler skips the updates that overflow
    # at its large initial scale, so after step 1 it trains on other weights.
    compared = rows[precision] if precision == "bf16" else rows[precision][:1]
    assert len(rows[precision]) == len(rows["fp32"]) == 3
    for got, ref in zip(compared, rows["fp32"], strict=False):
        for term in ("loss", "sclip", "pointwise", "skl"):
            assert got[term] == pytest.approx(ref[term], rel=0.01), (got["step"], term)


def test_non_finite_loss_stops_with_step_and_term_and_keeps_last_checkpoint(tmp_path):
    cfg = fake_config({"checkpoint.every_steps": 2, "eval.every_epochs": 0})
    fakes = dict(FAKES, model_factory=fake_model_factory(nan_after_calls=5))
    with pytest.raises(NonFiniteLossError, match=r"step 6: sclip=nan, pointwise=nan, skl=nan"):
        train(cfg, ".", tmp_path, **fakes)
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    # Steps 1-5 were good: checkpoints at 2, 3 (epoch end) and 4, the newest two kept; nothing
    # is written after the failure.
    assert saved == [
        "step_00000003.safetensors",
        "step_00000003.state.pt",
        "step_00000004.safetensors",
        "step_00000004.state.pt",
    ]
    from mgll.training.checkpoint import load_state, resolve_checkpoint

    assert load_state(resolve_checkpoint("latest", tmp_path))["step"] == 4


def _decayed(model) -> set[str]:
    decay, no_decay = parameter_groups(model, 0.1)
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for p in decay["params"]}


def test_weight_decay_skips_biases_norms_embeddings_and_logit_parameters():
    decayed = _decayed(FakeModel())
    assert "logit_scale" not in decayed and "logit_bias" not in decayed
    assert all(not n.endswith("bias") for n in decayed)
    assert "image_tower.2.weight" not in decayed  # LayerNorm gain
    assert "text_tower.embed.weight" not in decayed  # an embedding table, not a matrix map
    assert decayed == {"image_tower.1.weight", "image_tower.5.weight", "text_tower.proj.weight"}


def test_weight_decay_skips_the_token_and_positional_embeddings_of_real_towers():
    from mgll.models import create_model

    model = create_model({"image": {"arch": "mgll-vit-test-32"}, "text": {"type": "open_clip"}})
    decayed = _decayed(model)
    embeddings = {n for n, _ in model.named_parameters() if "embedding" in n}
    assert embeddings >= {
        "image_tower.visual.class_embedding",
        "image_tower.visual.positional_embedding",
        "text_towers.0.clip.positional_embedding",
        "text_towers.0.clip.token_embedding.weight",
    }
    assert not embeddings & decayed
    assert "image_tower.visual.transformer.resblocks.0.attn.in_proj_weight" in decayed
    assert "image_tower.visual.proj" in decayed and "text_towers.0.clip.text_projection" in decayed


def test_schedule_warms_up_linearly_then_half_cosine():
    lrs = [lr_at(s, 1.0, 0.0, warmup_steps=4, total_steps=12) for s in range(12)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and lrs[8] == pytest.approx(0.5) and lrs[-1] > 0
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))


def test_retrieval_metrics_by_hand():
    # 3 images; texts: image 0 and 1 share "a" (label 0), image 2 has "b" (label 1).
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    texts_emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    out = retrieval_metrics(
        images, texts_emb, ["a", "a", "b"], torch.tensor([0, 0, 1]), (1, 2), (1,)
    )
    # Image 0 -> "a" (right); image 1 -> "b" (wrong: own text is "a"); image 2 -> "b" (right).
    assert out["texts"] == 2 and out["queries"] == 3
    assert out["R@1"] == pytest.approx(2 / 3)
    assert out["R@2"] == 1.0
    assert out["P@1"] == pytest.approx(2 / 3)
    # Multi-label: a text is right when its labels overlap the image's.
    hot = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    out = retrieval_metrics(images, texts_emb, ["a", "a", "b"], hot, (1,), (1,))
    # "a" carries labels {0, 1} (images 0 and 1), "b" carries {1}; image 1 is {0}: its top
    # text "b" is wrong, images 0 and 2 retrieve a text sharing one of their labels.
    assert out["P@1"] == pytest.approx(2 / 3)


def test_a_level_without_labels_shows_p_at_k_as_not_applicable():
    """No sample carries a label at the level (ids -1, or all-zero multi-hot rows): R@K is
    measured, P@K is left out and the printed block says n/a, never a P@K of 0."""
    from mgll.training.progress import format_val

    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    texts_emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    for labels in (torch.tensor([-1, -1, -1]), torch.zeros(3, 2)):
        out = retrieval_metrics(images, texts_emb, ["a", "a", "b"], labels, (1,), (1,))
        assert out["R@1"] == pytest.approx(2 / 3) and "P@1" not in out
        block = format_val({"epoch": 1, "step": 3, "loss": 0.5, "levels": {"notes": out}})
        assert "[notes] R@1 0.667 P@K n/a (no labels at this level) (2 texts)" in block
        assert "P@1" not in block


def test_grad_checkpointing_switch_reaches_the_model(tmp_path):
    made = []

    def factory(cfg, num_levels):
        made.append(FakeModel())
        return made[-1]

    fakes = dict(FAKES, model_factory=factory)
    train(
        fake_config({"train.grad_checkpointing": True, "train.max_steps": 1}),
        ".",
        tmp_path,
        **fakes,
    )
    assert made[0].grad_checkpointing


def test_global_batches_hold_the_same_samples_for_any_number_of_processes():
    from mgll.training.sampling import GlobalBatchSampler

    one = GlobalBatchSampler(50, 8, rank=0, world_size=1, seed=3)
    ranks = [GlobalBatchSampler(50, 8, rank=r, world_size=2, seed=3) for r in range(2)]
    for sampler in (one, *ranks):
        sampler.set_epoch(1)
    whole = [sorted(i for i, _, _ in batch) for batch in one]
    split = [sorted(i for b in parts for i, _, _ in b) for parts in zip(*ranks, strict=True)]
    assert len(whole) == 6 and whole == split  # 50 // 8 steps, incomplete batch dropped
    # Resuming at step 4 of the epoch yields exactly the remaining batches, same seeds.
    one.set_epoch(1, start_step=4)
    full = GlobalBatchSampler(50, 8, seed=3)
    full.set_epoch(1)
    assert list(one) == list(full)[4:]
    full.set_epoch(2)
    assert [i for i, _, _ in next(iter(full))] != whole[0]  # a new permutation each epoch


def test_optimizer_step_clamps_the_logit_scale_at_ln_100():
    # Above the cap the loss's clamp passes no gradient, so only the clamp after the update
    # can bring a logit scale that momentum carried past ln(100) back into range.
    scale = torch.nn.Parameter(torch.tensor(4.0))
    optimizer = torch.optim.AdamW([scale], lr=1.0, weight_decay=0.0)
    scale.grad = torch.tensor(-1.0)  # pushes the scale up by ~lr
    optimizer_step(optimizer, Precision("fp32", torch.device("cpu")), [scale], None, scale)
    assert scale.item() == pytest.approx(math.log(100))


def test_a_run_never_leaves_the_logit_scale_above_ln_100(tmp_path):
    from safetensors.torch import load_file

    cfg = fake_config({"model.init_logit_scale": 5.0, "train.max_steps": 1})
    train(cfg, ".", tmp_path, **FAKES)
    weights = load_file(tmp_path / "checkpoints" / "step_00000001.safetensors")
    assert weights["logit_scale"].item() <= math.log(100) + 1e-6


def test_clip_level_mistakes_are_named_config_errors(tmp_path):
    from mgll.training.config import ConfigError

    def per_level_model(cfg, num_levels):
        model = FakeModel()
        model.text_per_level = True  # as MGLLModel with model.text_per_level: true
        return model

    cfg = fake_config({"loss.name": "clip", "train.max_steps": 1})
    with pytest.raises(ConfigError, match=r"model\.text_per_level=false"):
        train(cfg, ".", tmp_path / "a", **dict(FAKES, model_factory=per_level_model))
    cfg = fake_config({"loss.name": "clip", "loss.clip_level": 2, "train.max_steps": 1})
    with pytest.raises(ConfigError, match=r"loss\.clip_level=2 but the data has 2"):
        train(cfg, ".", tmp_path / "b", **FAKES)


def test_clip_on_joined_captions_reads_every_level_text_of_a_sample(tmp_path):
    from mgll.training.config import LossConfig

    texts = [["normal", "abnormal"], ["clear lens", "dense haze"]]
    labels = [torch.tensor([0, 1]), torch.tensor([3, 4])]
    joined = Objective.from_config(LossConfig(name="clip", clip_level="joined"), 2)
    captions, caption_labels = joined.inputs(texts, labels)
    assert captions == [["normal clear lens", "abnormal dense haze"]]
    assert torch.equal(caption_labels[0], labels[1])
    one = Objective.from_config(LossConfig(name="clip", clip_level=0), 2)
    assert one.inputs(texts, labels)[0] == [["normal", "abnormal"]]
    mgll = Objective.from_config(LossConfig(), 2)
    assert mgll.inputs(texts, labels)[0] == texts
    # A whole run with it: training and validation embed the joined caption.
    cfg = fake_config({"loss.name": "clip", "loss.clip_level": "joined", "train.max_steps": 3})
    summary = train(cfg, ".", tmp_path, **FAKES)
    assert math.isfinite(summary["train"]["clip"]) and math.isfinite(summary["val"]["clip"])
