"""Grad-CAM explanations: the map finds the region the model was trained to look at."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import _build_vision_tower

from mgll.cli import main
from mgll.explain import ExplainError, cam_layer, explain_images, gradcam_maps
from mgll.models import create_model
from mgll.training.checkpoint import save_checkpoint

RUN_CONFIG = {"model": {"image": {"arch": "mgll-vit-test-32"}, "text": {"type": "open_clip"}}}


def left_half_images(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images; positives carry a bright 8x8 square somewhere in the left half only."""
    images = 0.5 * torch.randn(n, 3, 32, 32, generator=generator)
    labels = torch.rand(n, generator=generator) < 0.5
    for i in torch.nonzero(labels).flatten().tolist():
        top = int(torch.randint(0, 24, (1,), generator=generator))
        left = int(torch.randint(0, 8, (1,), generator=generator))
        images[i, :, top : top + 8, left : left + 8] += 2.5
    return images, labels.float()


@pytest.fixture(scope="module")
def trained_model():
    """A tiny model trained a few steps to score 'lesion' high exactly for the positives."""
    torch.manual_seed(0)
    model = create_model(RUN_CONFIG["model"])
    with torch.no_grad():
        text = F.normalize(model.encode_text(["lesion"]), dim=-1)
    optimizer = torch.optim.Adam(model.image_tower.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        images, labels = left_half_images(32, generator)
        similarity = F.normalize(model.encode_image(images), dim=-1) @ text.t()
        loss = F.binary_cross_entropy_with_logits(10 * similarity[:, 0], labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_heatmap_mass_is_in_the_half_that_carries_the_signal(trained_model):
    images, labels = left_half_images(16, torch.Generator().manual_seed(5))
    positives = images[labels.bool()]
    maps, similarity = gradcam_maps(trained_model, positives, ["lesion"])
    assert maps.shape == (len(positives), 1, 32, 32)
    assert maps.min() >= 0 and maps.max() <= 1
    # Most of the mass in the left half (0.80 for this seed; a transposed token grid would
    # split it between the halves).
    left_share = maps[:, 0, :, :16].sum() / maps[:, 0].sum()
    assert left_share > 0.65, left_share
    # The model learnt the task: positives score above the negatives.
    _, negative_similarity = gradcam_maps(trained_model, images[~labels.bool()][:2], ["lesion"])
    assert similarity.mean() > negative_similarity.mean()


def test_explain_command_writes_overlays_maps_and_a_summary(tmp_path, trained_model, capsys):
    from PIL import Image

    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints", 1, trained_model, {"step": 1}, RUN_CONFIG, keep_last=1)
    Image.fromarray(np.full((40, 50), 120, np.uint8)).save(tmp_path / "xray.png")
    argv = ["explain", str(tmp_path / "xray.png"), "--model", str(run), "--output-dir"]
    out = tmp_path / "out"
    assert main([*argv, str(out), "--text", "lesion", "--text", "Normal lung!"]) == 0
    assert "wrote 2 heatmap(s)" in capsys.readouterr().out
    summary = json.loads((out / "explanations.json").read_text())
    assert [e["overlay"] for e in summary] == ["xray__lesion.png", "xray__normal-lung.png"]
    heat = np.load(out / "xray__lesion.npy")
    assert heat.shape == (32, 32) and heat.dtype == np.float32
    assert np.asarray(Image.open(out / "xray__lesion.png")).shape == (256, 256, 3)
    assert (
        main(
            [
                "explain",
                str(tmp_path / "missing.png"),
                "--model",
                str(run),
                "--text",
                "x",
                "--output-dir",
                str(out),
            ]
        )
        == 1
    )
    assert "mgll explain: error:" in capsys.readouterr().err


def test_resnet_towers_use_the_last_bottleneck_and_unknown_towers_fail():
    resnet = _build_vision_tower(16, {"layers": [1, 1, 1, 1], "width": 8, "image_size": 32}, False)
    layer, reshape = cam_layer(resnet)
    assert layer is resnet.layer4[-1] and reshape is None
    with pytest.raises(ExplainError, match=r"no Grad-CAM layer known .* Linear"):
        cam_layer(torch.nn.Linear(2, 2))


def test_explain_images_writes_each_texts_own_map_and_similarity(tmp_path, trained_model):
    """A positive image (bright square in the left half) at the tower's own size, so no
    resizing: each text's .npy is the Grad-CAM map of the image normalised by hand, and its
    similarity the cosine of the two embeddings computed here; the lesion map sits left."""
    from PIL import Image

    mean = torch.tensor(trained_model.image_mean).view(3, 1, 1)
    std = torch.tensor(trained_model.image_std).view(3, 1, 1)
    images, labels = left_half_images(8, torch.Generator().manual_seed(5))
    positive = images[labels.bool()][0]
    pixels = ((positive * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0)
    Image.fromarray(pixels.numpy()).save(tmp_path / "a.png")
    texts = ["lesion", "a normal eye"]
    entries = explain_images(trained_model, [tmp_path / "a.png"], texts, tmp_path / "o")
    assert [(e["text"], e["map"]) for e in entries] == [
        ("lesion", "a__lesion.npy"),
        ("a normal eye", "a__a-normal-eye.npy"),
    ]
    image = ((pixels.permute(2, 0, 1).float() / 255 - mean) / std)[None]
    maps, _ = gradcam_maps(trained_model, image, texts)
    with torch.no_grad():
        image_emb = F.normalize(trained_model.encode_image(image), dim=-1)
        text_emb = F.normalize(trained_model.encode_text(texts), dim=-1)
    cosine = (image_emb @ text_emb.t())[0]
    assert cosine[0] != pytest.approx(float(cosine[1]), abs=1e-3)
    for t, entry in enumerate(entries):
        written = np.load(tmp_path / "o" / entry["map"])
        np.testing.assert_allclose(written, maps[0, t], atol=1e-5)
        assert entry["similarity"] == pytest.approx(float(cosine[t]), abs=1e-5)
    lesion = np.load(tmp_path / "o" / entries[0]["map"])
    assert lesion[:, :16].sum() / lesion.sum() > 0.55  # 0.62: most of it where the square is
    assert not np.allclose(lesion, np.load(tmp_path / "o" / entries[1]["map"]), atol=1e-3)


def test_the_commands_method_choices_are_the_cam_methods():
    """``mgll explain --method`` lists the names without loading torch: the same names."""
    from mgll.explain import CAM_METHODS
    from mgll.explain_cli import CAM_METHOD_NAMES

    assert sorted(CAM_METHOD_NAMES) == sorted(CAM_METHODS)
