"""``mgll data check``, ``split`` and ``shard``: validate a dataset, write a patient-level
split, write WebDataset shards for streaming."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mgll.data.adapters import adapter_names
from mgll.data.records import RecordSet
from mgll.data.spec import is_spec_path
from mgll.data.splits import SPLIT_NAMES, patient_key, patient_split, write_split_file
from mgll.errors import DataError, UsageError
from mgll.io import atomic_write
from mgll.schema import PACKAGE_PREFIX, resolve_package_paths


class _Renamed(argparse.Action):
    """A hidden old spelling of an option: stores into the new option's ``dest``.

    ``note`` (printed once to stderr) is for renames whose meaning users must learn; plain
    spelling changes stay silent.
    """

    def __init__(self, option_strings, dest, note=None, **kwargs):  # type: ignore[no-untyped-def]
        kwargs["help"] = argparse.SUPPRESS
        super().__init__(option_strings, dest, **kwargs)
        self.note = note

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[no-untyped-def]
        if self.note:
            print(f"{parser.prog}: note: {self.note}", file=sys.stderr)
        if isinstance(getattr(namespace, self.dest, None), list):
            getattr(namespace, self.dest).append(values)
        else:
            setattr(namespace, self.dest, values)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mgll data`` with its ``check``, ``split`` and ``shard`` sub-commands."""
    data = subparsers.add_parser("data", help="validate datasets and write patient-level splits")

    def usage(_: argparse.Namespace) -> int:
        data.print_help()  # `mgll data` alone: show the actions rather than fail silently
        return 2

    data.set_defaults(func=usage)
    sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    _add_check(sub)
    _add_split(sub)
    _add_shard(sub)


def _add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every ``mgll data`` action shares: the dataset and how it is split."""
    parser.add_argument(
        "path",
        help="a dataset spec or pool file (.yaml/.json; package:mgll/pools/... for a "
        "shipped pool) or a dataset folder",
    )
    parser.add_argument(
        "--data-root",
        metavar="DIR",
        help="where a pool's source folders are looked up when not found next to the pool "
        "file (as `pretrain --data-root`)",
    )
    parser.add_argument(
        "--source",
        metavar="NAME",
        help="the folder's format, as data.source (default: detected): "
        f"{', '.join(adapter_names())}",
    )
    parser.add_argument("--format", dest="source", action=_Renamed)
    add_options_argument(parser)
    parser.add_argument("--option", dest="options", action=_Renamed)
    for name, default in zip(SPLIT_NAMES, (0.8, 0.1, 0.1), strict=True):
        parser.add_argument(
            f"--{name}",
            type=float,
            help=f"data.split.{name} fraction (default {default}; a pool's own split when "
            "no fraction is given)",
        )
    parser.add_argument(
        "--split-seed",
        type=int,
        default=0,
        metavar="N",
        help="data.split.seed (default 0); `pretrain` uses data.split.seed, or train.seed "
        "(its --seed) when the config sets none",
    )
    parser.add_argument(
        "--seed",
        dest="split_seed",
        type=int,
        action=_Renamed,
        note="--seed is now --split-seed: the seed of the split (data.split.seed), which "
        "is not what `pretrain --seed` (train.seed) sets",
    )
    parser.add_argument(
        "--link-identical",
        action="store_true",
        help="keep patients whose image files are byte-identical in the same split "
        "(data.split.link_identical)",
    )


def _add_check(sub: argparse._SubParsersAction) -> None:
    """``mgll data check``."""
    check = sub.add_parser("check", help="counts per level and label, missing/corrupt files, ...")
    _add_dataset_arguments(check)
    check.add_argument("--no-decode", action="store_true", help="only check files exist")
    check.add_argument("--output", metavar="FILE", help="also write the full report as JSON")
    check.add_argument("--json", dest="output", action=_Renamed)
    check.add_argument("--limit", type=int, default=50, help="entries shown per list (default 50)")
    check.add_argument(
        "--num-workers", type=int, default=8, help="threads decoding images (default 8)"
    )
    check.add_argument("--workers", dest="num_workers", type=int, action=_Renamed)
    check.set_defaults(func=run_check, command_name="mgll data check")


def _add_split(sub: argparse._SubParsersAction) -> None:
    """``mgll data split``."""
    split = sub.add_parser("split", help="write a patient-level train/val/test split (CSV)")
    _add_dataset_arguments(split)
    split.add_argument(
        "--output", metavar="FILE", help="CSV to write (image, patient_id, split); required"
    )
    split.add_argument("--out", dest="output", action=_Renamed)
    split.set_defaults(func=run_split, command_name="mgll data split")


def _add_shard(sub: argparse._SubParsersAction) -> None:
    """``mgll data shard``."""
    shard = sub.add_parser(
        "shard", help="write WebDataset shards (preprocessed images, texts, labels) + manifest"
    )
    _add_dataset_arguments(shard)
    shard.add_argument("--output-dir", metavar="DIR", help="the shards' folder; required")
    shard.add_argument(
        "--split-file", metavar="FILE", help="a split CSV (mgll data split) instead of fractions"
    )
    shard.add_argument("--shard-size", type=int, default=1000, help="samples per shard (1000)")
    shard.add_argument(
        "--image-size", type=int, default=224, help="side of the stored images (224): the model's"
    )
    shard.add_argument("--resize", default="crop", help="crop | pad | stretch (data.resize)")
    shard.add_argument(
        "--image-format",
        default="npy",
        choices=["npy", "png"],
        help="npy: raw pixels, fastest to read (default); png: lossless, about half the bytes",
    )
    shard.add_argument(
        "--num-workers", type=int, default=4, help="threads decoding images (default 4)"
    )
    shard.add_argument("--workers", dest="num_workers", type=int, action=_Renamed)
    shard.set_defaults(func=run_shard, command_name="mgll data shard")


def add_options_argument(parser: argparse.ArgumentParser) -> None:
    """``--options KEY=VALUE`` (repeatable): the entries of ``data.options``, read by
    :func:`parse_options`; every command that reads a dataset takes it."""
    parser.add_argument(
        "--options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one entry of data.options (repeatable), e.g. --options language=zh",
    )


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """``--options`` values as ``data.options`` (``true``/``false`` read as booleans)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise DataError(f"--options {pair!r}: expected KEY=VALUE")
        lowered = value.lower()
        options[key] = {"true": True, "false": False}.get(lowered, value)
    return options


def _load(args: argparse.Namespace) -> tuple[RecordSet, Path]:
    from mgll.data.build import load_records

    path = Path(args.path)
    if args.path.startswith(PACKAGE_PREFIX):
        path = Path(resolve_package_paths(args.path, "path"))
    if not path.exists():
        raise DataError(f"{path.absolute()}: no such file or folder")
    if is_spec_path(path) and path.is_file():
        if args.source:
            raise DataError(
                f"--source: {path} is a spec file; --source names the format of a dataset folder"
            )
        source, folder, root = path, None, args.data_root
    else:
        source, folder, root = args.source, path, None
    try:
        return load_records(source, folder, data_root=root, options=parse_options(args.options))
    except (OSError, ImportError) as exc:  # a file the adapter cannot open, a missing reader
        raise DataError(f"{path}: {exc}") from exc


def _write_output(path: str, text: str) -> None:
    try:
        atomic_write(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))
    except OSError as exc:
        raise DataError(f"--output: cannot write {path} ({exc.strerror or exc})") from exc


def _fractions(args: argparse.Namespace) -> dict[str, float]:
    """The fractions given on the command line, the defaults (0.8/0.1/0.1) for the others."""
    return {
        name: default if getattr(args, name) is None else getattr(args, name)
        for name, default in zip(SPLIT_NAMES, (0.8, 0.1, 0.1), strict=True)
    }


def run_check(args: argparse.Namespace) -> int:
    """Print the check report; exit 1 when it has errors (or the dataset cannot be read)."""
    from mgll.data.check import check_records, format_report

    records, _ = _load(args)
    report = check_records(
        records,
        decode=not args.no_decode,
        split=_fractions(args),
        link_identical=args.link_identical,
        seed=args.split_seed,
        workers=args.num_workers,
    )
    print(format_report(report, limit=args.limit))
    if args.output:
        _write_output(args.output, json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    return 1 if report.errors else 0


def run_split(args: argparse.Namespace) -> int:
    """Write the split CSV and print images/patients per split."""
    from mgll.data.build import split_records
    from mgll.data.config import SplitConfig

    if not args.output:
        raise UsageError("--output FILE is required (the split CSV to write)")
    records, folder = _load(args)
    if not records.records:
        raise DataError(f"{records.source}: no usable samples to split; `mgll data check` says why")
    given = any(getattr(args, name) is not None for name in SPLIT_NAMES)
    if records.pool is not None and not given:
        split = split_records(records, SplitConfig(mode="source"), args.split_seed)
    else:
        split = patient_split(
            records.records,
            _fractions(args),
            seed=args.split_seed,
            link_identical=args.link_identical,
        )
    sources = root = None
    if records.pool is not None:  # absolute paths: each source's evaluation can read it
        sources = [str(r.metadata["source"]) for r in records.records]
    else:
        root = folder
    try:
        write_split_file(args.output, records.records, split, root=root, sources=sources)
    except OSError as exc:
        raise DataError(f"--output: cannot write {args.output} ({exc.strerror or exc})") from exc
    for name in SPLIT_NAMES:
        patients = {patient_key(records.records[i]) for i in split[name]}
        print(f"{name:5s}  {len(split[name]):6d} images  {len(patients):6d} patients")
    print(f"wrote {args.output}")
    return 0


def run_shard(args: argparse.Namespace) -> int:
    """Write the shards of the dataset, split as ``pretrain`` would split it; print the counts."""
    if not args.output_dir:
        raise UsageError("--output-dir DIR is required (the folder the shards go to)")
    from mgll.data.build import prepare_data
    from mgll.data.config import DataConfig
    from mgll.data.shards import write_shards

    spec = is_spec_path(args.path)
    if spec and args.source:
        raise DataError(f"--source: {args.path} is a spec file; --source names a folder's format")
    split: dict[str, Any] = {"seed": args.split_seed, "link_identical": args.link_identical}
    if args.split_file:
        split["file"] = args.split_file
    elif any(getattr(args, name) is not None for name in SPLIT_NAMES):
        split.update(_fractions(args))  # else the defaults, or a pool's own split
    cfg = DataConfig.from_dict(
        {
            "source": args.path if spec else args.source,
            # the folder as given, as `mgll data check` reads it (--data-root is for a pool's
            # sources): a relative data.path would be read under --data-root
            "path": None if spec else str(Path(args.path).absolute()),
            "options": parse_options(args.options),
            "split": split,
            "resize": args.resize,
        }
    )
    prepared = prepare_data(cfg, args.data_root, args.split_seed)
    try:
        manifest = write_shards(
            prepared,
            args.output_dir,
            image_size=args.image_size,
            resize=args.resize,
            shard_size=args.shard_size,
            image_format=args.image_format,
            workers=args.num_workers,
        )
    except OSError as exc:  # the output folder cannot be written
        raise DataError(f"--output-dir {args.output_dir}: {exc}") from exc
    for name in SPLIT_NAMES:
        part = manifest["splits"][name]
        print(
            f"{name:5s}  {part['samples']:6d} samples  {len(part['shards']):4d} shards  "
            f"{part['skipped']} unreadable"
        )
    print(
        f"wrote {Path(args.output_dir) / 'manifest.json'}; train on it with "
        # absolute: a relative data.path is read under pretraining's --data-root
        f"data.source=shards data.path={Path(args.output_dir).absolute()}"
    )
    return 0
