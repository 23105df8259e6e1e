"""Checks of option values, shared by every optimizer and solver.

Bad input fails with a ``ValueError`` that names the argument, the value and what is allowed,
in one format: ``Invalid dampening: -1 (allowed: a number in [0, 1])``. Where torch.optim has
words of its own for an argument (:data:`TORCH_WORDING`), the message starts with them, so that
code and tests written against torch.optim's messages still match, and the argument's name goes
with the explanation: ``Invalid learning rate: -1 (lr; allowed: a number in [0, inf))``.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any

from torch import Tensor

__all__ = ["TORCH_WORDING", "invalid", "said", "scalar_value", "check_number", "check_flag", "check_int", "check_choice"]


def scalar_value(x: float | Tensor) -> float:
    """A Python float of a number or a one-element tensor."""
    return float(x.item()) if isinstance(x, Tensor) else float(x)


#: torch.optim 2.13's words for a bad value of an argument (``{value!r}`` is the value), by the
#: name descend checks it under. Where two torch classes word one argument differently, the
#: wording of most of them (Adafactor and Muon say "Learning rate should be >= 0 but is", the
#: rest "Invalid learning rate").
TORCH_WORDING: dict[str, str] = {
    "lr": "Invalid learning rate: {value!r}",
    "eps": "Invalid epsilon value: {value!r}",
    "weight_decay": "Invalid weight_decay value: {value!r}",
    "momentum": "Invalid momentum value: {value!r}",
    "betas[0]": "Invalid beta parameter at index 0: {value!r}",
    "betas[1]": "Invalid beta parameter at index 1: {value!r}",
    "rho": "Invalid rho value: {value!r}",
    "alpha": "Invalid alpha value: {value!r}",
    "lr_decay": "Invalid lr_decay value: {value!r}",
    "initial_accumulator_value": "Invalid initial_accumulator_value value: {value!r}",
    "momentum_decay": "Invalid momentum_decay value: {value!r}",
    "etas": "Invalid eta values: {value[0]!r}, {value[1]!r}",
    # Adafactor's
    "eps[0]": "epsilon1 should be >= 0 but is: {value!r}",
    "eps[1]": "epsilon2 should be >= 0 but is: {value!r}",
    "beta2_decay": "beta2_decay should be <= 0 but is: {value!r}",
    "d": "Clipping threshold d should be >= 1 but is: {value!r}",
    # Muon's (the name shown as torch shows it, without quotes)
    "adjust_lr_fn": "Adjust learning rate function {value} is not supported",
}


def said(name: str, value: Any) -> str:
    """The start of the message for a bad ``value`` of ``name``: torch's words where it has
    some (:data:`TORCH_WORDING`), else ``Invalid {name}: {value!r}``."""
    template = TORCH_WORDING.get(name)
    # (an indexed template needs a pair: anything else is shown whole)
    if template is not None and ("{value[" not in template or (isinstance(value, (tuple, list)) and len(value) == 2)):
        return template.format(value=value)
    return f"Invalid {name}: {value!r}"


def invalid(name: str, value: Any, allowed: str) -> ValueError:
    """The ValueError for a bad option: its name, its value and what is allowed."""
    start = said(name, value)
    # torch's words may not name the argument ("learning rate"): then the explanation does
    named = re.search(rf"(?<![\w\[]){re.escape(name)}(?![\w\]])", start.split(": ")[0]) is not None
    return ValueError(f"{start} ({'' if named else name + '; '}allowed: {allowed})")


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
