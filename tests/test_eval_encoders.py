"""``mgll.eval.encoders.load_encoder``: every accepted spec form, and clear failures."""

from __future__ import annotations

import pytest
import torch

from mgll.eval.encoders import ACCEPTED_FORMS, Encoder, EncoderError, load_encoder
from mgll.models import create_model, export_image_encoder
from mgll.training.checkpoint import save_checkpoint

ARCH = "mgll-vit-test-32"
RUN_CONFIG = {"model": {"image": {"arch": ARCH, "pretrained": None}, "text": {"type": "open_clip"}}}


@pytest.fixture(scope="module")
def trained_model():
    """A model whose weights differ from any fresh init (as after training)."""
    torch.manual_seed(0)
    model = create_model(RUN_CONFIG["model"])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval()


def images(n: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_random_spec_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = load_encoder(f"random:{ARCH}:1")
    assert torch.equal(torch.rand(1), before)  # loading did not consume the caller's RNG
    b = load_encoder(f"random:{ARCH}:1")
    c = load_encoder(f"random:{ARCH}:2")
    assert isinstance(a, Encoder) and a.kind == "random" and a.name == f"random:{ARCH}:1"
    assert a.weights_digest() == b.weights_digest() != c.weights_digest()
    with torch.no_grad():
        assert torch.equal(a.encode(images()), b.encode(images()))
    assert (
        load_encoder(f"random:{ARCH}").weights_digest()
        == load_encoder(f"random:{ARCH}:0").weights_digest()
    )


def test_probe_features_are_the_pre_projection_pooled_features():
    encoder = load_encoder("random:mgll-vit-tiny-64:0")
    tower = encoder.tower
    assert encoder.image_size == 64 and encoder.embed_dim == 256 and encoder.feature_dim == 256
    x = images(2, 64)
    with torch.no_grad():
        features = encoder.encode(x)
        projected = encoder.encode(x, projected=True)
        assert torch.allclose(features @ tower.proj, projected, atol=1e-5)
        assert torch.equal(encoder(x), features)
    assert isinstance(tower.proj, torch.nn.Parameter)  # restored after the projection-free pass


def test_run_folder_checkpoint_and_export_give_the_same_tower(tmp_path, trained_model):
    run = tmp_path / "run"
    weights = save_checkpoint(
        run / "checkpoints", 2, trained_model, {"step": 2}, RUN_CONFIG, keep_last=1
    )
    exported = export_image_encoder(trained_model, tmp_path / "encoder.safetensors")
    folder = tmp_path / "export"
    export_image_encoder(trained_model, folder)
    with torch.no_grad():
        expected = trained_model.encode_image(images())
        for spec, kind in [
            (run, "run"),
            (weights, "run"),
            (exported, "export"),
            (folder, "export"),
        ]:
            encoder = load_encoder(spec)
            assert encoder.kind == kind and encoder.arch == ARCH and encoder.image_size == 32
            assert encoder.image_mean == trained_model.image_mean
            torch.testing.assert_close(encoder.encode(images(), projected=True), expected)
    assert load_encoder(run).run_config["model"]["image"]["arch"] == ARCH
    assert load_encoder(exported).run_config is None


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("open_clip:ViT-B-16:openai", "could not download"),
        ("hf-hub:someone/not-here", "hf-hub:someone/not-here"),
        ("open_clip:ViT-B-16", "needs ARCH:TAG"),
        ("random:no-such-arch", "not an open_clip architecture"),
        ("random:mgll-vit-test-32:x", "not an integer"),
        ("does/not/exist.safetensors", "no such file"),
    ],
)
def test_unloadable_specs_name_the_spec_and_the_accepted_forms(spec, reason, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EncoderError) as info:
        load_encoder(spec)
    message = str(info.value)
    assert f"encoder {spec!r}" in message and reason in message
    assert all(form in message for form in ACCEPTED_FORMS)


def test_a_plain_safetensors_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(1)}, str(path))
    with pytest.raises(EncoderError, match="neither an mgll pretraining checkpoint"):
        load_encoder(path)
    with pytest.raises(EncoderError, match="neither checkpoints/ of a run"):
        load_encoder(tmp_path)


def test_weights_digest_of_a_convolutional_tower_with_batchnorm_counters():
    first, again = (
        load_encoder("random:mgll-rn-tiny-64:0"),
        load_encoder("random:mgll-rn-tiny-64:0"),
    )
    other = load_encoder("random:mgll-rn-tiny-64:1")
    assert first.weights_digest() == again.weights_digest() != other.weights_digest()
