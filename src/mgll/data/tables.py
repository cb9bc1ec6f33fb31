"""Reading label tables (CSV, TSV, JSONL, Parquet) as all-string data frames.

Every cell is read as text, so a patient id "007" survives as written and row numbers in error
messages match the file. Missing cells become "" in every format: blanks, whitespace, and the
usual spellings of a missing value (:data:`MISSING_SPELLINGS`, any letter case), which would
otherwise become classes named "NaN" or "N/A". "None" is not among them, since it is often a
finding ("no finding"); list it under a level's ``missing:`` when it means missing.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from mgll.errors import DataError

TABLE_FORMATS = ("csv", "tsv", "jsonl", "parquet")
# Cell texts (compared after strip() and lower()) that mean "no value", as pandas, R, Excel and
# SQL exports write them.
MISSING_SPELLINGS = ("nan", "n/a", "na", "#n/a", "<na>", "null")


class TableError(DataError):
    """A table could not be read; the message names the file and what to do."""


def table_format(path: Path, given: str | None = None) -> str:
    """Format of a table: ``given`` if set, else from the extension (``.gz`` allowed)."""
    if given is not None:
        if given not in TABLE_FORMATS:
            raise TableError(f"{path}: unknown table format {given!r}; use one of {TABLE_FORMATS}")
        return given
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".zip", ".xz"):
        suffixes = suffixes[:-1]
    ext = suffixes[-1] if suffixes else ""
    mapping = {
        ".csv": "csv",
        ".tsv": "tsv",
        ".txt": "tsv",
        ".jsonl": "jsonl",
        ".ndjson": "jsonl",
        ".parquet": "parquet",
        ".pq": "parquet",
    }
    if ext not in mapping:
        raise TableError(
            f"{path}: cannot tell the table format from the extension {ext!r}; "
            f"name it with format: one of {TABLE_FORMATS}"
        )
    return mapping[ext]


def read_table(path: str | Path, fmt: str | None = None) -> pd.DataFrame:
    """The table at ``path`` with every cell as a string ("" for blanks)."""
    path = Path(path)
    fmt = table_format(path, fmt)
    if not path.is_file():
        raise TableError(f"{path}: table file not found")
    try:
        if fmt in ("csv", "tsv"):
            frame = pd.read_csv(
                path,
                sep="," if fmt == "csv" else "\t",
                dtype=str,
                keep_default_na=False,
                encoding="utf-8-sig",
            )
        elif fmt == "jsonl":
            frame = pd.read_json(path, lines=True, dtype=False)
        else:
            try:
                import pyarrow  # noqa: F401  (pandas needs it for parquet)
            except ImportError as exc:
                raise TableError(
                    f"{path}: reading Parquet needs pyarrow; run pip install 'mgll[parquet]'"
                ) from exc
            frame = pd.read_parquet(path)
    except TableError:
        raise
    except UnicodeDecodeError as exc:
        raise TableError(
            f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
        ) from exc
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise TableError(f"{path}: cannot read as {fmt} ({exc})") from exc
    frame.columns = [str(c) for c in frame.columns]
    if fmt not in ("csv", "tsv"):
        # Non-CSV cells (numbers, None, NaN) to the CSV convention: strings, "" if blank.
        frame = frame.apply(lambda col: col.map(_cell_text))
    return blank_missing(frame)


def blank_missing(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with every missing spelling (and whitespace-only cell) replaced by "".

    ``frame.attrs["missing_cells"]`` counts the replaced spellings as ``{(column, text): n}``
    (blank and whitespace-only cells are not counted), for ``mgll data check`` to report.
    """
    counts: Counter[tuple[str, str]] = Counter()
    for column in frame.columns:
        cells = frame[column].astype(object)  # an empty Parquet column may be float
        stripped = cells.str.strip()
        spelled = stripped.str.lower().isin(MISSING_SPELLINGS)
        counts.update((column, text) for text in stripped[spelled])
        frame[column] = cells.where(~(spelled | (stripped == "")), "")
    frame.attrs["missing_cells"] = counts
    return frame


def _cell_text(value: object) -> str:
    """One JSONL/Parquet cell as CSV text: blanks "", whole floats without ".0", lists "A|B"."""
    if isinstance(value, (list, tuple, np.ndarray)):  # Parquet list cells arrive as arrays
        return "|".join(_cell_text(v) for v in value)
    if value is None or value is pd.NA or value is pd.NaT:
        return ""
    if isinstance(value, float):
        if value != value:  # NaN
            return ""
        return str(int(value)) if value.is_integer() else str(value)
    return str(value)
