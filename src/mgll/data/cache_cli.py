"""``mgll cache info`` and ``mgll cache clear``: see and reclaim the preprocessing cache."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mgll.data.cache import (
    CachedDataset,
    dataset_key,
    remove_cached,
    scan_cache,
    user_cache_location,
)
from mgll.errors import DataError, UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mgll cache`` with its ``info`` and ``clear`` sub-commands."""
    cache = subparsers.add_parser(
        "cache",
        help="show or clear the preprocessing cache",
        description="The preprocessing cache holds decoded, resized images per dataset, under "
        "$MGLL_CACHE (or $MGLL_CACHE_DIR), else the user cache (~/.cache/mgll on Linux).",
    )

    def usage(_: argparse.Namespace) -> int:
        cache.print_help()
        return 2

    cache.set_defaults(func=usage)
    sub = cache.add_subparsers(dest="cache_command", metavar="ACTION")

    def root_option(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--cache-dir",
            metavar="DIR",
            help="a cache root other than the user cache (the value of data.cache_dir)",
        )

    info = sub.add_parser("info", help="location, size and entries per dataset")
    root_option(info)
    info.set_defaults(func=run_info, command_name="mgll cache info")

    clear = sub.add_parser("clear", help="delete cached images (all, or one dataset's)")
    clear.add_argument(
        "dataset",
        nargs="?",
        help="only this dataset: its folder (or spec file), or its name from `mgll cache info`",
    )
    clear.add_argument("--yes", "-y", action="store_true", help="delete without asking")
    root_option(clear)
    clear.set_defaults(func=run_clear, command_name="mgll cache clear")


def _root(args: argparse.Namespace) -> tuple[Path, str]:
    if args.cache_dir:
        return Path(args.cache_dir).expanduser(), "--cache-dir"
    return user_cache_location()


def _size(n: int) -> str:
    """Bytes in binary units (as ``du -h`` counts them)."""
    if n < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _describe(item: CachedDataset) -> str:
    where = item.dataset or "entries of older mgll versions (not per dataset)"
    return f"{item.name}  {item.entries} entries  {_size(item.bytes)}  {where}"


def run_info(args: argparse.Namespace) -> int:
    """Print where the cache is, its total size and one line per dataset (and image size)."""
    root, origin = _root(args)
    items = scan_cache(root)
    print(f"cache: {root / 'preprocess'} (from {origin})")
    total_entries = sum(d.entries for d in items)
    total_bytes = sum(d.bytes for d in items)
    print(f"total: {len(items)} dataset(s), {total_entries} entries, {_size(total_bytes)}")
    for item in items:
        print(f"  {_describe(item)}")
        for name, (entries, size) in item.settings.items():
            print(f"      {name}: {entries} entries, {_size(size)}")
    return 0


def _select(items: list[CachedDataset], wanted: str) -> list[CachedDataset]:
    """The cached datasets ``wanted`` names: a folder or spec file, or a name from info."""
    path = Path(wanted).expanduser()
    if path.exists():
        folder = path if path.is_dir() else path.parent  # a spec file: its folder is the dataset
        key = dataset_key(folder)
        return [d for d in items if d.name == key]
    return [d for d in items if d.name == wanted]


def run_clear(args: argparse.Namespace) -> int:
    """Delete the cache (or one dataset's part of it), after confirmation. A dataset with
    nothing cached is a :class:`DataError` (exit 1); no ``--yes`` off a terminal a
    :class:`UsageError` (exit 2); ``mgll.cli.main`` prints either on one line."""
    root, _ = _root(args)
    items = scan_cache(root)
    if args.dataset is not None:
        items = _select(items, args.dataset)
        if not items:
            raise DataError(
                f"nothing cached for {args.dataset} under {root / 'preprocess'}; "
                "`mgll cache info` lists the cached datasets"
            )
    if not items:
        print(f"nothing to clear under {root / 'preprocess'}")
        return 0
    entries, size = sum(d.entries for d in items), sum(d.bytes for d in items)
    where = root / "preprocess"
    what = f"{entries} entries ({_size(size)}) of {len(items)} dataset(s) under {where}"
    if not args.yes:
        if not sys.stdin.isatty():
            raise UsageError(f"would delete {what}; pass --yes")
        if input(f"delete {what}? [y/N] ").strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return 1
    for item in items:
        remove_cached(item)
    print(f"deleted {what}")
    return 0
