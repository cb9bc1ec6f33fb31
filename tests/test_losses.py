"""MGLLLoss / CLIPLoss against hand computations, an independent loop reference, and properties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mgll.losses import (
    MGLL_TERMS,
    CLIPLoss,
    MGLLLoss,
    encode_labels,
    label_presence,
    positive_mask,
)

E = math.e


# ------------------------------------------------------------------------------------------
# Hand-computed example: 3 samples, one-hot embeddings, scale 1, so the logits are 0/1.
# ------------------------------------------------------------------------------------------


def _eye_example():
    image = torch.eye(3)
    text_a = torch.eye(3)  # S^a = I
    text_b = torch.eye(3)[[1, 2, 0]]  # S^b[i, j] = 1 where j = i - 1 (mod 3)
    labels_a = torch.tensor([0, 0, 1])
    labels_b = torch.tensor([5, 7, 9])
    return image, text_a, text_b, labels_a, labels_b


def test_soft_clip_hand_computed():
    image, text_a, _, labels_a, _ = _eye_example()
    out = MGLLLoss(weights={"sclip": 1.0, "pointwise": 0.0, "skl": 0.0})(
        image, [text_a], [labels_a], logit_scale=0.0, logit_bias=0.0
    )
    # Y = [[1,1,0],[1,1,0],[0,0,1]]; every row of S = I has log-sum-exp lse = log(e + 2).
    # Rows 0 and 1: target (.5,.5,0) -> CE = lse - 0.5; row 2: target (0,0,1) -> CE = lse - 1.
    # Columns give the same (S and Y symmetric): sCLIP = lse - 2/3 = 0.884778...
    expected = math.log(E + 2) - 2 / 3
    assert out["sclip"].item() == pytest.approx(expected, abs=1e-6)
    assert out["sclip"].item() == pytest.approx(0.8847780, abs=1e-6)
    assert out["loss"].item() == pytest.approx(expected, abs=1e-6)
    assert set(out) == {"loss", "sclip"}  # the terms switched off are not reported


def test_pointwise_hand_computed():
    image, text_a, _, labels_a, _ = _eye_example()
    out = MGLLLoss(weights={"sclip": 0.0, "pointwise": 1.0, "skl": 0.0})(
        image, [text_a], [labels_a], logit_scale=0.0, logit_bias=0.0
    )
    # BCE(x, y) = log(1 + e^x) - x*y. Diagonal: x=1, y=1 -> log(1+e) - 1 (3 entries);
    # the 6 off-diagonal entries have x=0 -> log 2, whatever y. Sum / n_images (3).
    expected = (3 * (math.log(1 + E) - 1) + 6 * math.log(2)) / 3
    assert out["pointwise"].item() == pytest.approx(expected, abs=1e-6)
    assert out["pointwise"].item() == pytest.approx(1.6995560, abs=1e-6)


def test_pointwise_uses_the_bias():
    image, text_a, _, labels_a, _ = _eye_example()
    out = MGLLLoss(weights={"sclip": 0.0, "pointwise": 1.0, "skl": 0.0})(
        image, [text_a], [labels_a], logit_scale=0.0, logit_bias=-1.0
    )
    # Shifted logits: diagonal 1-1=0 (y=1) -> log 2; pairs (0,1),(1,0): -1 with y=1 ->
    # log(1+e^-1) + 1; the other 4 entries: -1 with y=0 -> log(1+e^-1).
    expected = (3 * math.log(2) + 2 * (math.log(1 + 1 / E) + 1) + 4 * math.log(1 + 1 / E)) / 3
    assert out["pointwise"].item() == pytest.approx(expected, abs=1e-6)


def test_smooth_kl_hand_computed():
    image, text_a, text_b, labels_a, labels_b = _eye_example()
    out = MGLLLoss(weights={"sclip": 0.0, "pointwise": 0.0, "skl": 1.0})(
        image, [text_a, text_b], [labels_a, labels_b], logit_scale=0.0, logit_bias=0.0
    )
    # Row i of each level is a permutation of p = (e, 1, 1)/(e+2); level a peaks at column i,
    # level b at column i-1. Their mean m has (e+1)/2, (e+1)/2, 1 over (e+2), so per row:
    # KL(P^a||M) = KL(P^b||M) = e/(e+2) log(2e/(e+1)) + 1/(e+2) log(2/(e+1)) + 1/(e+2) log 1.
    kl = E / (E + 2) * math.log(2 * E / (E + 1)) + 1 / (E + 2) * math.log(2 / (E + 1))
    assert out["skl"].item() == pytest.approx(2 * kl, abs=1e-6)
    assert out["skl"].item() == pytest.approx(0.1748608, abs=1e-6)


def test_total_is_the_weighted_sum():
    image, text_a, text_b, labels_a, labels_b = _eye_example()
    args = (image, [text_a, text_b], [labels_a, labels_b])
    out = MGLLLoss()(*args, logit_scale=0.3)
    # Each term from its own call with only that term switched on.
    alone = {
        name: MGLLLoss(weights={**dict.fromkeys(MGLL_TERMS, 0.0), name: 1.0})(
            *args, logit_scale=0.3
        )["loss"].item()
        for name in MGLL_TERMS
    }
    expected = 0.5 * alone["sclip"] + 1.0 * alone["pointwise"] + 1.0 * alone["skl"]
    assert out["loss"].item() == pytest.approx(expected, rel=1e-6)


def test_clip_loss_hand_computed():
    image, text_a, *_ = _eye_example()
    out = CLIPLoss()([image][0], [text_a], logit_scale=0.0)
    # identity targets: each row CE = lse - 1 with lse = log(e + 2), both directions alike.
    assert out["loss"].item() == pytest.approx(math.log(E + 2) - 1, abs=1e-6)
    assert set(out) == {"loss", "clip"}


def test_clip_loss_matches_open_clip():
    from open_clip.loss import ClipLoss

    torch.manual_seed(0)
    image, text = torch.randn(6, 8), torch.randn(6, 8)
    scale = torch.tensor(2.5)
    ours = CLIPLoss()(image, [text], logit_scale=scale)["loss"]
    theirs = ClipLoss()(F.normalize(image, dim=-1), F.normalize(text, dim=-1), scale.exp())
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)


# ------------------------------------------------------------------------------------------
# An independent reference written with Python loops straight from METHOD.md section 3.
# ------------------------------------------------------------------------------------------


def _label_set(lab: torch.Tensor, i: int) -> set[int]:
    if lab.dim() == 1:
        return set() if lab[i] < 0 else {int(lab[i])}
    return {c for c in range(lab.shape[1]) if lab[i, c] != 0}


def _reference(image, texts, labels, log_scale, bias, weights=(0.5, 1.0, 1.0)):
    s = min(math.exp(log_scale), 100.0)
    v = F.normalize(image.double(), dim=-1).tolist()
    n = len(v)

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True))

    def log_softmax(row):
        m = max(row)
        lse = m + math.log(sum(math.exp(x - m) for x in row))
        return [x - lse for x in row]

    sclip = pw = 0.0
    present_all = set(range(n))
    sims = []
    for t_emb, lab in zip(texts, labels, strict=True):
        t = F.normalize(t_emb.double(), dim=-1).tolist()
        sets = [_label_set(lab, i) for i in range(n)]
        idx = [i for i in range(n) if sets[i]]
        present_all &= set(idx)
        sims.append([[s * dot(v[i], t[j]) for j in range(n)] for i in range(n)])
        S = sims[-1]
        Y = {(i, j): 1.0 if sets[i] & sets[j] else 0.0 for i in idx for j in idx}
        rows = cols = 0.0
        for i in idx:
            lp = log_softmax([S[i][j] for j in idx])
            tot = sum(Y[i, j] for j in idx)
            rows += -sum(Y[i, j] / tot * lp[k] for k, j in enumerate(idx))
        for j in idx:
            lp = log_softmax([S[i][j] for i in idx])
            tot = sum(Y[i, j] for i in idx)
            cols += -sum(Y[i, j] / tot * lp[k] for k, i in enumerate(idx))
        sclip += 0.5 * (rows / len(idx) + cols / len(idx))
        bce = 0.0
        for i in idx:
            for j in idx:
                x, y = S[i][j] + bias, Y[i, j]
                bce += max(x, 0) - x * y + math.log1p(math.exp(-abs(x)))
        pw += bce / len(idx)
    common = sorted(present_all)
    skl = 0.0
    if len(texts) > 1 and common:
        for i in common:
            ps = [[math.exp(x) for x in log_softmax([S[i][j] for j in common])] for S in sims]
            m = [sum(p[k] for p in ps) / len(ps) for k in range(len(common))]
            skl += sum(p[k] * math.log(p[k] / m[k]) for p in ps for k in range(len(common)))
        skl /= len(common)
    a1, a2, a3 = weights
    return {"loss": a1 * sclip + a2 * pw + a3 * skl, "sclip": sclip, "pointwise": pw, "skl": skl}


def _random_batch(n=7, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, d, generator=g)
    texts = [torch.randn(n, d, generator=g) for _ in range(3)]
    labels = [
        torch.tensor([0, 0, 1, -1, 2, 1, 0])[:n],  # class ids with one missing
        torch.tensor(  # multi-hot with partial overlaps and one all-zero (missing) row
            [
                [1, 0, 0, 1],
                [0, 1, 0, 0],
                [0, 0, 0, 0],
                [1, 1, 0, 0],
                [0, 0, 1, 0],
                [0, 0, 1, 1],
                [0, 1, 0, 0],
            ]
        )[:n].float(),
        torch.arange(n),  # every sample its own class (like free-text descriptions)
    ]
    return image, texts, labels


@pytest.fixture(params=[None, 2, 3])
def chunk_size(request):
    """Run a test untiled and in tiles of 2 and 3 image rows (``chunk_size``)."""
    return request.param


@pytest.mark.parametrize("log_scale,bias", [(0.0, 0.0), (math.log(1 / 0.07), -10.0), (5.0, -3.0)])
def test_matches_loop_reference(log_scale, bias, chunk_size):
    image, texts, labels = _random_batch()
    out = MGLLLoss(chunk_size=chunk_size)(
        image, texts, labels, logit_scale=torch.tensor(log_scale), logit_bias=bias
    )
    ref = _reference(image, texts, labels, log_scale, bias)
    for key in ("loss", "sclip", "pointwise", "skl"):
        assert out[key].item() == pytest.approx(ref[key], rel=1e-5, abs=1e-6), key


def test_local_loss_in_one_process_is_the_global_loss(chunk_size):
    # Without a process group there is nothing to gather: the loss is the plain batch loss,
    # checked against the independent loop reference rather than against another call.
    image, texts, labels = _random_batch()
    fn = MGLLLoss(local_loss=True, chunk_size=chunk_size)
    out = fn(image, texts, labels, logit_scale=2.0, logit_bias=-1.0)
    ref = _reference(image, texts, labels, 2.0, -1.0)
    for key in ("loss", "sclip", "pointwise", "skl"):
        assert out[key].item() == pytest.approx(ref[key], rel=1e-5, abs=1e-6), key


# ------------------------------------------------------------------------------------------
# Properties
# ------------------------------------------------------------------------------------------


def test_one_level_has_zero_smooth_kl():
    image, texts, labels = _random_batch()
    out = MGLLLoss()(image, texts[:1], labels[:1])
    assert out["skl"].item() == 0.0


def test_identical_levels_have_zero_smooth_kl():
    image, texts, labels = _random_batch()
    out = MGLLLoss()(image, [texts[0]] * 3, labels)
    assert out["skl"].item() == pytest.approx(0.0, abs=1e-6)


def test_permuting_the_batch_leaves_the_loss_unchanged():
    image, texts, labels = _random_batch()
    perm = torch.tensor([3, 6, 0, 5, 1, 4, 2])
    a = MGLLLoss()(image, texts, labels, logit_scale=1.5, logit_bias=-2.0)
    b = MGLLLoss()(
        image[perm],
        [t[perm] for t in texts],
        [lab[perm] for lab in labels],
        logit_scale=1.5,
        logit_bias=-2.0,
    )
    for key in a:
        assert a[key].item() == pytest.approx(b[key].item(), rel=1e-5), key


def test_missing_label_removes_exactly_that_row_and_column(chunk_size):
    image, texts, _ = _random_batch()
    labels = torch.tensor([0, 0, 1, 2, 2, 1, 0])
    missing = labels.clone()
    missing[4] = -1
    keep = torch.tensor([0, 1, 2, 3, 5, 6])
    fn = MGLLLoss(weights={"sclip": 1.0, "pointwise": 1.0, "skl": 0.0}, chunk_size=chunk_size)
    with_missing = fn(image, texts[:1], [missing], logit_scale=2.0)
    dropped = fn(image[keep], [texts[0][keep]], [labels[keep]], logit_scale=2.0)
    for key in ("sclip", "pointwise"):
        assert with_missing[key].item() == pytest.approx(dropped[key].item(), rel=1e-6)
    # ...and it differs from the loss with that sample present (the test can fail).
    full = fn(image, texts[:1], [labels], logit_scale=2.0)
    assert full["sclip"].item() != pytest.approx(with_missing["sclip"].item(), rel=1e-3)


def test_smooth_kl_uses_samples_present_at_every_level(chunk_size):
    image, texts, _ = _random_batch()
    lab_a = torch.tensor([0, 1, 2, 3, -1, 5, 6])
    lab_b = torch.tensor([0, 1, -1, 3, 4, 5, 6])
    keep = torch.tensor([0, 1, 3, 5, 6])
    fn = MGLLLoss(weights={"sclip": 0.0, "pointwise": 0.0, "skl": 1.0}, chunk_size=chunk_size)
    a = fn(image, texts[:2], [lab_a, lab_b], logit_scale=2.0)
    b = fn(image[keep], [t[keep] for t in texts[:2]], [torch.arange(5)] * 2, logit_scale=2.0)
    assert a["skl"].item() == pytest.approx(b["skl"].item(), rel=1e-6)


def test_multi_hot_partial_overlap_is_positive():
    labels = torch.tensor([[1, 1, 0], [0, 1, 1], [0, 0, 1], [1, 0, 0], [0, 0, 0]])
    expected = torch.tensor(
        [
            [1, 1, 0, 1, 0],
            [1, 1, 1, 0, 0],
            [0, 1, 1, 0, 0],
            [1, 0, 0, 1, 0],
            [0, 0, 0, 0, 0],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(positive_mask(labels), expected)
    assert label_presence(labels).tolist() == [True, True, True, True, False]


def test_class_id_positive_mask_and_presence():
    labels = torch.tensor([2, -1, 2, 0])
    assert positive_mask(labels).tolist() == [
        [True, False, True, False],
        [False, False, False, False],
        [True, False, True, False],
        [False, False, False, True],
    ]


def test_level_with_every_label_missing_contributes_nothing():
    image, texts, labels = _random_batch()
    image.requires_grad_(True)
    none = torch.full((7,), -1)
    a = MGLLLoss()(image, texts[:2], [labels[0], none], logit_scale=2.0)
    b = MGLLLoss()(image, texts[:1], [labels[0]], logit_scale=2.0)
    assert a["loss"].item() == pytest.approx(b["loss"].item(), rel=1e-6)
    assert a["skl"].item() == 0.0
    a["loss"].backward()  # still differentiable, with finite gradients
    assert torch.isfinite(image.grad).all()


def test_zero_weight_switches_a_term_off():
    image, texts, labels = _random_batch()
    fn = MGLLLoss(weights={"sclip": 0.5, "pointwise": 0.0, "skl": 1.0})
    out = fn(image, texts, labels, logit_scale=2.0, logit_bias=-1.0)
    # An unmeasured term is left out, never reported as 0.0 (it would read like a value).
    assert fn.terms == ("sclip", "skl") and set(out) == {"loss", "sclip", "skl"}
    ref = _reference(image, texts, labels, 2.0, -1.0)
    assert out["loss"].item() == pytest.approx(0.5 * ref["sclip"] + ref["skl"], rel=1e-5)
    with pytest.raises(ValueError, match=r"unknown loss weight\(s\) \['kl'\]"):
        MGLLLoss(weights={"kl": 1.0})


def test_gradcheck_float64(chunk_size):
    g = torch.Generator().manual_seed(1)
    image = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    texts = [
        torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2)
    ]
    scale = torch.tensor(1.2, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-0.5, dtype=torch.float64, requires_grad=True)
    labels = [
        torch.tensor([0, 1, 0, -1, 1]),
        torch.tensor([[1, 0], [1, 1], [0, 1], [1, 0], [0, 1]]),
    ]
    fn = MGLLLoss(chunk_size=chunk_size)

    def f(v, t0, t1, s, b):
        return fn(v, [t0, t1], labels, logit_scale=s, logit_bias=b)["loss"]

    assert torch.autograd.gradcheck(f, (image, *texts, scale, bias))


def test_half_precision_embeddings_are_computed_in_fp32():
    image, texts, labels = _random_batch()
    ref = MGLLLoss()(image, texts, labels)
    for dtype in (torch.float16, torch.bfloat16):
        out = MGLLLoss()(image.to(dtype), [t.to(dtype) for t in texts], labels)
        assert out["loss"].dtype == torch.float32
        assert torch.isfinite(out["loss"])
        assert out["loss"].item() == pytest.approx(ref["loss"].item(), rel=2e-2)


def test_scale_is_capped_at_100():
    image, texts, labels = _random_batch()
    capped = MGLLLoss()(image, texts, labels, logit_scale=math.log(100.0))
    beyond = MGLLLoss()(image, texts, labels, logit_scale=math.log(1e4))
    assert capped["loss"].item() == pytest.approx(beyond["loss"].item(), rel=1e-6)
    ref = _reference(image, texts, labels, math.log(100.0), -10.0)
    assert capped["loss"].item() == pytest.approx(ref["loss"], rel=1e-5)
    assert torch.isfinite(capped["loss"])


def test_extreme_logits_stay_finite():
    # Identical embeddings at scale 100 saturate the softmax; log-softmax keeps it finite.
    image = torch.ones(4, 3)
    texts = [torch.ones(4, 3), -torch.ones(4, 3)]
    labels = [torch.tensor([0, 1, 2, 3])] * 2
    out = MGLLLoss()(image, texts, labels, logit_scale=10.0, logit_bias=0.0)
    for key in out:
        assert torch.isfinite(out[key]), key


# ------------------------------------------------------------------------------------------
# Labels from string keys, and errors
# ------------------------------------------------------------------------------------------


def test_encode_labels_from_strings_and_none():
    ids, vocab = encode_labels(["COVID-19", "SARS", None, "COVID-19"])
    assert ids.tolist() == [0, 1, -1, 0]
    assert vocab == ["COVID-19", "SARS"]


def test_encode_labels_multi_label_and_fixed_vocabulary():
    hot, vocab = encode_labels(
        [["COVID-19", "ARDS"], "ARDS", None], vocabulary=["ARDS", "COVID-19", "SARS"]
    )
    assert vocab == ["ARDS", "COVID-19", "SARS"]
    assert hot.tolist() == [[1, 1, 0], [1, 0, 0], [0, 0, 0]]
    with pytest.raises(KeyError, match="'Influenza' of sample 1"):
        encode_labels(["SARS", "Influenza"], vocabulary=["SARS"])


def test_shape_errors_name_the_level():
    image, texts, labels = _random_batch()
    with pytest.raises(ValueError, match="level 1"):
        MGLLLoss()(image, [texts[0], texts[1][:3]], labels[:2])
    with pytest.raises(ValueError, match="one label tensor per granularity level"):
        MGLLLoss()(image, texts, labels[:2])
    with pytest.raises(ValueError, match="one level"):
        CLIPLoss()(image, texts[:2])
