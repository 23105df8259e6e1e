"""What every command of the command line shares: the argparse types of its numeric options
(a bad value is a usage error: exit code 2, a usage line, no traceback), the one-line error
(:class:`CommandError`, exit code 1) and the checks of output paths that run before any work.

Imports nothing but the standard library: ``descend bench`` needs none of the demo's extra.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from collections.abc import Callable, Iterable

__all__ = ["CommandError", "positive_int", "int_in", "seed", "nonnegative_float", "check_output_dir",
           "check_output_file", "SEED_MIN", "SEED_MAX"]

#: the range torch.manual_seed and torch.Generator.manual_seed accept (negative seeds are
#: taken modulo 2**64).
SEED_MIN = -(2**63)
SEED_MAX = 2**64 - 1


class CommandError(Exception):
    """An error the command line reports in one line (exit code 1), without a traceback."""


def _parse_int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid {what}: {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: a whole number > 0 (a usage error otherwise)."""
    value = _parse_int(text, "positive integer")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def int_in(low: int, high: int) -> Callable[[str], int]:
    """argparse type: a whole number in [low, high]."""

    def parse(text: str) -> int:
        value = _parse_int(text, "integer")
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer in [{low}, {high}], got {text}")
        return value

    parse.__name__ = f"integer in [{low}, {high}]"
    return parse


def seed(text: str) -> int:
    """argparse type: a seed torch accepts, a whole number in [-2**63, 2**64 - 1]."""
    value = _parse_int(text, "seed")
    if not SEED_MIN <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"a seed must be an integer in [-2**63, 2**64 - 1] "
                                         f"(torch.manual_seed's range), got {text}")
    return value


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number ≥ 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


# --- output paths, checked before the work starts -----------------------------------------


def _reason(e: OSError) -> str:
    return e.strerror or str(e)


def check_output_dir(path: str, names: Iterable[str] = ()) -> str:
    """Create the directory ``path`` if needed, check that a file can be written in it and that
    none of ``names`` (the files the command will write there) is taken by something that is
    not a writable file. Raises :class:`CommandError` naming the path otherwise."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".descend-write-test-"):
            pass
    except OSError as e:
        raise CommandError(f"cannot write to output directory {path!r}: {_reason(e)}") from None
    for name in names:
        _check_target(os.path.join(path, name))
    return path


def check_output_file(path: str) -> str:
    """Check that the file ``path`` can be written (its directory exists and is writable, and
    the name is not taken by a directory or a file that cannot be written); creates nothing.
    Raises :class:`CommandError` naming the path otherwise."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CommandError(f"cannot write {path!r}: directory {folder!r} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".descend-write-test-"):
            pass
    except OSError as e:
        raise CommandError(f"cannot write {path!r}: {_reason(e)}") from None
    _check_target(path)
    return path


def _check_target(path: str) -> None:
    if os.path.isdir(path):
        raise CommandError(f"cannot write {path!r}: it is a directory")
    if os.path.lexists(path) and not (os.path.isfile(path) and os.access(path, os.R_OK | os.W_OK)):
        raise CommandError(f"cannot write {path!r}: it exists and is not a file this user can read and write")
