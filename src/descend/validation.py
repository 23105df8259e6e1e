"""Checks of option values, shared by every optimizer and solver.

Bad input fails with a ``ValueError`` that names the argument, the value and what is allowed,
in one format: ``Invalid lr: -1 (allowed: a number in [0, inf))``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from torch import Tensor

__all__ = ["invalid", "scalar_value", "check_number", "check_flag", "check_int", "check_choice"]


def scalar_value(x: float | Tensor) -> float:
    """A Python float of a number or a one-element tensor."""
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def invalid(name: str, value: Any, allowed: str) -> ValueError:
    """The ValueError for a bad option: its name, its value and what is allowed."""
    return ValueError(f"Invalid {name}: {value!r} (allowed: {allowed})")


def check_number(name: str, value: Any, *, low: float, high: float | None = None,
                 low_open: bool = False, high_open: bool = True) -> None:
    """Raise ValueError unless ``value`` is a finite real number in the stated interval."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, Tensor)):
        raise invalid(name, value, "a real number")
    try:
        x = scalar_value(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError):
        raise invalid(name, value, "a real number") from None
    if not math.isfinite(x):
        raise invalid(name, value, "a finite real number")
    lo_ok = x > low if low_open else x >= low
    hi_ok = high is None or (x < high if high_open else x <= high)
    if not (lo_ok and hi_ok):
        lo = f"{'(' if low_open else '['}{low:g}"
        hi = f"{high:g}{')' if high_open else ']'}" if high is not None else "inf)"
        raise invalid(name, value, f"a number in {lo}, {hi}")


def check_flag(name: str, value: Any, *, optional: bool = False) -> None:
    """Raise ValueError unless ``value`` is a bool (or None where ``optional``): a string
    such as "no" would otherwise count as True."""
    if isinstance(value, bool) or (optional and value is None):
        return
    raise invalid(name, value, "True or False" + (" or None" if optional else ""))


def check_int(name: str, value: Any, low: int) -> None:
    """Raise ValueError unless ``value`` is an int (not a bool) ≥ ``low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise invalid(name, value, f"an integer >= {low}")


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    """Raise ValueError unless ``value`` is one of ``choices``."""
    if not any(value == c and type(value) is type(c) for c in choices):
        raise invalid(name, value, ", ".join(repr(c) for c in choices))
