"""hf-clip-vision export: the folder loads in transformers and gives our tower's features."""

from __future__ import annotations

import json

import pytest
import torch
from open_clip.model import _build_vision_tower
from transformers import CLIPImageProcessor, CLIPVisionModel, CLIPVisionModelWithProjection

from mgll.models.hf_export import HFExportError, export_hf_clip_vision

VIT_CFG = {"image_size": 32, "layers": 3, "width": 64, "head_width": 32, "patch_size": 8}
PREPROCESS = {"size": 32, "mean": (0.1, 0.2, 0.3), "std": (0.5, 0.6, 0.7)}


def perturbed_vit(quick_gelu: bool, **extra) -> torch.nn.Module:
    """A ViT tower whose LayerNorms and biases are not at their init (as after training)."""
    torch.manual_seed(0)
    visual = _build_vision_tower(48, {**VIT_CFG, **extra}, quick_gelu)
    with torch.no_grad():
        for p in visual.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return visual.eval()


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_exported_tower_matches_in_transformers(tmp_path, quick_gelu):
    visual = perturbed_vit(quick_gelu)
    out = export_hf_clip_vision(visual, PREPROCESS, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_act"] == ("quick_gelu" if quick_gelu else "gelu")
    assert config["image_size"] == 32 and config["patch_size"] == 8
    assert config["num_attention_heads"] == 2 and config["projection_dim"] == 48

    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    visual.output_tokens = True
    with torch.no_grad():
        pooled, tokens = visual(images)  # projected class token; ln_post'd patch tokens
        inter = visual.forward_intermediates(
            images, indices=[1], intermediates_only=True, output_fmt="NLC"
        )
        penultimate = inter["image_intermediates"][0]

    vision = CLIPVisionModel.from_pretrained(out).eval()  # what LLaVA loads
    with_proj = CLIPVisionModelWithProjection.from_pretrained(out).eval()
    with torch.no_grad():
        hf = vision(pixel_values=images, output_hidden_states=True)
        embeds = with_proj(pixel_values=images).image_embeds
    assert torch.allclose(embeds, pooled, atol=1e-4)
    assert torch.allclose(hf.pooler_output @ visual.proj, pooled, atol=1e-4)
    # transformers leaves the patch tokens before the final LayerNorm; open_clip applies it.
    patch = vision.post_layernorm(hf.last_hidden_state[:, 1:])
    assert patch.shape == tokens.shape == (2, 16, 64)
    assert torch.allclose(patch, tokens, atol=1e-4)
    # LLaVA's feature layer -2: the output of the second-to-last block, patch tokens only.
    assert torch.allclose(hf.hidden_states[-2][:, 1:], penultimate, atol=1e-4)
    # docs/transfer.md's quiet way to the same tower: the projection model's vision_model
    with torch.no_grad():
        quiet = with_proj.vision_model(pixel_values=images, output_hidden_states=True)
    assert torch.equal(quiet.hidden_states[-2], hf.hidden_states[-2])


def test_every_exported_file_reads_like_the_users_other_files(tmp_path, capfd):
    """transformers writes model.safetensors owner-only (0600); the export follows the umask
    as every other mgll output does, and draws no progress bar of transformers'."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        out = export_hf_clip_vision(perturbed_vit(False), PREPROCESS, tmp_path / "hf")
    finally:
        os.umask(old)
    assert "Writing model shards" not in capfd.readouterr().err
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes


def test_image_processor_uses_tower_size_mean_std(tmp_path):
    out = export_hf_clip_vision(perturbed_vit(False), PREPROCESS, tmp_path / "hf")
    processor = CLIPImageProcessor.from_pretrained(out)
    assert processor.crop_size == {"height": 32, "width": 32}
    assert processor.image_mean == pytest.approx([0.1, 0.2, 0.3])
    assert processor.image_std == pytest.approx([0.5, 0.6, 0.7])
    pixels = processor(images=torch.zeros(3, 50, 40, dtype=torch.uint8), return_tensors="pt")
    assert pixels["pixel_values"].shape == (1, 3, 32, 32)
    # A black image normalises to -mean/std in every channel.
    expected = torch.tensor([-0.1 / 0.5, -0.2 / 0.6, -0.3 / 0.7]).view(3, 1, 1)
    assert torch.allclose(pixels["pixel_values"][0], expected.expand(3, 32, 32), atol=1e-5)


def test_convolutional_tower_is_refused_with_a_message(tmp_path):
    resnet = _build_vision_tower(16, {"layers": [1, 1, 1, 1], "width": 8, "image_size": 32}, False)
    with pytest.raises(HFExportError, match="needs a ViT image tower; this one is ModifiedResNet"):
        export_hf_clip_vision(resnet, PREPROCESS, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_attention_pooling_is_refused(tmp_path):
    pooled = perturbed_vit(False, attentional_pool=True, attn_pooler_heads=2, attn_pooler_queries=4)
    with pytest.raises(HFExportError, match="attentional pooling"):
        export_hf_clip_vision(pooled, PREPROCESS, tmp_path / "hf")


def test_non_empty_output_dir_is_refused(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("x")
    with pytest.raises(HFExportError, match="exists and is not an empty folder"):
        export_hf_clip_vision(perturbed_vit(False), PREPROCESS, tmp_path / "hf")
    assert (tmp_path / "hf" / "keep.txt").read_text() == "x"


def test_export_command_writes_a_run_tower_and_refuses_a_missing_output_dir(tmp_path, capsys):
    from mgll.cli import main
    from mgll.models import create_model
    from mgll.training.checkpoint import save_checkpoint

    config = {"model": {"image": {"arch": "mgll-vit-test-32"}, "text": {"type": "open_clip"}}}
    torch.manual_seed(0)
    model = create_model(config["model"]).eval()
    save_checkpoint(tmp_path / "run" / "checkpoints", 1, model, {"step": 1}, config, keep_last=1)
    argv = ["export", str(tmp_path / "run"), "--format", "hf-clip-vision"]
    assert main(argv) == 2  # a usage error, as argparse's
    assert (
        "mgll export: error: --format hf-clip-vision needs --output-dir" in capsys.readouterr().err
    )
    assert main([*argv, "--output-dir", str(tmp_path / "hf")]) == 0
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    hf = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert torch.allclose(
            hf(pixel_values=images).image_embeds, model.encode_image(images), atol=1e-4
        )
    info = json.loads((tmp_path / "hf" / "mgll_export.json").read_text())
    assert info["arch"] == "mgll-vit-test-32" and info["source"].endswith(
        "step_00000001.safetensors"
    )
