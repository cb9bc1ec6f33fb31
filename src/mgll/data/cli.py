"""``mgll data check`` and ``mgll data split``: validate a dataset, write a patient-level split."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from mgll.data.adapters import adapter_names
from mgll.data.build import load_records
from mgll.data.check import check_records, format_report
from mgll.data.records import RecordSet
from mgll.data.spec import is_spec_path
from mgll.data.splits import SPLIT_NAMES, patient_key, patient_split, write_split_file


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mgll data`` with its ``check`` and ``split`` sub-commands."""
    data = subparsers.add_parser("data", help="validate datasets and write patient-level splits")

    def usage(_: argparse.Namespace) -> int:
        data.print_help()  # `mgll data` alone: show the actions rather than fail silently
        return 2

    data.set_defaults(func=usage)
    sub = data.add_subparsers(dest="data_command", metavar="ACTION")

    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("path", help="a dataset spec file (.yaml/.json) or a dataset folder")
        parser.add_argument(
            "--format",
            dest="format_name",
            metavar="NAME",
            help=f"the folder's format (default: detected): {', '.join(adapter_names())}",
        )
        parser.add_argument(
            "--option",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="adapter option (repeatable), e.g. --option language=zh",
        )
        for name, default in zip(SPLIT_NAMES, (0.8, 0.1, 0.1), strict=True):
            parser.add_argument(f"--{name}", type=float, default=default, help=f"{name} fraction")
        parser.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
        parser.add_argument(
            "--link-identical",
            action="store_true",
            help="keep patients whose image files are byte-identical in the same split",
        )

    check = sub.add_parser("check", help="counts per level and label, missing/corrupt files, ...")
    common(check)
    check.add_argument("--no-decode", action="store_true", help="only check files exist")
    check.add_argument("--json", metavar="FILE", help="also write the full report as JSON")
    check.add_argument("--limit", type=int, default=50, help="entries shown per list (default 50)")
    check.add_argument("--workers", type=int, default=8, help="threads decoding images")
    check.set_defaults(func=run_check)

    split = sub.add_parser("split", help="write a patient-level train/val/test split (CSV)")
    common(split)
    split.add_argument(
        "--out", required=True, metavar="FILE", help="CSV to write (image, patient_id, split)"
    )
    split.set_defaults(func=run_split)


def _options(pairs: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option {pair!r}: expected KEY=VALUE")
        lowered = value.lower()
        options[key] = {"true": True, "false": False}.get(lowered, value)
    return options


def _load(args: argparse.Namespace) -> tuple[RecordSet, Path]:
    path = Path(args.path)
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder")
    if is_spec_path(path) and path.is_file():
        if args.format_name:
            raise ValueError(
                f"--format: {path} is a spec file; --format applies to dataset folders"
            )
        return load_records(path, None, options=_options(args.option))
    return load_records(args.format_name, path, options=_options(args.option))


def _fractions(args: argparse.Namespace) -> dict[str, float]:
    return {name: getattr(args, name) for name in SPLIT_NAMES}


def run_check(args: argparse.Namespace) -> int:
    """Print the check report; exit 1 when it has errors, 2 when the dataset cannot be read."""
    try:
        records, _ = _load(args)
        report = check_records(
            records,
            decode=not args.no_decode,
            split=_fractions(args),
            link_identical=args.link_identical,
            seed=args.seed,
            workers=args.workers,
        )
    except (ValueError, OSError, ImportError) as exc:
        print(f"error: {exc}")
        return 2
    print(format_report(report, limit=args.limit))
    if args.json:
        try:
            Path(args.json).write_text(
                json.dumps(report.to_dict(), indent=2, ensure_ascii=False), encoding="utf-8"
            )
        except OSError as exc:
            print(f"error: --json: cannot write {args.json} ({exc.strerror or exc})")
            return 2
    return 1 if report.errors else 0


def run_split(args: argparse.Namespace) -> int:
    """Write the split CSV and print images/patients per split."""
    try:
        records, folder = _load(args)
        split = patient_split(
            records.records, _fractions(args), seed=args.seed, link_identical=args.link_identical
        )
        write_split_file(args.out, records.records, split, root=folder)
    except (ValueError, OSError, ImportError) as exc:
        print(f"error: {exc}")
        return 2
    for name in SPLIT_NAMES:
        patients = {patient_key(records.records[i]) for i in split[name]}
        print(f"{name:5s}  {len(split[name]):6d} images  {len(patients):6d} patients")
    print(f"wrote {args.out}")
    return 0
