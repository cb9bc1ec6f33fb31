"""Pools: several datasets read as one multi-granular corpus (the paper's MGLL-Fundus, small).

A pool file (YAML) lists sources, each a format name or a dataset spec, and maps each source's
levels onto the pool's levels; it produces one :class:`RecordSet` whose records name their
source, so datasets, splits, checks and evaluation read a pool like any dataset. A minimal
pool::

    levels: [disease, explanation]        # the pool's levels, coarse to fine
    sources:
      - {source: csdi-fundus, path: csdi-fundus,
         levels: {severity: disease, description: explanation}}
      - {source: palm, path: palm, levels: {diagnosis: disease}}
    split: {mode: source}

What a pool does to the records of its sources, in order:

1. a pool level a source does not map is missing for its records (empty labels: MGLL's
   missing-label rule), its text ``missing_text``;
2. ``rename`` renames label values per source and pool level ("Normal" -> "normal");
   ``prompt`` rewrites a source's texts at a level from its labels;
3. ``derive`` fills a level from another where a record lacks it (normal/abnormal from the
   disease);
4. patient ids become ``<source>:<patient>``; records whose image files are byte-identical
   (within or across sources) are one patient, so no split separates them;
5. ``split``: each record gets the split its source ships (``mode: source``; a source without
   one is split by patient fractions), or patient fractions for every source (``mode:
   patient``); a group of identical images lands in its most held-out split (test, then val),
   so a test photo copied into a training set never trains.

Paths in a pool file are relative to it; a source folder not found there is looked up under
the data root (``--data-root``), so a pool file shipped with the package reads the user's data.
See docs/data.md, "Pools".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mgll.data.records import PoolInfo, PoolSource, Record, RecordSet, build_levels
from mgll.data.spec import SpecError, is_spec_path, load_spec_file, resolve_path
from mgll.data.splits import (
    SPLIT_NAMES,
    identical_file_groups,
    linked_patient_keys,
    patient_key,
    patient_split,
    split_fractions,
)
from mgll.errors import DataError, UserError
from mgll.schema import ConfigError, from_mapping

_OTHER = "*"  # in a derive map: every label not listed


class PoolError(SpecError):
    """A pool file is invalid; the message names the file and the key."""


# ---- the pool file, as schema.from_mapping reads it --------------------------------------------


@dataclass(frozen=True)
class SourceSplit:
    """A source's own ``split:``: patient fractions (left out: the defaults) and their seed."""

    train: float | None = None
    val: float | None = None
    test: float | None = None
    seed: int = 0

    def fractions(self) -> dict[str, float]:
        """The fractions given, by split name."""
        given = {name: getattr(self, name) for name in SPLIT_NAMES}
        return {name: value for name, value in given.items() if value is not None}


@dataclass(frozen=True)
class PoolSplit(SourceSplit):
    """``split:``: each source's shipped split (``mode: source``; a source without one is split
    by the fractions), or the fractions for every source (``mode: patient``)."""

    mode: Literal["source", "patient"] = "source"


@dataclass(frozen=True)
class SourceEntry:
    """One ``sources[i]`` entry: a format name and folder, or a spec file; its levels mapped
    onto the pool's, its labels renamed, its texts prompted, its weight and split."""

    source: str | None = None
    path: str | None = None
    name: str | None = None
    options: dict[str, Any] | None = None
    levels: dict[str, str] | None = None  # source level name -> pool level name
    rename: dict[str, dict[str, str]] | None = None  # pool level -> {old: new}
    prompt: dict[str, str] | None = None  # pool level -> template with {label}
    weight: float = 1.0
    split: Literal["source"] | SourceSplit | None = None  # None: the pool's


@dataclass(frozen=True)
class DeriveRule:
    """``derive.LEVEL``: fill LEVEL from another level's labels where a record lacks it."""

    origin: str = field(default="", metadata={"key": "from"})
    labels: dict[str, str] | None = field(default=None, metadata={"key": "map"})
    prompt: str = "{label}"


@dataclass(frozen=True)
class Sampling:
    """``sampling:``: how sources are drawn (see :func:`sampling_weights`)."""

    temperature: float = 1.0


@dataclass(frozen=True)
class PoolFile:
    """A pool file's keys and their types (the rules across keys are :class:`_PoolReader`'s)."""

    levels: list[str] = field(default_factory=list)
    sources: list[SourceEntry] = field(default_factory=list)
    derive: dict[str, DeriveRule] | None = None
    split: PoolSplit = field(default_factory=PoolSplit)
    sampling: Sampling = field(default_factory=Sampling)
    missing_text: str = ""


def is_pool_file(path: str | Path) -> bool:
    """True when ``path`` is a spec-like file whose mapping has ``sources`` (a pool, not a
    single-table spec)."""
    path = Path(path)
    if not (is_spec_path(path) and path.is_file()):
        return False
    try:
        return "sources" in load_spec_file(path)
    except SpecError:
        return False  # the spec reader reports what is wrong with it


# ---- the pool, checked across keys --------------------------------------------------------------


@dataclass
class _Source:
    """One ``sources[i]`` entry, checked, with its name and paths resolved."""

    key: str
    name: str
    source: str | None
    path: Path | None
    options: dict[str, Any]
    levels: dict[str, str]  # source level name -> pool level name
    rename: dict[str, dict[str, str]]  # pool level -> {old: new}
    prompt: dict[str, str]  # pool level -> template with {label}
    weight: float
    split: SourceSplit | str | None  # "source", fractions, or None (the pool's)


@dataclass
class _Derived:
    level: str
    origin: str
    mapping: dict[str, str]
    prompt: str


@dataclass
class _Pool:
    """A pool file checked across keys: what :meth:`_PoolReader.read` reads."""

    levels: list[str]
    sources: list[_Source]
    derived: list[_Derived]
    split: PoolSplit
    temperature: float
    missing_text: str


# How a source is read: ``mgll.data.build.load_records`` (source, path, options) -> (records,
# folder). Passed in, since build reads pools through this module.
SourceReader = Callable[..., tuple[RecordSet, Path]]


def read_pool(
    path: str | Path, data_root: str | Path | None, read_source: SourceReader
) -> RecordSet:
    """The records of the pool file ``path`` (see the module docstring), each source read by
    ``read_source``; every error names the pool file and key (and the source's own file or
    row where the source reports it). ``mgll.data.load_pool`` reads with ``load_records``."""
    path = Path(path).absolute()
    try:
        spec = from_mapping(PoolFile, load_spec_file(path))
    except ConfigError as err:
        raise PoolError(f"{path}: {err}") from err
    reader = _PoolReader(path, data_root, read_source)
    return reader.read(reader.check(spec))


class _PoolReader:
    """Reads one pool file: every key checked first (:meth:`check`), then the sources loaded,
    converted and split (:meth:`read`)."""

    def __init__(self, path: Path, data_root: str | Path | None, read_source: SourceReader) -> None:
        self.read_source = read_source
        self.path = path
        self.base = path.parent
        self.data_root = data_root

    def fail(self, key: str, message: str) -> PoolError:
        return PoolError(f"{self.path}: {key}: {message}")

    def read(self, pool: _Pool) -> RecordSet:
        """The pool's records (the steps of the module docstring, in order)."""
        result, folders, multi = self.load_sources(pool)
        for rule in pool.derived:
            self.derive(pool, rule, result.records)
            multi[rule.level] |= multi[rule.origin]  # several origin labels may map to several
        result.levels = build_levels(
            pool.levels, result.records, multi_label=[multi[lv] for lv in pool.levels]
        )
        identical = self.link_identical(result.records)
        moved = self.assign_splits(pool, result.records)
        result.pool = PoolInfo(
            file=str(self.path),
            sources=tuple(
                self.source_info(pool, src, folders[src.name], result.records)
                for src in pool.sources
            ),
            temperature=pool.temperature,
            identical=tuple(tuple(str(result.records[i].image) for i in g) for g in identical),
            moved=tuple(moved),
        )
        return result

    # ---- checking ---------------------------------------------------------------------------

    def check(self, spec: PoolFile) -> _Pool:
        """The rules across keys (:func:`~mgll.schema.from_mapping` checked the keys and types):
        levels named once, sources named apart, derived levels and splits that make sense."""
        levels = list(spec.levels)
        if not levels or not all(levels):
            raise self.fail("levels", "must list the pool's level names, coarse to fine")
        if len(set(levels)) != len(levels):
            raise self.fail("levels", f"names a level twice: {levels}")
        if not spec.sources:
            raise self.fail("sources", "must be a non-empty list of {source, path, levels}")
        sources = [self.source(i, entry, levels) for i, entry in enumerate(spec.sources)]
        twice = sorted(n for n, k in Counter(s.name for s in sources).items() if k > 1)
        if twice:
            raise self.fail(
                "sources", f"two sources are named {twice[0]!r}; give each its own name"
            )
        derived = [self.derived(lv, rule, levels) for lv, rule in (spec.derive or {}).items()]
        self.check_split("split", spec.split)
        temperature = spec.sampling.temperature
        if temperature <= 0:
            raise self.fail("sampling.temperature", f"must be > 0, got {temperature}")
        return _Pool(levels, sources, derived, spec.split, temperature, spec.missing_text)

    def pool_level(self, levels: Sequence[str], key: str, name: str) -> str:
        if name not in levels:
            raise self.fail(key, f"{name!r} is not a pool level; pool levels: {list(levels)}")
        return name

    def source(self, i: int, entry: SourceEntry, levels: Sequence[str]) -> _Source:
        """``sources[i]`` checked against the pool's levels, its name and paths resolved."""
        key, source, path = f"sources[{i}]", entry.source or None, entry.path
        if not source and not path:
            raise self.fail(key, "needs a source (format name or spec file) or a path (folder)")
        if source is not None and is_spec_path(source):
            if path is not None:
                raise self.fail(
                    f"{key}.path", "is not used with a spec file (its paths are relative to it)"
                )
            default_name = Path(source).stem
        else:
            default_name = source or Path(str(path)).name
        name = entry.name or default_name
        if ":" in name:
            raise self.fail(f"{key}.name", f"{name!r}: ':' separates source and patient id")
        mapped = dict(entry.levels or {})
        if not mapped:
            raise self.fail(
                f"{key}.levels",
                "must map the source's level names onto pool levels, e.g. {severity: disease}",
            )
        for source_level, pool_level in mapped.items():
            self.pool_level(levels, f"{key}.levels.{source_level}", pool_level)
        twice = [lv for lv, n in Counter(mapped.values()).items() if n > 1]
        if twice:
            raise self.fail(f"{key}.levels", f"maps two source levels onto {twice[0]!r}")
        rename = {
            self.pool_level(levels, f"{key}.rename.{level}", level): dict(table)
            for level, table in (entry.rename or {}).items()
        }
        prompt = {
            self.pool_level(levels, f"{key}.prompt.{level}", level): self.template(
                f"{key}.prompt.{level}", template
            )
            for level, template in (entry.prompt or {}).items()
        }
        if entry.weight <= 0:
            raise self.fail(
                f"{key}.weight", f"must be > 0, got {entry.weight} (leave a source out)"
            )
        if isinstance(entry.split, SourceSplit):
            self.check_split(f"{key}.split", entry.split)
        return _Source(
            key=key,
            name=name,
            source=source,
            path=Path(path) if path is not None else None,
            options=dict(entry.options or {}),
            levels=mapped,
            rename=rename,
            prompt=prompt,
            weight=entry.weight,
            split=entry.split,
        )

    def template(self, key: str, text: str) -> str:
        try:
            text.format(label="x")
        except (KeyError, ValueError, IndexError) as exc:
            raise self.fail(
                key, f"{text!r} is not a valid template ({exc}); use {{label}}"
            ) from exc
        return text

    def derived(self, level: str, rule: DeriveRule, levels: Sequence[str]) -> _Derived:
        """``derive.LEVEL`` checked against the pool's levels."""
        key = f"derive.{level}"
        self.pool_level(levels, key, level)
        origin = self.pool_level(levels, f"{key}.from", rule.origin)
        if origin == level:
            raise self.fail(f"{key}.from", "a level cannot be derived from itself")
        if not rule.labels:
            raise self.fail(
                f"{key}.map",
                "must map labels of the origin level, e.g. {normal: normal, '*': abnormal}",
            )
        prompt = self.template(f"{key}.prompt", rule.prompt)
        return _Derived(level, origin, dict(rule.labels), prompt)

    def check_split(self, key: str, split: SourceSplit) -> None:
        """Fractions that are >= 0 and sum to 1 (missing ones at their defaults)."""
        try:
            split_fractions(split.fractions())
        except DataError as exc:
            raise self.fail(key, str(exc).removeprefix("data.split: ")) from exc

    # ---- reading and converting -------------------------------------------------------------

    def locate(self, src: _Source, value: Path) -> Path:
        """``value`` relative to the pool file, else under the data root (SpecError listing
        both when neither exists)."""
        tried = [resolve_path(value, self.base)]
        if self.data_root is not None and not value.is_absolute():
            tried.append(resolve_path(value, self.data_root).absolute())
        for candidate in tried:
            if candidate.exists():
                return candidate
        shown = " or ".join(str(t) for t in tried)
        hint = "" if self.data_root is not None else " (or give the data root: --data-root)"
        raise self.fail(f"{src.key}", f"{value} not found (tried {shown}){hint}")

    def load_source(self, src: _Source) -> tuple[RecordSet, Path]:
        try:
            if src.source is not None and is_spec_path(src.source):
                spec = self.locate(src, Path(src.source))
                if is_pool_file(spec):
                    raise self.fail(f"{src.key}.source", f"{spec} is a pool; list its sources here")
                records, folder = self.read_source(str(spec), None, options=src.options)
            else:
                folder = self.locate(src, src.path) if src.path is not None else None
                if folder is None:
                    raise self.fail(f"{src.key}.path", "is required with a format name")
                records, folder = self.read_source(src.source, folder, options=src.options)
        except PoolError:
            raise
        except UserError as exc:  # the source names its file or row; a bug keeps its traceback
            raise self.fail(src.key, f"source {src.name!r}: {exc}") from exc
        names = [lv.name for lv in records.levels]
        for source_level in src.levels:
            if source_level not in names:
                raise self.fail(
                    f"{src.key}.levels.{source_level}",
                    f"source {src.name!r} has no level {source_level!r}; its levels: {names}",
                )
        return records, folder

    def load_sources(self, pool: _Pool) -> tuple[RecordSet, dict[str, Path], dict[str, bool]]:
        """Every source's records at the pool's levels (steps 1-2) in one record set, each
        source's folder, and per pool level whether a source labels it with several classes."""
        result = RecordSet(levels=[], records=[], source=str(self.path))
        folders: dict[str, Path] = {}
        multi = {lv: False for lv in pool.levels}
        for src in pool.sources:
            records, folders[src.name] = self.load_source(src)
            for lv in records.levels:
                if lv.name in src.levels:
                    multi[src.levels[lv.name]] |= lv.multi_label
            converted = self.convert(pool, src, records)
            for reason, n in records.excluded.items():
                result.excluded[f"{src.name}: {reason}"] += n
                result.excluded_examples[f"{src.name}: {reason}"] = list(
                    records.excluded_examples.get(reason, [])
                )
            for cell, n in records.missing_cells.items():
                result.missing_cells[(f"{src.name}: {cell[0]}", cell[1])] += n
            result.records.extend(converted)
        return result, folders, multi

    def source_info(
        self, pool: _Pool, src: _Source, folder: Path, records: Sequence[Record]
    ) -> PoolSource:
        """What the pool records of a source: its folder, weight, the levels it labels."""
        own = [r for r in records if r.metadata["source"] == src.name]
        labelled = tuple(lv for g, lv in enumerate(pool.levels) if any(r.labels[g] for r in own))
        return PoolSource(src.name, folder, src.weight, labelled, len(own))

    def convert(self, pool: _Pool, src: _Source, records: RecordSet) -> list[Record]:
        """The source's records at the pool's levels (see the module docstring, steps 1-2)."""
        where = {lv.name: g for g, lv in enumerate(records.levels)}
        pool_from = {pool: where[source] for source, pool in src.levels.items()}
        out = []
        for r in records.records:
            texts, labels = [], []
            for level in pool.levels:
                g = pool_from.get(level)
                if g is None:
                    texts.append([pool.missing_text])
                    labels.append([])
                    continue
                renames = src.rename.get(level, {})
                names = list(dict.fromkeys(renames.get(n, n) for n in r.labels[g]))
                labels.append(names)
                if level in src.prompt and names:
                    texts.append([src.prompt[level].format(label=", ".join(names))])
                else:
                    texts.append(list(r.texts[g]))
            metadata = dict(r.metadata)
            metadata["source"] = src.name
            if r.patient_id not in (None, ""):
                metadata["source_patient"] = r.patient_id
            out.append(
                Record(
                    image=r.image,
                    texts=texts,
                    labels=labels,
                    patient_id=f"{src.name}:{r.patient_id}"
                    if r.patient_id not in (None, "")
                    else None,
                    metadata=metadata,
                )
            )
        return out

    def derive(self, pool: _Pool, rule: _Derived, records: Sequence[Record]) -> None:
        """Fill ``rule.level`` from ``rule.origin`` where a record lacks it."""
        g, origin = pool.levels.index(rule.level), pool.levels.index(rule.origin)
        for r in records:
            if r.labels[g] or not r.labels[origin]:
                continue
            names = []
            for name in r.labels[origin]:
                target = rule.mapping.get(name, rule.mapping.get(_OTHER))
                if target is None:
                    raise self.fail(
                        f"derive.{rule.level}.map",
                        f"label {name!r} of level {rule.origin!r} ({r.metadata['source']}: "
                        f"{r.image}) has no entry; add it, or '*' for every other label",
                    )
                names.append(target)
            r.labels[g] = list(dict.fromkeys(names))
            r.texts[g] = [rule.prompt.format(label=", ".join(r.labels[g]))]

    def link_identical(self, records: list[Record]) -> list[list[int]]:
        """Give every patient joined by byte-identical images one patient id (that of the
        group's smallest patient key); returns the groups of identical images."""
        groups = identical_file_groups([r.image for r in records])
        keys = [patient_key(r) for r in records]
        linked = linked_patient_keys(records, groups)
        members: dict[str, set[str]] = {}
        for key, shared in zip(keys, linked, strict=True):
            members.setdefault(shared, set()).add(key)
        shared_id = {}
        for r, key in zip(records, keys, strict=True):
            if len(members.get(key, ())) > 1:  # this record's key represents a linked group
                shared_id[key] = r.patient_id or f"{r.metadata['source']}:{Path(r.image).name}"
        for r, shared in zip(records, linked, strict=True):
            if shared in shared_id:
                r.patient_id = shared_id[shared]
        return groups

    def assign_splits(self, pool: _Pool, records: list[Record]) -> list[str]:
        """Set ``metadata["split"]`` of every record; returns the images moved by a link."""
        rule = pool.split
        for src in pool.sources:
            members = [i for i, r in enumerate(records) if r.metadata["source"] == src.name]
            shipped = [records[i].metadata.get("split") for i in members]
            own = sum(name in SPLIT_NAMES for name in shipped)
            if src.split == "source" or (src.split is None and rule.mode == "source" and own):
                if own != len(members):
                    raise self.fail(
                        f"{src.key}.split",
                        f"source {src.name!r} ships a split for {own} of its {len(members)} "
                        "records; give it patient fractions instead ({train: 0.8, ...})",
                    )
                for i in members:
                    records[i].metadata["source_split"] = records[i].metadata["split"]
                continue
            own_rule = src.split if isinstance(src.split, SourceSplit) else rule
            parts = patient_split(
                [records[i] for i in members], own_rule.fractions() or None, seed=own_rule.seed
            )
            for name, idx in parts.items():
                for k in idx:
                    records[members[k]].metadata["split"] = name
        return _most_held_out(records)


def _most_held_out(records: Sequence[Record]) -> list[str]:
    """Give every image of a patient (after linking) the patient's most held-out split;
    returns the images moved."""
    # One patient (after linking), one split: the most held-out one among its images.
    order = {name: k for k, name in enumerate(SPLIT_NAMES)}
    latest: dict[str, str] = {}
    for r in records:
        key, name = patient_key(r), r.metadata["split"]
        if order[name] > order[latest.get(key, "train")]:
            latest[key] = name
    moved = []
    for r in records:
        target = latest.get(patient_key(r), r.metadata["split"])
        if order[target] > order[r.metadata["split"]]:
            moved.append(f"{r.image} ({r.metadata['split']} -> {target})")
            r.metadata["split"] = target
    return moved


def sampling_weights(records: RecordSet) -> list[float] | None:
    """Per record, its probability of being drawn, or None for uniform draws.

    A source ``s`` with ``n_s`` of the records and weight ``w_s`` is drawn with probability
    proportional to ``(w_s * n_s) ** (1 / T)`` (``T``: the pool's sampling temperature; T=1
    with equal weights is uniform over records, a large T is uniform over sources), shared
    evenly among its records.
    """
    pool = records.pool
    if pool is None:
        return None
    counts = Counter(r.metadata["source"] for r in records.records)
    weight = {s.name: s.weight for s in pool.sources}
    if pool.temperature == 1.0 and len({weight[s] for s in counts}) <= 1:
        return None
    mass = {s: (weight[s] * n) ** (1.0 / pool.temperature) for s, n in counts.items()}
    total = sum(mass.values())
    return [mass[s] / total / counts[s] for s in (r.metadata["source"] for r in records.records)]
