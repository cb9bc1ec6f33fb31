"""The authors' released checkpoints: recognised from content, read safely, same embeddings
through every entry point (encoder loader, safetensors export, hf-clip-vision export,
``model.image.pretrained``)."""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import pathlib
import pickle
import re

import open_clip
import pytest
import torch
from open_clip.model import _build_vision_tower
from safetensors import safe_open

from mgll.cli import main
from mgll.eval.encoders import EncoderError, load_encoder
from mgll.models import (
    ImageConfig,
    PretrainedWeightsError,
    create_model,
    load_image_encoder,
    register_model_configs,
)
from mgll.models.authors import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    is_torch_pickle,
    read_authors_checkpoint,
)
from mgll.models.config import ModelConfig
from mgll.models.image_tower import build_open_clip

pytestmark = pytest.mark.slow  # one real ViT-L-14 (304 M parameters) per module

ATOL = 1e-4


def authors_layout(model_state: dict[str, torch.Tensor]) -> dict:
    """What HUANGLIZI/MGLL util/misc.py save_model writes around a model state dict."""
    return {
        "model": model_state,
        "optimizer": {
            "state": {0: {"step": torch.tensor(20.0), "exp_avg": torch.zeros(768)}},
            "param_groups": [
                {"lr": 1e-4, "betas": (0.9, 0.95), "weight_decay": 0.0, "params": [0]}
            ],
        },
        "epoch": 19,
        "scaler": {
            "scale": 65536.0,
            "growth_factor": 2.0,
            "backoff_factor": 0.5,
            "growth_interval": 2000,
            "_growth_tracker": 0,
        },
        "args": argparse.Namespace(
            module="MultiGranularModule",
            visual_encoder="clip_vit",
            text_encoder="bert",
            batch_size=64,
            lr=1e-4,
            input_size=224,
            distributed=True,
            gpu=0,
        ),
    }


@pytest.fixture(scope="module")
def authors(tmp_path_factory):
    """An authors'-layout checkpoint with a random ViT-L-14 (GELU) image tower, its
    ``module.``-prefixed re-save, one image and the reference embedding of the tower itself."""
    folder = tmp_path_factory.mktemp("authors")
    cfg = open_clip.get_model_config("ViT-L-14")
    torch.manual_seed(0)
    visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=False).eval()
    with torch.no_grad():  # LayerNorms and biases away from their init, as after training
        for param in visual.parameters():
            if param.ndim < 2:
                param.add_(0.1 * torch.randn_like(param))
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = visual(image)
    state = {f"clip.visual.{k}": v for k, v in visual.state_dict().items()}
    state["logit_scale"] = torch.tensor(2.6593)
    state["clip.logit_scale"] = torch.tensor(4.6052)
    for name in ("text2visual", "visual2text"):
        state[f"{name}.query_proj.weight"] = torch.randn(768, 768)
    state["text_model.projection_head_text.projection.weight"] = torch.randn(768, 768)
    checkpoint = folder / "checkpoint-19.pth"
    torch.save(authors_layout(state), checkpoint)
    resaved = folder / "resaved"  # no suffix: recognised from the content
    torch.save(authors_layout({f"module.{k}": v for k, v in state.items()}), resaved)
    proj = visual.proj.detach().clone()
    del visual, state
    return {"file": checkpoint, "resaved": resaved, "image": image, "ref": reference, "proj": proj}


def test_encoder_loader_gives_the_towers_embeddings(authors):
    encoder = load_encoder(str(authors["file"]))
    assert (encoder.kind, encoder.arch, encoder.image_size) == ("authors", "ViT-L-14", 224)
    assert encoder.image_mean == pytest.approx(IMAGENET_MEAN)
    assert encoder.image_std == pytest.approx(IMAGENET_STD)
    assert encoder.embed_dim == 768
    assert type(encoder.tower.transformer.resblocks[0].mlp.gelu) is torch.nn.GELU
    with torch.no_grad():
        features = encoder.encode(authors["image"])  # pre-projection (the probe's features)
    assert features.shape == (1, 1024)
    assert torch.allclose(features @ authors["proj"], authors["ref"], atol=ATOL)


def test_module_prefixed_resave_loads_the_same_weights(authors):
    plain = load_encoder(str(authors["file"])).tower.state_dict()
    resaved = load_encoder(str(authors["resaved"])).tower.state_dict()
    assert len(plain) == len(resaved) == 296
    assert all(torch.equal(plain[k], resaved[k]) for k in plain)


def test_safetensors_export_gives_the_towers_embeddings(authors, tmp_path, capsys):
    out = tmp_path / "mgll-authors.safetensors"
    assert main(["export", str(authors["file"]), "--output", str(out)]) == 0
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["mgll"]["arch"] == "ViT-L-14" and sidecar["mgll"]["contents"] == "image"
    assert sidecar["mgll"]["image_mean"] == pytest.approx(IMAGENET_MEAN)
    assert sidecar["model_cfg"]["quick_gelu"] is False
    with safe_open(str(out), framework="pt") as handle:
        assert len(list(handle.keys())) == 296
    encoder = load_image_encoder(out)
    with torch.no_grad():
        assert torch.allclose(encoder(authors["image"]), authors["ref"], atol=ATOL)


def test_hf_clip_vision_export_gives_the_towers_embeddings(authors, tmp_path):
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    out = tmp_path / "hf"
    code = main(
        ["export", str(authors["resaved"]), "--format", "hf-clip-vision", "--output-dir", str(out)]
    )
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_act"] == "gelu" and config["hidden_size"] == 1024
    processor = CLIPImageProcessor.from_pretrained(out)
    assert processor.image_mean == pytest.approx(IMAGENET_MEAN)
    model = CLIPVisionModelWithProjection.from_pretrained(out).eval()
    with torch.no_grad():
        embeds = model(pixel_values=authors["image"]).image_embeds
    assert torch.allclose(embeds, authors["ref"], atol=ATOL)


def test_pretrained_image_weights_from_the_authors_checkpoint(authors):
    build = build_open_clip(
        ImageConfig(arch="ViT-L-14", pretrained=str(authors["file"])), None, False
    )
    expected = load_encoder(str(authors["file"])).tower.state_dict()
    loaded = build.clip.visual.state_dict()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert build.open_clip_cfg["quick_gelu"] is False
    assert tuple(build.preprocess_cfg["mean"]) == pytest.approx(IMAGENET_MEAN)
    assert tuple(build.preprocess_cfg["std"]) == pytest.approx(IMAGENET_STD)


def test_authors_weights_refused_for_another_architecture_or_quickgelu(authors):
    with pytest.raises(PretrainedWeightsError, match=r"set model.image.arch: ViT-L-14"):
        create_model({"image": {"arch": "mgll-vit-test-32", "pretrained": str(authors["file"])}})
    image = ImageConfig(arch="ViT-L-14", pretrained=str(authors["file"]), quick_gelu=True)
    with pytest.raises(PretrainedWeightsError, match=r"trained with GELU, not QuickGELU"):
        build_open_clip(image, None, False)


def test_whole_model_uses_are_refused_with_what_works(authors, tmp_path, capsys):
    out = tmp_path / "pretrained"
    code = main(
        ["export", str(authors["file"]), "--format", "mgll-pretrained", "--output-dir", str(out)]
    )
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--format open_clip or hf-clip-vision" in err
    assert not out.exists()
    code = main(
        [
            "zeroshot",
            "--model",
            str(authors["file"]),
            "--data",
            "palm",
            "--level",
            "myopia",
            "--output-dir",
            str(tmp_path / "zs"),
        ]
    )
    assert code == 1
    assert "not an mgll pretraining checkpoint" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Files that must not load: cheap, no ViT-L-14 needed
# ----------------------------------------------------------------------------------------------


class _Payload:
    """What a booby-trapped checkpoint carries: unpickling it would create ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(params=["torch.save", "pickle"])
def booby_trapped(request, tmp_path):
    marker = tmp_path / "payload-ran"
    content = authors_layout({"clip.visual.proj": torch.zeros(2, 2)})
    content["args"] = _Payload(str(marker))
    path = tmp_path / "checkpoint-19.pth"
    if request.param == "torch.save":
        torch.save(content, path)
    else:
        with path.open("wb") as handle:
            pickle.dump(content, handle, protocol=4)
    return path, marker


def test_booby_trapped_checkpoint_is_refused_and_nothing_runs(booby_trapped, tmp_path, capsys):
    path, marker = booby_trapped
    assert is_torch_pickle(path)
    with pytest.raises(EncoderError, match=re.escape(f"{path}: refused")) as error:
        load_encoder(str(path))
    assert "posix.system" in str(error.value) or "Unsupported" in str(error.value)

    out = tmp_path / "enc.safetensors"
    assert main(["export", str(path), "--output", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and "refused" in err
    assert not out.exists() and not out.with_suffix(".json").exists()

    register_model_configs()
    with pytest.raises(PretrainedWeightsError, match="refused"):
        build_open_clip(ImageConfig(arch="mgll-vit-test-32", pretrained=str(path)), None, False)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("value", "name"),
    [
        (pathlib.PosixPath("/runs/mgll"), "pathlib.PosixPath"),
        (collections.defaultdict(list, lr=[1e-4]), "collections.defaultdict"),
        (datetime.date(2025, 1, 31), "datetime.date"),
    ],
)
def test_any_class_but_namespace_is_refused_even_a_harmless_looking_one(tmp_path, value, name):
    """The reader allows exactly argparse.Namespace: a file whose args carry a path, a
    defaultdict or a date (what a widened allow-list would let through) is refused, named."""
    content = authors_layout({"clip.visual.proj": torch.zeros(2, 2)})
    content["args"].output_dir = value
    path = tmp_path / "checkpoint-19.pth"
    torch.save(content, path)
    with pytest.raises(EncoderError, match=rf"{re.escape(str(path))}: refused.*{name}"):
        load_encoder(str(path))
    del content["args"].output_dir  # the same file without it: a plain Namespace is read
    torch.save(content, path)
    assert read_authors_checkpoint(path).args["batch_size"] == 64


def test_a_pytorch_file_in_another_layout_is_named(tmp_path, capsys):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {"visual.proj": torch.zeros(2, 2)}}, path)
    with pytest.raises(EncoderError, match=r"not in the authors' MGLL layout.*open_clip:ARCH:FILE"):
        load_encoder(str(path))
    assert main(["export", str(path), "--output", str(tmp_path / "x.safetensors")]) == 1
    assert "not in the authors' MGLL layout" in capsys.readouterr().err


@pytest.mark.parametrize("legacy", [False, True])
def test_a_truncated_checkpoint_is_reported_as_damaged(tmp_path, legacy):
    whole = tmp_path / "whole.pth"
    content = authors_layout({"clip.visual.proj": torch.zeros(64, 64)})
    torch.save(content, whole, _use_new_zipfile_serialization=not legacy)
    cut = tmp_path / "checkpoint-19.pth"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert is_torch_pickle(cut)
    with pytest.raises(EncoderError, match=r"cannot be read as a PyTorch checkpoint.*again"):
        load_encoder(str(cut))


def test_text_keys_follow_the_open_clip_model_they_load_into(tmp_path):
    """Theirs is a CustomTextCLIP (``clip.text.*``); a plain CLIP has the same text modules at
    the top level: each layout loads strictly into its own model."""
    register_model_configs()
    torch.manual_seed(0)
    theirs = open_clip.create_model("mgll-vit-test-32", force_custom_text=True)
    path = tmp_path / "tiny.pth"
    state = {f"clip.{k}": v for k, v in theirs.state_dict().items()}
    torch.save(authors_layout(state), path)
    checkpoint = read_authors_checkpoint(path)
    assert checkpoint.epoch == 19 and checkpoint.args["text_encoder"] == "bert"
    assert checkpoint.parts == ["clip.visual", "clip.text"]
    plain = open_clip.create_model("mgll-vit-test-32")
    plain.load_state_dict(checkpoint.clip_state(plain), strict=True)
    custom = open_clip.create_model("mgll-vit-test-32", force_custom_text=True)
    custom.load_state_dict(checkpoint.clip_state(custom), strict=True)
    tokens = open_clip.get_tokenizer("mgll-vit-test-32")(["a fundus photograph"])
    with torch.no_grad():
        assert torch.allclose(plain.encode_text(tokens), theirs.encode_text(tokens), atol=1e-5)

    # model.image.pretrained with an open_clip text tower takes both towers from the file.
    model = create_model({"image": {"arch": "mgll-vit-test-32", "pretrained": str(path)}})
    assert model.image_mean == pytest.approx(IMAGENET_MEAN)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model.encode_image(images), theirs.encode_image(images), atol=1e-5)
        assert torch.allclose(
            model.encode_text(["a fundus photograph"]), theirs.encode_text(tokens), atol=1e-5
        )


def test_input_normalisation_survives_a_rebuild_from_a_checkpoint():
    cfg = {"image": {"arch": "mgll-vit-test-32", "mean": [0.5, 0.5, 0.5], "std": [0.25] * 3}}
    model = create_model(cfg)
    assert model.image_mean == (0.5, 0.5, 0.5) and model.image_std == (0.25, 0.25, 0.25)
    facts = model.build_facts()
    rebuilt = ModelConfig.from_dict({"image": {"arch": "mgll-vit-test-32"}}).for_rebuild(facts)
    assert rebuilt.image.mean == [0.5, 0.5, 0.5] and rebuilt.image.std == [0.25] * 3
    assert create_model(rebuilt).image_std == (0.25, 0.25, 0.25)


def test_image_std_must_be_three_positive_numbers():
    from mgll.schema import ConfigError

    with pytest.raises(ConfigError, match=r"model.image.std.*three per-channel numbers"):
        ModelConfig.from_dict({"image": {"arch": "mgll-vit-test-32", "std": [0.5, 0.0, 0.5]}})
