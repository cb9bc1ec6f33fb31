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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

_TOP_KEYS = {"levels", "sources", "derive", "split", "sampling", "missing_text"}
_SOURCE_KEYS = {
    "name",
    "source",
    "path",
    "options",
    "levels",
    "rename",
    "prompt",
    "weight",
    "split",
}
_DERIVE_KEYS = {"from", "map", "prompt"}
_SPLIT_KEYS = {"mode", "train", "val", "test", "seed"}
_OTHER = "*"  # in a derive map: every label not listed


class PoolError(SpecError):
    """A pool file is invalid; the message names the file and the key."""


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


@dataclass
class _Source:
    """One parsed ``sources[i]`` entry."""

    key: str
    name: str
    source: str | None
    path: Path | None
    options: dict[str, Any]
    levels: dict[str, str]  # source level name -> pool level name
    rename: dict[str, dict[str, str]]  # pool level -> {old: new}
    prompt: dict[str, str]  # pool level -> template with {label}
    weight: float
    split: dict[str, Any] | str | None  # "source", fractions, or None (the pool's)


@dataclass
class _Derived:
    level: str
    origin: str
    mapping: dict[str, str]
    prompt: str


@dataclass
class _SplitRule:
    mode: str = "source"
    fractions: dict[str, float] = field(default_factory=dict)
    seed: int = 0


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
    return _PoolReader(load_spec_file(path), path, data_root, read_source).read()


class _PoolReader:
    """Reads one pool file: parse and validate every key first, then load the sources."""

    def __init__(
        self,
        spec: dict[str, Any],
        path: Path,
        data_root: str | Path | None,
        read_source: SourceReader,
    ) -> None:
        self.read_source = read_source
        self.spec = spec
        self.path = path
        self.base = path.parent
        self.data_root = data_root
        self.source_multi: dict[tuple[str, str], bool] = {}  # (source, level) -> multi-label

    def fail(self, key: str, message: str) -> PoolError:
        return PoolError(f"{self.path}: {key}: {message}")

    # ---- parsing ----------------------------------------------------------------------------

    def read(self) -> RecordSet:
        """The pool's records (the steps of the module docstring, in order)."""
        unknown = sorted(set(self.spec) - _TOP_KEYS)
        if unknown:
            raise self.fail(unknown[0], f"unknown key; known keys: {sorted(_TOP_KEYS)}")
        levels = self.spec.get("levels")
        if (
            not isinstance(levels, list)
            or not levels
            or not all(isinstance(v, str) and v for v in levels)
        ):
            raise self.fail("levels", "must list the pool's level names, coarse to fine")
        if len(set(levels)) != len(levels):
            raise self.fail("levels", f"names a level twice: {levels}")
        self.levels: list[str] = list(levels)
        sources = self.spec.get("sources")
        if not isinstance(sources, list) or not sources:
            raise self.fail("sources", "must be a non-empty list of {source, path, levels}")
        parsed = [self.parse_source(i, s) for i, s in enumerate(sources)]
        names = Counter(s.name for s in parsed)
        twice = sorted(n for n, k in names.items() if k > 1)
        if twice:
            raise self.fail(
                "sources", f"two sources are named {twice[0]!r}; give each its own name"
            )
        derived = self.parse_derive()
        split = self.parse_split("split", self.spec.get("split") or {})
        sampling = self.spec.get("sampling") or {}
        if not isinstance(sampling, Mapping) or set(sampling) - {"temperature"}:
            raise self.fail("sampling", "takes one key, temperature (a number > 0)")
        temperature = self.number("sampling.temperature", sampling.get("temperature", 1.0))
        if temperature <= 0:
            raise self.fail("sampling.temperature", f"must be > 0, got {temperature}")
        missing_text = str(self.spec.get("missing_text", ""))

        result = RecordSet(levels=[], records=[], source=str(self.path))
        folders: list[Path] = []
        for src in parsed:
            records, folder = self.load_source(src)
            folders.append(folder)
            converted = self.convert(src, records, missing_text)
            for reason, n in records.excluded.items():
                result.excluded[f"{src.name}: {reason}"] += n
                result.excluded_examples[f"{src.name}: {reason}"] = list(
                    records.excluded_examples.get(reason, [])
                )
            for cell, n in records.missing_cells.items():
                result.missing_cells[(f"{src.name}: {cell[0]}", cell[1])] += n
            result.records.extend(converted)
        for rule in derived:
            self.derive(rule, result.records)
        infos = []
        for src, folder in zip(parsed, folders, strict=True):
            own = [r for r in result.records if r.metadata["source"] == src.name]
            labelled = tuple(
                lv for g, lv in enumerate(self.levels) if any(r.labels[g] for r in own)
            )
            infos.append(PoolSource(src.name, folder, src.weight, labelled, len(own)))
        multi = {lv: False for lv in self.levels}
        for src in parsed:
            for source_level, pool_level in src.levels.items():
                multi[pool_level] |= self.source_multi[(src.name, source_level)]
        for rule in derived:  # several origin labels may map to several derived ones
            multi[rule.level] |= multi[rule.origin]
        result.levels = build_levels(
            self.levels, result.records, multi_label=[multi[lv] for lv in self.levels]
        )
        identical = self.link_identical(result.records)
        moved = self.assign_splits(parsed, split, result.records)
        result.pool = PoolInfo(
            file=str(self.path),
            sources=tuple(infos),
            temperature=temperature,
            identical=tuple(tuple(str(result.records[i].image) for i in g) for g in identical),
            moved=tuple(moved),
        )
        return result

    def number(self, key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key, f"must be a number, got {value!r}")
        return float(value)

    def mapping(self, key: str, value: Any) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(key, f"must be a mapping, got {value!r}")
        return {str(k): v for k, v in value.items()}

    def pool_level(self, key: str, name: str) -> str:
        if name not in self.levels:
            raise self.fail(key, f"{name!r} is not a pool level; pool levels: {self.levels}")
        return name

    def parse_source(self, i: int, cfg: Any) -> _Source:
        key = f"sources[{i}]"
        if not isinstance(cfg, Mapping):
            raise self.fail(key, "must be a mapping {source, path, levels}")
        unknown = sorted(set(cfg) - _SOURCE_KEYS)
        if unknown:
            raise self.fail(
                f"{key}.{unknown[0]}", f"unknown key; known keys: {sorted(_SOURCE_KEYS)}"
            )
        source = cfg.get("source")
        path = cfg.get("path")
        if not source and not path:
            raise self.fail(key, "needs a source (format name or spec file) or a path (folder)")
        if source is not None and is_spec_path(str(source)):
            if path is not None:
                raise self.fail(
                    f"{key}.path", "is not used with a spec file (its paths are relative to it)"
                )
            default_name = Path(str(source)).stem
        else:
            default_name = str(source) if source else Path(str(path)).name
        name = str(cfg.get("name") or default_name)
        if ":" in name:
            raise self.fail(f"{key}.name", f"{name!r}: ':' separates source and patient id")
        levels = self.mapping(f"{key}.levels", cfg.get("levels"))
        if not levels:
            raise self.fail(
                f"{key}.levels",
                "must map the source's level names onto pool levels, e.g. {severity: disease}",
            )
        for source_level, pool_level in levels.items():
            self.pool_level(f"{key}.levels.{source_level}", str(pool_level))
        targets = Counter(str(v) for v in levels.values())
        twice = [lv for lv, n in targets.items() if n > 1]
        if twice:
            raise self.fail(f"{key}.levels", f"maps two source levels onto {twice[0]!r}")
        rename: dict[str, dict[str, str]] = {}
        for level, table in self.mapping(f"{key}.rename", cfg.get("rename")).items():
            self.pool_level(f"{key}.rename.{level}", level)
            rename[level] = {
                str(a): str(b) for a, b in self.mapping(f"{key}.rename.{level}", table).items()
            }
        prompt = {}
        for level, template in self.mapping(f"{key}.prompt", cfg.get("prompt")).items():
            self.pool_level(f"{key}.prompt.{level}", level)
            prompt[level] = self.template(f"{key}.prompt.{level}", template)
        weight = self.number(f"{key}.weight", cfg.get("weight", 1.0))
        if weight <= 0:
            raise self.fail(f"{key}.weight", f"must be > 0, got {weight} (leave a source out)")
        split = cfg.get("split")
        if split is not None and split != "source":
            self.parse_split(f"{key}.split", split, allow_mode=False)
        return _Source(
            key=key,
            name=name,
            source=str(source) if source else None,
            path=Path(str(path)) if path is not None else None,
            options=self.mapping(f"{key}.options", cfg.get("options")),
            levels={k: str(v) for k, v in levels.items()},
            rename=rename,
            prompt=prompt,
            weight=weight,
            split=split,
        )

    def template(self, key: str, template: Any) -> str:
        text = str(template)
        try:
            text.format(label="x")
        except (KeyError, ValueError, IndexError) as exc:
            raise self.fail(
                key, f"{text!r} is not a valid template ({exc}); use {{label}}"
            ) from exc
        return text

    def parse_derive(self) -> list[_Derived]:
        rules = []
        for level, cfg in self.mapping("derive", self.spec.get("derive")).items():
            key = f"derive.{level}"
            self.pool_level(key, level)
            cfg = self.mapping(key, cfg)
            unknown = sorted(set(cfg) - _DERIVE_KEYS)
            if unknown:
                raise self.fail(
                    f"{key}.{unknown[0]}", f"unknown key; known: {sorted(_DERIVE_KEYS)}"
                )
            origin = self.pool_level(f"{key}.from", str(cfg.get("from", "")))
            if origin == level:
                raise self.fail(f"{key}.from", "a level cannot be derived from itself")
            mapping = {
                str(a): str(b) for a, b in self.mapping(f"{key}.map", cfg.get("map")).items()
            }
            if not mapping:
                raise self.fail(
                    f"{key}.map",
                    "must map labels of the origin level, e.g. {normal: normal, '*': abnormal}",
                )
            prompt = self.template(f"{key}.prompt", cfg.get("prompt", "{label}"))
            rules.append(_Derived(level, origin, mapping, prompt))
        return rules

    def parse_split(self, key: str, cfg: Any, allow_mode: bool = True) -> _SplitRule:
        cfg = self.mapping(key, cfg)
        keys = _SPLIT_KEYS if allow_mode else _SPLIT_KEYS - {"mode"}
        unknown = sorted(set(cfg) - keys)
        if unknown:
            raise self.fail(f"{key}.{unknown[0]}", f"unknown key; known: {sorted(keys)}")
        mode = cfg.get("mode", "source")
        if mode not in ("source", "patient"):
            raise self.fail(f"{key}.mode", f"must be source or patient, got {mode!r}")
        fractions = {n: self.number(f"{key}.{n}", cfg[n]) for n in SPLIT_NAMES if n in cfg}
        try:
            split_fractions(fractions)
        except ValueError as exc:
            raise self.fail(key, str(exc).removeprefix("data.split: ")) from None
        seed = cfg.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise self.fail(f"{key}.seed", f"must be an integer, got {seed!r}")
        return _SplitRule(mode, fractions, seed)

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
        except ValueError as exc:
            raise self.fail(src.key, f"source {src.name!r}: {exc}") from exc
        names = [lv.name for lv in records.levels]
        for source_level in src.levels:
            if source_level not in names:
                raise self.fail(
                    f"{src.key}.levels.{source_level}",
                    f"source {src.name!r} has no level {source_level!r}; its levels: {names}",
                )
        for lv in records.levels:
            self.source_multi[(src.name, lv.name)] = lv.multi_label
        return records, folder

    def convert(self, src: _Source, records: RecordSet, missing_text: str) -> list[Record]:
        """The source's records at the pool's levels (see the module docstring, steps 1-2)."""
        where = {lv.name: g for g, lv in enumerate(records.levels)}
        pool_from = {pool: where[source] for source, pool in src.levels.items()}
        out = []
        for r in records.records:
            texts, labels = [], []
            for level in self.levels:
                g = pool_from.get(level)
                if g is None:
                    texts.append([missing_text])
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

    def derive(self, rule: _Derived, records: Sequence[Record]) -> None:
        """Fill ``rule.level`` from ``rule.origin`` where a record lacks it."""
        g, origin = self.levels.index(rule.level), self.levels.index(rule.origin)
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

    def assign_splits(
        self, sources: Sequence[_Source], rule: _SplitRule, records: list[Record]
    ) -> list[str]:
        """Set ``metadata["split"]`` of every record; returns the images moved by a link."""
        for src in sources:
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
            own_rule = (
                self.parse_split(f"{src.key}.split", src.split, allow_mode=False)
                if isinstance(src.split, Mapping)
                else rule
            )
            parts = patient_split(
                [records[i] for i in members],
                own_rule.fractions or None,
                seed=own_rule.seed,
            )
            for name, idx in parts.items():
                for k in idx:
                    records[members[k]].metadata["split"] = name
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
