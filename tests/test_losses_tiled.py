"""The tiled loss (``chunk_size``): the same values and gradients as untiled, less memory kept
for backward; CLIP's tiles against its plain cross-entropy; repeated texts multiplied once."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import mgll.losses.kernel as kernel
from mgll.losses import CLIPLoss, MGLLLoss, label_presence
from mgll.losses.plan import distinct_columns
from mgll.schema import ConfigError
from mgll.training.config import LossConfig
from mgll.training.objective import Objective


def _case(n: int, seed: int, repeated_coarse: bool = False):
    """Three levels: class ids with missing, multi-hot with missing rows, fine ids."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, 3, (n,), generator=g)
    coarse[torch.rand(n, generator=g) < 0.2] = -1
    multi = (torch.rand(n, 5, generator=g) < 0.3).float()  # all-zero rows are missing
    fine = torch.randint(0, n // 2, (n,), generator=g)
    image = torch.randn(n, 8, generator=g)
    texts = [torch.randn(n, 8, generator=g) for _ in range(3)]
    if repeated_coarse:  # one text per coarse class, as a batch of class prompts has
        texts[0] = torch.randn(4, 8, generator=g)[coarse.clamp(min=0)]
    return image, texts, [coarse, multi, fine]


def _value_and_grads(loss_fn, image, texts, labels, scale=2.3, bias=-1.5):
    leaves = [t.clone().requires_grad_(True) for t in (image, *texts)]
    s = torch.tensor(scale, requires_grad=True)
    b = torch.tensor(bias, requires_grad=True)
    out = loss_fn(leaves[0], leaves[1:], labels, logit_scale=s, logit_bias=b)
    out["loss"].backward()
    grads = [t.grad for t in leaves] + [s.grad, b.grad]
    return {k: v.detach() for k, v in out.items()}, grads


@pytest.mark.parametrize("seed", [0, 2])
@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_tiles_give_the_untiled_values_and_gradients(seed, chunk):
    image, texts, labels = _case(23, seed, repeated_coarse=seed == 2)
    whole, whole_grads = _value_and_grads(MGLLLoss(), image, texts, labels)
    tiled, tiled_grads = _value_and_grads(MGLLLoss(chunk_size=chunk), image, texts, labels)
    for key, value in whole.items():
        torch.testing.assert_close(tiled[key], value, atol=1e-5, rtol=1e-5, msg=key)
    for a, b in zip(tiled_grads, whole_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert whole_grads[-1].abs() > 0  # the bias reaches the point-wise term


def test_repeated_texts_give_the_gradient_of_plain_autograd():
    # An independent computation: the point-wise and soft-CE terms written with autograd on
    # the full (N, N) logits, against the kernel that multiplies each distinct text once.
    image, texts, labels = _case(12, 3, repeated_coarse=True)
    coarse = labels[0].clamp(min=0)  # no missing labels here: the formulas stay short
    groups = distinct_columns(texts[0], coarse)
    assert groups is not None and groups.counts.sum() == 12 and len(groups.counts) <= 4
    leaves = [image.clone().requires_grad_(True), texts[0].clone().requires_grad_(True)]
    fn = MGLLLoss(weights={"sclip": 1.0, "pointwise": 1.0, "skl": 0.0})
    fn(leaves[0], [leaves[1]], [coarse], logit_scale=1.0, logit_bias=-2.0)["loss"].backward()

    v = image.clone().requires_grad_(True)
    t = texts[0].clone().requires_grad_(True)
    z = torch.e * F.normalize(v, dim=-1) @ F.normalize(t, dim=-1).T - 2.0
    y = (coarse[:, None] == coarse[None, :]).float()
    rows = -(y / y.sum(1, keepdim=True) * z.log_softmax(1)).sum(1).mean()
    cols = -(y / y.sum(0, keepdim=True) * z.log_softmax(0)).sum(0).mean()
    bce = F.binary_cross_entropy_with_logits(z, y, reduction="sum") / z.shape[0]
    (0.5 * (rows + cols) + bce).backward()
    torch.testing.assert_close(leaves[0].grad, v.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(leaves[1].grad, t.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 4, 7])
def test_clip_tiles_equal_its_plain_cross_entropy(chunk):
    image, texts, _ = _case(15, 4)
    whole, whole_grads = _value_and_grads(CLIPLoss(), image, texts[-1:], None)
    tiled, tiled_grads = _value_and_grads(CLIPLoss(chunk_size=chunk), image, texts[-1:], None)
    torch.testing.assert_close(tiled["loss"], whole["loss"], atol=1e-5, rtol=1e-5)
    for a, b in zip(tiled_grads[:-1], whole_grads[:-1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert tiled_grads[-1] is None and whole_grads[-1] is None  # CLIP never reads the bias


def _saved_bytes(loss_fn, image, texts, labels) -> int:
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn(image, texts, labels)
    return saved


def test_missing_samples_leave_the_matmul_and_class_ids_build_no_mask(monkeypatch):
    """What makes the kernel fast: each level's logits are (present rows, present columns),
    not a masked N x N, and a class-id level never builds its positive mask (positive sums go
    through per-class sums); the multi-hot level builds its mask once, kept for backward."""
    shapes, masks = [], []
    real_logits, real_tile = kernel.level_logits, kernel.Positives.tile

    def spy_logits(plan, tensors, spans):
        out = real_logits(plan, tensors, spans)
        shapes.extend(tuple(z.shape) for z in out)
        return out

    def spy_tile(self, r0, r1):
        masks.append("class ids" if self.by_class else "multi-hot")
        return real_tile(self, r0, r1)

    monkeypatch.setattr(kernel, "level_logits", spy_logits)
    monkeypatch.setattr(kernel.Positives, "tile", spy_tile)
    image, texts, labels = _case(12, 3)
    present = [int(label_presence(lab).sum()) for lab in labels]
    assert min(present[:2]) < 12  # the case has missing samples at two levels
    _value_and_grads(MGLLLoss(), image, texts, labels)
    assert shapes == [(p, p) for p in present]
    assert masks == ["multi-hot"]


def test_tiles_keep_no_n_by_n_matrix_for_backward():
    n = 256
    image, texts, labels = _case(n, 5)
    image, texts = image.requires_grad_(True), [t.requires_grad_(True) for t in texts]
    untiled = _saved_bytes(MGLLLoss(), image, texts, labels)
    tiled = _saved_bytes(MGLLLoss(chunk_size=32), image, texts, labels)
    one_matrix = n * n * 4
    assert untiled > 3 * one_matrix  # the three levels' logits are kept
    assert tiled < one_matrix  # only the (N, D) inputs and per-row statistics


def test_chunk_size_is_checked_and_reaches_the_loss_from_the_config():
    with pytest.raises(ValueError, match="chunk_size must be a positive"):
        MGLLLoss(chunk_size=0)
    with pytest.raises(ConfigError, match=r"loss\.chunk_size must be a positive"):
        LossConfig(chunk_size=0)
    objective = Objective.from_config(LossConfig(chunk_size=64), 2)
    assert objective.loss.chunk_size == 64 and objective.local.chunk_size == 64
    clip = Objective.from_config(LossConfig(name="clip", chunk_size=8), 2)
    assert clip.loss.chunk_size == 8
    assert not objective.loss.compile
    compiled = Objective.from_config(LossConfig(compile=True), 2)
    assert compiled.loss.compile and compiled.local.compile
    with pytest.raises(ConfigError, match=r"loss\.compile applies to the MGLL loss only"):
        LossConfig(name="clip", compile=True)


def test_compile_sends_every_element_wise_pass_through_torch_compile(monkeypatch):
    """``MGLLLoss(compile=True)``: the kernel's element-wise functions go through
    ``torch.compile`` (dynamic shapes, each compiled once per process), tiled or not; the
    spy compiles nothing, so the values must be the eager ones exactly."""
    compiled = []

    def spy_compile(fn, dynamic=None):
        compiled.append((fn.__name__, dynamic))
        return fn

    monkeypatch.setattr(torch, "compile", spy_compile)
    # a cache of its own, so the spy's functions never reach another test's compile=True
    monkeypatch.setattr(kernel, "compiled", functools.cache(kernel.compiled.__wrapped__))
    image, texts, labels = _case(12, 4)
    for chunk_size in (None, 5):
        seen = list(compiled)
        want = _value_and_grads(MGLLLoss(chunk_size=chunk_size), image, texts, labels)
        assert compiled == seen  # the default compiles nothing
        got = _value_and_grads(MGLLLoss(chunk_size=chunk_size, compile=True), image, texts, labels)
        assert all(torch.equal(got[0][k], want[0][k]) for k in want[0])
        assert all(torch.equal(a, b) for a, b in zip(got[1], want[1], strict=True))
    names = ("_logit_stats", "_logit_grad", "_smooth_kl_term", "_kl_grad")
    assert sorted(compiled) == sorted((name, True) for name in names)  # once each
