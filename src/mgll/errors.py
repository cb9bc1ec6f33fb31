"""The one base class of the problems a user can fix, and the command line's way of showing them.

Every error that names a user's file, row, setting or option derives from :class:`UserError`
(``ConfigError``, ``DataError``, ``CheckpointError``, the evaluation and segmentation errors
...). ``mgll.cli.main`` catches it once: one line on stderr and the error's ``exit_code``.
Anything else is a bug in mgll or a library and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with what the user gave; the message says what and what to do (exit 1)."""

    exit_code: int = 1
    label: str = "error: "  # printed between the command name and the message


class UsageError(UserError):
    """A command line that cannot work (a missing or contradictory option): exit 2, as
    argparse's own usage errors."""

    exit_code = 2


class DataError(UserError, ValueError):
    """A dataset, table, split or option of the data that cannot be read as given; names the
    file, row or ``data.*`` key at fault. A ``ValueError`` for callers that catch those."""


class ModelFileError(UserError, ValueError):
    """A model file or folder that is not what it is given as (an export, a model folder), or
    an export target that cannot be written; names the path."""


class OptionError(UserError, ValueError):
    """A command-line option (or its library argument) with a value out of its range; names
    the option and the range."""
