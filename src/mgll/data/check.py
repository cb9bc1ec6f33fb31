"""Dataset validation behind ``mgll data check``: what a user must fix before training.

Errors (non-zero exit): no samples at all, missing or undecodable image files, empty texts at a
level where the sample has a label, a patient in two splits (of the patient-level split, or of
the split the source ships). Warnings: empty texts where the label is missing
(the loss leaves the sample out of that level anyway), the same image file used by several
records, different files with identical bytes, rows the source left out (counted by reason).
Notes: table cells read as missing because of their spelling ("NaN", "N/A", ...).
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mgll.data.images import ImageLoadError, load_image
from mgll.data.records import Record, RecordSet
from mgll.data.splits import SPLIT_NAMES, file_digest, patient_key, patient_split
from mgll.data.tables import MISSING_SPELLINGS


@dataclass
class CheckReport:
    """Findings of :func:`check_records`; ``errors`` decides the exit code."""

    source: str
    num_records: int
    levels: list[dict[str, Any]]
    excluded: dict[str, int]
    excluded_examples: dict[str, list[str]] = field(default_factory=dict)
    missing_cells: dict[tuple[str, str], int] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    corrupt: list[tuple[str, str]] = field(default_factory=list)
    empty_texts: list[tuple[str, str]] = field(default_factory=list)
    empty_unlabelled_texts: list[tuple[str, str]] = field(default_factory=list)
    duplicate_paths: list[tuple[str, int]] = field(default_factory=list)
    identical_files: list[list[str]] = field(default_factory=list)
    identical_across_splits: list[list[str]] = field(default_factory=list)
    splits: dict[str, dict[str, int]] = field(default_factory=dict)
    split_overlap: list[str] = field(default_factory=list)
    source_splits: dict[str, dict[str, int]] = field(default_factory=dict)
    source_split_overlap: list[str] = field(default_factory=list)
    decoded: bool = True
    sources: list[dict[str, Any]] = field(default_factory=list)  # a pool's, one entry each
    label_conflicts: list[str] = field(default_factory=list)
    identical_across_sources: list[list[str]] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)

    @property
    def errors(self) -> int:
        """Number of problems that make the dataset unfit as it is."""
        return (
            (self.num_records == 0)  # `pretrain` refuses an empty dataset too
            + len(self.missing)
            + len(self.corrupt)
            + len(self.empty_texts)
            + len(self.split_overlap)
            + len(self.source_split_overlap)
            + len(self.label_conflicts)
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form (for --json)."""
        return {
            "source": self.source,
            "num_records": self.num_records,
            "levels": self.levels,
            "excluded": self.excluded,
            "excluded_examples": self.excluded_examples,
            "missing_cells": [
                {"column": column, "value": value, "cells": n}
                for (column, value), n in self.missing_cells.items()
            ],
            "missing": self.missing,
            "corrupt": [{"path": p, "reason": r} for p, r in self.corrupt],
            "empty_texts": [{"image": p, "level": lv} for p, lv in self.empty_texts],
            "empty_unlabelled_texts": [
                {"image": p, "level": lv} for p, lv in self.empty_unlabelled_texts
            ],
            "duplicate_paths": [{"path": p, "records": n} for p, n in self.duplicate_paths],
            "identical_files": self.identical_files,
            "identical_across_splits": self.identical_across_splits,
            "splits": self.splits,
            "split_overlap": self.split_overlap,
            "source_splits": self.source_splits,
            "source_split_overlap": self.source_split_overlap,
            "sources": self.sources,
            "label_conflicts": self.label_conflicts,
            "identical_across_sources": self.identical_across_sources,
            "moved": self.moved,
            "errors": self.errors,
        }


def _probe(path: str, decode: bool) -> tuple[str, str | None, str | None]:
    """(path, problem or None, content digest or None) for one image file."""
    if not os.path.exists(path):
        return path, "missing", None
    digest = file_digest(path)
    if digest is None:
        return path, "cannot be opened or read (check its permissions)", None
    if decode:
        try:
            load_image(path)
        except ImageLoadError as exc:
            return path, str(exc).removeprefix(f"{path}: "), digest
    return path, None, digest


def check_records(
    records: RecordSet,
    *,
    decode: bool = True,
    split: Mapping[str, float] | None = None,
    seed: int = 0,
    workers: int = 8,
    link_identical: bool = False,
) -> CheckReport:
    """Validate every record of ``records`` (see the module docstring)."""
    report = CheckReport(
        source=records.source,
        num_records=len(records.records),
        levels=[],
        excluded=dict(records.excluded.most_common()),
        excluded_examples={k: list(v) for k, v in records.excluded_examples.items()},
        missing_cells=dict(records.missing_cells.most_common()),
        decoded=decode,
    )
    for level, counts in zip(records.levels, records.label_counts(), strict=True):
        missing = counts.pop("", 0)
        report.levels.append(
            {
                "name": level.name,
                "multi_label": level.multi_label,
                "classes": len(level.vocabulary),
                "missing": missing,
                "counts": dict(counts.most_common()),
            }
        )
    paths = [str(r.image) for r in records.records]
    uses = Counter(paths)
    report.duplicate_paths = sorted((p, n) for p, n in uses.items() if n > 1)
    by_digest: dict[str, list[str]] = defaultdict(list)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for path, problem, digest in pool.map(lambda p: _probe(p, decode), list(uses)):
            if problem == "missing":
                report.missing.append(path)
            elif problem is not None:
                report.corrupt.append((path, problem))
            if digest is not None:
                by_digest[digest].append(path)
    report.identical_files = sorted(sorted(group) for group in by_digest.values() if len(group) > 1)
    # A pool level a source never labels is missing by design (the pool part reports it).
    labels_of = {s.name: set(s.levels) for s in records.pool.sources} if records.pool else {}
    for r in records.records:
        labelled = labels_of.get(r.metadata.get("source"))
        for level, candidates, labels in zip(records.levels, r.texts, r.labels, strict=True):
            if labelled is not None and level.name not in labelled:
                continue
            if not any(t.strip() for t in candidates):
                target = report.empty_texts if labels else report.empty_unlabelled_texts
                target.append((str(r.image), level.name))

    indices = patient_split(records.records, split, seed=seed, link_identical=link_identical)
    report.splits, report.split_overlap = _split_summary(records.records, indices)
    shipped = [r.metadata.get("split") for r in records.records]
    if shipped and all(name in SPLIT_NAMES for name in shipped):
        # The source ships a split (MGLL release lists, a spec's split column): check it too.
        by_source = {name: [i for i, s in enumerate(shipped) if s == name] for name in SPLIT_NAMES}
        report.source_splits, report.source_split_overlap = _split_summary(
            records.records, by_source
        )
    if records.pool is not None:
        _check_pool(records, report)
    split_of = {str(records.records[i].image): name for name, idx in indices.items() for i in idx}
    for group in report.identical_files:
        if len({split_of.get(p) for p in group}) > 1:
            report.identical_across_splits.append([f"{p} ({split_of.get(p)})" for p in group])
    return report


def spelling_conflicts(records: RecordSet) -> list[str]:
    """Labels of one level spelled two ways (letter case, spaces): "disease: 'Normal' (csdi 9)
    vs 'normal' (palm 161)". Pools join sources that rarely agree on spelling; two spellings
    would be two classes, each the other's negative."""
    found = []
    for g, level in enumerate(records.levels):
        spellings: dict[str, Counter[str]] = defaultdict(Counter)
        for r in records.records:
            for name in r.labels[g]:
                spellings[" ".join(name.casefold().split())][name] += 1
        for variants in spellings.values():
            if len(variants) < 2:
                continue
            shown = " vs ".join(
                f"{name!r} ({_sources_of(records, g, name)})" for name in sorted(variants)
            )
            found.append(f"{level.name}: {shown}")
    return found


def _sources_of(records: RecordSet, g: int, name: str) -> str:
    counts = Counter(
        str(r.metadata.get("source", records.source))
        for r in records.records
        if name in r.labels[g]
    )
    return ", ".join(f"{source} {n}" for source, n in sorted(counts.items()))


def _check_pool(records: RecordSet, report: CheckReport) -> None:
    """A pool's part of the report: per-source counts per level and class, the levels each
    source lacks, spelling conflicts, identical images across sources, linked moves."""
    pool = records.pool
    assert pool is not None
    for source in pool.sources:
        members = [i for i, r in enumerate(records.records) if r.metadata["source"] == source.name]
        part = records.subset(members)
        levels = []
        for level, counts in zip(records.levels, part.label_counts(), strict=True):
            missing = counts.pop("", 0)
            levels.append({"name": level.name, "missing": missing, "counts": dict(counts)})
        splits = Counter(part.records[k].metadata.get("split", "") for k in range(len(members)))
        report.sources.append(
            {
                "name": source.name,
                "folder": str(source.folder),
                "records": len(members),
                "weight": source.weight,
                "missing_levels": [
                    lv.name for lv in records.levels if lv.name not in source.levels
                ],
                "levels": levels,
                "splits": {name: splits.get(name, 0) for name in SPLIT_NAMES},
            }
        )
    report.label_conflicts = spelling_conflicts(records)
    source_of = {str(r.image): r.metadata["source"] for r in records.records}
    report.identical_across_sources = [
        [f"{p} ({source_of[p]})" for p in group]
        for group in pool.identical
        if len({source_of[p] for p in group}) > 1
    ]
    report.moved = list(pool.moved)


def _split_summary(
    records: Sequence[Record], indices: Mapping[str, Sequence[int]]
) -> tuple[dict[str, dict[str, int]], list[str]]:
    """Images and patients per split, and the patients found in more than one split."""
    counts: dict[str, dict[str, int]] = {}
    overlap: list[str] = []
    owner: dict[str, str] = {}
    for name in SPLIT_NAMES:
        patients = {patient_key(records[i]) for i in indices[name]}
        counts[name] = {"images": len(indices[name]), "patients": len(patients)}
        for p in sorted(patients):
            first = owner.setdefault(p, name)
            if first != name:
                overlap.append(f"{p} ({first} and {name})")
    return counts, overlap


def _per_folder(entries: Sequence[tuple[str, str]]) -> list[str]:
    """(image path, level) entries as one line per folder and level: count and an example."""
    groups: dict[tuple[str, str], list[str]] = {}
    for path, level in entries:
        groups.setdefault((str(Path(path).parent), level), []).append(Path(path).name)
    return [
        f"{len(names):6d}  {folder} (level {level}), e.g. {names[0]}"
        for (folder, level), names in groups.items()
    ]


def format_report(report: CheckReport, *, limit: int = 50) -> str:
    """Human-readable report; lists are cut at ``limit`` entries (counts stay exact)."""
    empty = " (error: no usable samples; pretrain refuses it)" if report.num_records == 0 else ""
    lines = [f"dataset: {report.source}", f"samples: {report.num_records}{empty}"]
    if report.missing_cells:
        spellings = ", ".join(repr(s) for s in MISSING_SPELLINGS)
        lines.append(
            f"cells read as missing: {sum(report.missing_cells.values())} "
            f"(spelled as one of {spellings}, any case)"
        )
        for (column, value), n in list(report.missing_cells.items())[:limit]:
            lines.append(f"  {n:6d}  {column}: {value!r}")
    if report.excluded:
        lines.append(f"left out by the source: {sum(report.excluded.values())} row(s)")
        for reason, n in report.excluded.items():
            examples = report.excluded_examples.get(reason, [])
            more = ", ..." if n > len(examples) else ""
            shown = f" (e.g. {', '.join(examples)}{more})" if examples else ""
            lines.append(f"  {n:6d}  {reason}{shown}")
    for g, level in enumerate(report.levels):
        kind = "multi-label" if level["multi_label"] else "single-label"
        lines.append(
            f"level {g} {level['name']!r} ({kind}, {level['classes']} classes, "
            f"{level['missing']} missing):"
        )
        counts = list(level["counts"].items())
        for name, n in counts[:limit]:
            shown = name if len(name) <= 70 else name[:67] + "..."
            lines.append(f"  {n:6d}  {shown}")
        if len(counts) > limit:
            lines.append(f"  ... {len(counts) - limit} more classes")

    def section(title: str, items: list[str], count: int | None = None) -> None:
        lines.append(f"{title}: {len(items) if count is None else count}")
        lines.extend(f"  {item}" for item in items[:limit])
        if len(items) > limit:
            lines.append(f"  ... {len(items) - limit} more (--output FILE.json lists all)")

    section("missing image files (error)", report.missing)
    if report.decoded:
        section("corrupt image files (error)", [f"{p}: {why}" for p, why in report.corrupt])
    else:
        lines.append("corrupt image files: not checked (--no-decode)")
    section("empty texts (error)", [f"{p} (level {lv})" for p, lv in report.empty_texts])
    section(  # a warning: one line per folder and level, not one per image
        "empty texts where the label is missing (warning)",
        _per_folder(report.empty_unlabelled_texts),
        len(report.empty_unlabelled_texts),
    )
    section(
        "image files used by several records (warning)",
        [f"{p} x{n}" for p, n in report.duplicate_paths],
    )
    section(
        "identical image files (warning)", [" = ".join(group) for group in report.identical_files]
    )
    lines.append("patient-level split (pretraining's by default: data.split fractions):")
    for name, counts in report.splits.items():
        lines.append(f"  {name:5s}  {counts['images']:6d} images  {counts['patients']:6d} patients")
    section("patients in several splits (error)", report.split_overlap)
    if report.source_splits:
        shipped_by = "the pool (its file's split)" if report.sources else "the source"
        lines.append(
            f"split shipped by {shipped_by} (pretraining's with data.split: {{mode: source}}):"
        )
        for name, counts in report.source_splits.items():
            lines.append(
                f"  {name:5s}  {counts['images']:6d} images  {counts['patients']:6d} patients"
            )
        section("patients in several source splits (error)", report.source_split_overlap)
    if report.sources:
        _format_pool(report, lines, section, limit)
    section(
        "identical image files in different splits (warning; try --link-identical)",
        [" = ".join(group) for group in report.identical_across_splits],
    )
    verdict = "OK" if report.errors == 0 else f"{report.errors} error(s)"
    lines.append(f"result: {verdict}")
    return "\n".join(lines)


def _format_pool(report: CheckReport, lines: list[str], section: Any, limit: int) -> None:
    """The pool part of :func:`format_report`."""
    for source in report.sources:
        splits = ", ".join(f"{n} {name}" for name, n in source["splits"].items())
        lacks = ", ".join(source["missing_levels"]) or "none"
        lines.append(
            f"source {source['name']!r}: {source['records']} samples ({splits}), weight "
            f"{source['weight']:g}, lacks level(s): {lacks}"
        )
        for level in source["levels"]:
            counts = sorted(level["counts"].items(), key=lambda kv: (-kv[1], kv[0]))
            shown = ", ".join(f"{name[:40]} {n}" for name, n in counts[:8])
            more = f", ... {len(counts) - 8} more classes" if len(counts) > 8 else ""
            lines.append(f"  {level['name']}: {level['missing']} missing; {shown}{more}")
    section("labels spelled two ways (error; rename one in the pool file)", report.label_conflicts)
    section(
        "identical images across sources (linked: one patient, one split)",
        [" = ".join(group) for group in report.identical_across_sources],
    )
    section("images moved to the split of an identical test/val image", report.moved)
