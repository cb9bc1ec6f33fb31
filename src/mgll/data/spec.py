"""Declarative dataset specs: a YAML/JSON file mapping a label table to the dataset model.

See docs/data.md for the full format. A minimal spec::

    table: labels.csv
    image: {column: path, root: images}
    patient: patient_id
    levels:
      - name: finding
        label: finding
        separator: "|"
        prompt: "A chest X-ray showing {label}."
      - name: report
        text: report

Every error names the spec key, the table file and (for cell errors) the row.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mgll.data.records import LevelInfo, Record, RecordSet, vocabulary_from
from mgll.data.tables import TableError, read_table
from mgll.errors import DataError
from mgll.schema import ConfigError, from_mapping

SPEC_SUFFIXES = (".yaml", ".yml", ".json")
_POSITIVE = ("1", "1.0", "true", "True", "yes")  # class-column values that mean 1, by default
T = TypeVar("T")


@dataclass(frozen=True)
class LevelEntry:
    """One ``levels[g]`` entry of a spec (docs/data.md); read by :func:`mgll.schema.from_mapping`,
    so an unknown key is named with its closest known one. Values that may be one thing or a
    list (``columns``, ``text``, ``prompt``, ``missing``, ``positive``) are checked by the
    reader, which knows the table's columns."""

    name: Any = None  # default: level<g+1>
    label: Any = None  # a label column
    columns: Any = None  # 0/1 class columns
    text: Any = None  # text column(s)
    prompt: Any = None  # template(s) over {label} and {column}
    separator: Any = None  # several labels in one cell
    multi_label: bool | None = None  # default: a separator or class columns
    vocabulary: Any = None
    missing: Any = None  # cell values that mean "no label" (default: empty)
    missing_text: Any = None
    positive: Any = None  # class-column values that mean 1


@dataclass(frozen=True)
class SpecFile:
    """A dataset spec's top-level keys (docs/data.md); ``table``, ``image`` and ``levels`` are
    required (the reader says so naming the key)."""

    name: Any = None
    table: Any = None
    format: Any = None
    image: Any = None  # a column name or {column, root}
    patient: Any = None
    metadata: Any = None
    exclude: Any = None
    split: Any = None
    levels: Any = None


class SpecError(DataError):
    """A dataset spec is invalid; the message names the spec key, file and row."""


def load_spec_file(path: str | Path) -> dict[str, Any]:
    """Parse a YAML or JSON spec into a dict (SpecError naming the file on failure)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"{path}: cannot read dataset spec ({exc.strerror or exc})") from exc
    try:
        spec = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise SpecError(
            f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({exc})"
        ) from exc
    if not isinstance(spec, dict):
        raise SpecError(f"{path}: a dataset spec must be a mapping with keys table, image, levels")
    return spec


def records_from_spec(
    spec: Mapping[str, Any] | str | Path, base_dir: str | Path | None = None
) -> RecordSet:
    """Records described by ``spec`` (a mapping, or the path of a YAML/JSON file).

    Relative paths in a spec file (table, image root) are relative to the spec file's folder,
    always. ``base_dir`` is only for a mapping: the folder its relative paths start from
    (default: the current folder).
    """
    if isinstance(spec, (str, Path)):
        if base_dir is not None:
            raise DataError(
                f"{spec}: base_dir applies to a spec mapping; a spec file's paths are relative "
                "to the file"
            )
        spec_path = Path(spec).absolute()
        mapping = load_spec_file(spec_path)
        base = spec_path.parent
        where = str(spec_path)
    else:
        mapping = dict(spec)
        base = Path(base_dir if base_dir is not None else Path.cwd()).absolute()
        where = "dataset spec"
    return _SpecReader(mapping, base, where).read()


def find_spec(source: str | Path, data_root: str | Path | None = None) -> Path:
    """The spec file ``source`` names: under ``data_root`` when it is there, else as given
    (relative to the current folder). SpecError listing the absolute paths tried if neither."""
    tried = [resolve_path(source, data_root).absolute(), Path(source).expanduser().absolute()]
    for candidate in tried:
        if candidate.is_file():
            return candidate
    shown = " or ".join(dict.fromkeys(str(t) for t in tried))
    raise SpecError(f"data.source: dataset spec {source} not found (tried {shown})")


@dataclass
class _Columns:
    """The table columns a spec names (each checked to exist) and the image root."""

    image: str
    root: Path
    patient: str | None
    split: str | None
    metadata: list[str]
    exclude: dict[str, set[str]]


class _SpecReader:
    """Reads one spec mapping; every error names the spec file and key."""

    def __init__(self, spec: dict[str, Any], base: Path, where: str) -> None:
        self.base = base
        self.where = where
        self.spec = self.entry(SpecFile, spec, "")

    def entry(self, cls: type[T], data: Mapping[str, Any], key: str) -> T:
        """``data`` as the dataclass ``cls`` (unknown keys named with the closest known one)."""
        try:
            return from_mapping(cls, data, key)
        except ConfigError as err:
            raise SpecError(f"{self.where}: {err}") from err

    def fail(self, key: str, message: str) -> SpecError:
        """A SpecError naming the spec file and ``key``."""
        return SpecError(f"{self.where}: {key}: {message}")

    def require(self, key: str) -> Any:
        """The value of top-level ``key`` (SpecError when absent or blank)."""
        value = getattr(self.spec, key)
        if value is None or (isinstance(value, str) and not value):
            raise self.fail(key, "is required (see docs/data.md for the spec format)")
        return value

    def column(self, key: str, name: Any) -> str:
        """``name`` when it is a column of the table (SpecError listing the columns if not)."""
        if not isinstance(name, str) or name not in self.frame.columns:
            raise self.fail(
                key,
                f"column {name!r} not found in {self.table_path} "
                f"(columns: {', '.join(map(str, self.frame.columns))})",
            )
        return name

    def read(self) -> RecordSet:
        """Validate the spec, read the table and build the records."""
        self.read_table()
        columns = self.columns()
        levels = self.levels()
        result = RecordSet(
            levels=[],
            records=[],
            source=str(self.table_path),
            missing_cells=Counter(self.frame.attrs.get("missing_cells", {})),
        )
        per_level_labels, kept_rows = self.row_labels(levels, columns, result)
        infos = [
            self.level_info(g, level, per_level_labels[g], kept_rows)
            for g, level in enumerate(levels)
        ]
        for k, (number, row) in enumerate(kept_rows):
            labels = [per_level_labels[g][k] for g in range(len(levels))]
            result.records.append(self.record(number, row, labels, levels, columns))
        result.levels = infos
        return result

    def read_table(self) -> None:
        """Read ``table`` (with ``format``) into :attr:`frame`."""
        table = self.require("table")
        self.table_path = _normalised(table, self.base)
        try:
            self.frame = read_table(self.table_path, self.spec.format)
        except TableError as exc:
            raise self.fail("table", str(exc)) from exc

    def columns(self) -> _Columns:
        """The image, patient, split, metadata and exclude columns, each checked to exist."""
        image_cfg = self.require("image")
        if isinstance(image_cfg, str):
            image_cfg = {"column": image_cfg}
        if not isinstance(image_cfg, Mapping):
            raise self.fail("image", "must be a column name or {column: ..., root: ...}")
        image_col = self.column("image.column", image_cfg.get("column"))
        root = _normalised(image_cfg.get("root", "."), self.base)
        spec = self.spec
        patient_col = self.column("patient", spec.patient) if spec.patient else None
        split_col = self.column("split", spec.split) if spec.split else None
        meta_cols = [self.column(f"metadata[{i}]", c) for i, c in enumerate(spec.metadata or [])]
        exclude = spec.exclude or {}
        if not isinstance(exclude, Mapping):
            raise self.fail("exclude", "must map column names to lists of values to leave out")
        exclude_cols = {
            self.column(f"exclude.{c}", c): {str(v) for v in _as_list(vals)}
            for c, vals in exclude.items()
        }
        return _Columns(image_col, root, patient_col, split_col, meta_cols, exclude_cols)

    def levels(self) -> list[_LevelSpec]:
        """The parsed ``levels`` list, coarse to fine."""
        level_cfgs = self.require("levels")
        if not isinstance(level_cfgs, list) or not level_cfgs:
            raise self.fail(
                "levels", "must be a non-empty list, one entry per granularity (coarse to fine)"
            )
        return [self.parse_level(i, cfg) for i, cfg in enumerate(level_cfgs)]

    def row_labels(
        self, levels: Sequence[_LevelSpec], columns: _Columns, result: RecordSet
    ) -> tuple[list[list[list[str]]], list[tuple[int, dict[str, str]]]]:
        """Per level, the class names of every kept row; the kept rows with their numbers.
        Excluded rows are counted in ``result``."""
        per_level_labels: list[list[list[str]]] = [[] for _ in levels]
        kept_rows: list[tuple[int, dict[str, str]]] = []
        for number, row in enumerate(self.frame.to_dict("records"), start=1):
            dropped = next(
                (c for c, vals in columns.exclude.items() if row[c].strip() in vals), None
            )
            if dropped is not None:
                result.exclude(f"{dropped} = {row[dropped]!r} (exclude)", f"row {number}")
                continue
            if not row[columns.image].strip():
                raise self.fail(
                    "image.column",
                    f"{self.table_path} row {number}: column {columns.image!r} is empty; "
                    "every row needs an image path",
                )
            for g, level in enumerate(levels):
                names = level.labels(row)
                if len(names) > 1 and not level.multi_label:
                    raise self.fail(
                        f"{level.key}.multi_label",
                        f"{self.table_path} row {number}: {names} are several classes at a "
                        "single-label level; set multi_label: true",
                    )
                per_level_labels[g].append(names)
            kept_rows.append((number, row))
        return per_level_labels, kept_rows

    def level_info(
        self,
        g: int,
        level: _LevelSpec,
        labels: Sequence[list[str]],
        kept_rows: Sequence[tuple[int, dict[str, str]]],
    ) -> LevelInfo:
        """Level ``g``'s vocabulary (a given one checked to hold every label in the rows)."""
        vocab = vocabulary_from(labels, level.vocabulary)
        if level.vocabulary is not None:
            allowed = set(vocab)
            for (number, _), names in zip(kept_rows, labels, strict=True):
                outside = [n for n in names if n not in allowed]
                if outside:
                    raise self.fail(
                        f"levels[{g}].vocabulary",
                        f"{self.table_path} row {number}: label(s) {outside} are not in the "
                        "vocabulary; add them or list the value under missing",
                    )
        return LevelInfo(name=level.name, vocabulary=vocab, multi_label=level.multi_label)

    def record(
        self,
        number: int,
        row: dict[str, str],
        labels: list[list[str]],
        levels: Sequence[_LevelSpec],
        columns: _Columns,
    ) -> Record:
        """The record of table row ``number``."""
        texts = [level.texts(row, labels[g]) for g, level in enumerate(levels)]
        metadata: dict[str, Any] = {c: row[c] for c in columns.metadata}
        metadata["row"] = number
        if columns.split is not None and row[columns.split].strip():
            metadata["split"] = row[columns.split].strip().lower()
        return Record(
            image=_normalised(row[columns.image].strip(), columns.root),
            texts=texts,
            labels=labels,
            patient_id=(row[columns.patient].strip() or None) if columns.patient else None,
            metadata=metadata,
        )

    def parse_level(self, g: int, entry: Any) -> _LevelSpec:
        """Validate ``levels[g]`` against the table's columns."""
        key = f"levels[{g}]"
        if not isinstance(entry, Mapping):
            raise self.fail(key, "must be a mapping with a name and a label, columns or text")
        cfg = self.entry(LevelEntry, entry, key)
        if not (cfg.label or cfg.columns or cfg.text):
            raise self.fail(
                key,
                "needs a label column (label), 0/1 class columns (columns) or a text column (text)",
            )
        label_col = self.column(f"{key}.label", cfg.label) if cfg.label else None
        class_cols = [
            self.column(f"{key}.columns[{i}]", c) for i, c in enumerate(_as_list(cfg.columns))
        ]
        text_cols = [self.column(f"{key}.text", c) for c in _as_list(cfg.text)]
        if label_col and class_cols:
            raise self.fail(key, "give either label or columns, not both")
        separator = cfg.separator
        multi = cfg.multi_label if cfg.multi_label is not None else bool(separator or class_cols)
        if separator and not multi:
            raise self.fail(
                f"{key}.multi_label",
                "is false but a separator is set; a row could carry several labels",
            )
        prompts = [str(p) for p in _as_list(cfg.prompt)]
        for i, p in enumerate(prompts):
            try:
                p.format_map(_Placeholders({"label": "x"}, set(self.frame.columns)))
            except (KeyError, ValueError, IndexError) as exc:
                raise self.fail(
                    f"{key}.prompt[{i}]",
                    f"{p!r} is not a valid template ({exc}); use {{label}} or {{column}}",
                ) from exc
        vocab = cfg.vocabulary
        if vocab is None and class_cols:
            vocab = class_cols  # one class per 0/1 column, in column order, even if never 1
        return _LevelSpec(
            name=str(cfg.name or f"level{g + 1}"),
            key=key,
            label_col=label_col,
            class_cols=class_cols,
            text_cols=text_cols,
            prompts=prompts,
            separator=str(separator) if separator else None,
            multi_label=multi,
            vocabulary=[str(v) for v in vocab] if vocab is not None else None,
            missing={str(v) for v in _as_list(cfg.missing)} | {""},
            missing_text=str(cfg.missing_text if cfg.missing_text is not None else ""),
            positive={str(v) for v in _as_list(cfg.positive or _POSITIVE)},
        )


@dataclass
class _LevelSpec:
    """One parsed ``levels[g]`` entry: where its labels and texts come from."""

    name: str
    key: str
    label_col: str | None
    class_cols: list[str]
    text_cols: list[str]
    prompts: list[str]
    separator: str | None
    multi_label: bool
    vocabulary: list[str] | None
    missing: set[str]
    missing_text: str
    positive: set[str]

    def labels(self, row: dict[str, str]) -> list[str]:
        """Class names of ``row`` at this level (empty = missing)."""
        if self.class_cols:
            return [c for c in self.class_cols if row[c].strip() in self.positive]
        if self.label_col is not None:
            value = row[self.label_col].strip()
            parts = value.split(self.separator) if self.separator else [value]
            names = [p.strip() for p in parts]
            return list(dict.fromkeys(n for n in names if n not in self.missing))
        # Free text only: identical texts are positives of each other (the authors' rule).
        texts = [row[c].strip() for c in self.text_cols]
        return [texts[0]] if texts and texts[0] not in self.missing else []

    def texts(self, row: dict[str, str], labels: Sequence[str]) -> list[str]:
        """Candidate texts of ``row``: its text cells, else the prompts over its labels."""
        candidates = [row[c].strip() for c in self.text_cols if row[c].strip()]
        if candidates:
            return candidates
        if not labels:
            return [self.missing_text]
        joined = ", ".join(labels)
        if self.prompts:
            values = _Placeholders({"label": joined}, set(row))
            values.update(row)
            return [p.format_map(values) for p in self.prompts]
        return [joined]


class _Placeholders(dict):
    """Template values: {label} and any table column; an unknown name raises KeyError."""

    def __init__(self, values: dict[str, str], columns: set[str]) -> None:
        super().__init__(values)
        self.columns = columns

    def __missing__(self, key: str) -> str:
        if key in self.columns:
            return ""
        raise KeyError(f"{{{key}}} is neither 'label' nor a column of the table")


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def resolve_path(value: Any, base: str | Path | None) -> Path:
    """``value`` as a path (``~`` expanded): as given when absolute or ``base`` is None, else
    under ``base``."""
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() or base is None else Path(base) / path


def _normalised(value: Any, base: Path) -> Path:
    """``value`` under the absolute folder ``base``, with ``..`` folded away (for messages, and
    so split files can write images relative to the dataset folder)."""
    return Path(os.path.normpath(resolve_path(value, base)))


def is_spec_path(path: str | Path) -> bool:
    """True when ``path`` names a spec file (by its suffix)."""
    return Path(path).suffix.lower() in SPEC_SUFFIXES
