r"""A readable account of what each parameter gets from an optimizer.

``print(descend.explain(optimizer))`` shows one line per parameter group (its lr, decay mode,
weight decay, L1, and how many parameters and elements it holds), then one row per parameter: its
name (where the optimizer was given names), shape, group, current lr, decay mode, weight decay,
the factor f = 1 − s·λ that θ is multiplied by in one step at the current lr, the timescale
τ = −1/ln f (the steps in which decay alone shrinks θ by e; :mod:`descend.timescale`), L1, the
rule in words, the algorithm that steps it (a group's ``algorithm`` in :class:`descend.Muon`,
``"muon"`` or ``"adamw"``; elsewhere the optimizer's class, lower-cased), its dtype, the dtype of
its state, its rounding (:mod:`descend.precision`) and whether rounding to nearest erases its
decay (a 16-bit parameter whose shrink per step is below half an ulp: the criterion of the
warning :func:`descend.precision.erased_decay`). It reads torch.optim optimizers too (SGD and
Adam decay coupled, AdamW decoupled; state in the parameter's dtype, rounding to nearest), so a
user can check a set-up before switching.

``explain(optimizer, model=model)`` lists the rows in ``model.named_parameters()`` order, so that a
layer's weight and bias sit together; :meth:`Explanation.to_json` gives the rows as data. Columns
that do not fit the terminal are dropped from the right, with a note, rather than wrapped.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import astuple, dataclass, fields
from typing import Any

import torch

from descend import precision, regularization
from descend.timescale import timescale_of_factor
from descend.validation import check_int

__all__ = ["explain", "Explanation", "ParamRow", "GroupSummary"]


@dataclass(frozen=True)
class ParamRow:
    """What one parameter gets. ``factor`` is 1 − s·λ for a decoupled mode and 1 for
    coupled decay, whose λ·θ goes into the gradient (``rule`` says which); ``timescale``
    is −1/ln(factor), the steps in which decay alone shrinks θ by e at the current lr
    (``math.inf`` without decay and for coupled decay). ``algorithm`` is what steps it,
    ``dtype`` and ``state_dtype`` the dtypes of the parameter and of its state (``"8bit"`` for
    quantized state), ``rounding`` how its 16-bit updates are rounded (``"nearest"`` for float32
    and float64), and ``decay_erased`` whether rounding to nearest leaves its decay undone."""

    name: str
    shape: tuple[int, ...]
    group: int
    lr: float
    decay: str
    weight_decay: float
    factor: float
    timescale: float
    l1: float
    rule: str
    algorithm: str = ""
    dtype: str = ""
    state_dtype: str = ""
    rounding: str = "nearest"
    decay_erased: bool = False


@dataclass(frozen=True)
class GroupSummary:
    """One parameter group: its index (``group``), lr, decay mode, λ, λ₁, and how many parameters and
    elements (numel, summed) it holds (a line of the summary above the rows)."""

    group: int
    lr: float
    decay: str
    weight_decay: float
    l1: float
    parameters: int
    elements: int


class Explanation:
    """A table of :class:`ParamRow`: printable, iterable, indexable by parameter name, and
    convertible to data (:meth:`to_json`). ``groups`` holds a :class:`GroupSummary` per group."""

    def __init__(self, rows: list[ParamRow], groups: list[GroupSummary] | None = None,
                 width: int | None = None) -> None:
        self.rows = rows
        self.groups = groups if groups is not None else _summaries_of(rows)
        self.width = width

    def __iter__(self) -> Iterator[ParamRow]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | str) -> ParamRow:
        if isinstance(key, int):
            return self.rows[key]
        for row in self.rows:
            if row.name == key:
                return row
        raise KeyError(key)

    def to_json(self) -> list[dict[str, Any]]:
        """The rows as a list of dicts with every field of :class:`ParamRow`, ready for
        ``json.dumps`` (strict JSON: a shape is a list, and an infinite ``timescale``, which has
        no JSON number, is ``None``, i.e. ``null``)."""
        return [{f.name: _json_value(getattr(r, f.name)) for f in fields(ParamRow)} for r in self.rows]

    def format(self, width: int | None = None) -> str:
        """The table as text, at most ``width`` characters a line: columns that do not fit are
        dropped from the right (the name column always stays) and named in a note line.

        Without ``width``: the width given to :func:`explain`; else the terminal's
        (``shutil.get_terminal_size``) when ``COLUMNS`` is set or standard output is a terminal;
        else no limit (output to a file or a notebook loses no column)."""
        if width is not None:
            check_int("width", width, 1)
        limit = width if width is not None else self.width if self.width is not None else _terminal_width()
        group_lines, group_dropped = _table([f.name for f in fields(GroupSummary)], [astuple(g) for g in self.groups],
                                            limit)
        lines, dropped = _table([f.name for f in fields(ParamRow)], [astuple(r) for r in self.rows], limit)
        if self.groups:
            lines = group_lines + [""] + lines
        decayed = sum(1 for r in self.rows if r.weight_decay or r.l1)
        lines.append(f"{len(self.rows)} parameters, {decayed} regularized, {len(self.rows) - decayed} not")
        erased = sum(1 for r in self.rows if r.decay_erased)
        if erased:
            lines += _wrap(f"{erased} 16-bit parameter{'s' if erased > 1 else ''} whose decay rounding to nearest "
                           "erases (decay_erased): a descend optimizer keeps it with rounding='compensated' or "
                           "'stochastic'", " ", limit)
        if dropped or group_dropped:
            named = ", ".join(dropped + [f"group {c}" for c in group_dropped])
            lines += _wrap(f"not shown (wider than {limit} characters): {named}", ", ", limit)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()

    __repr__ = __str__


def _wrap(text: str, sep: str, limit: int | None) -> list[str]:
    """``text`` in lines of at most ``limit`` characters, broken after a ``sep`` (and not inside
    its first piece: the start of a note stays whole), continued lines indented by two spaces."""
    pieces = text.split(sep)
    lines = [pieces[0]]
    for i, piece in enumerate(pieces[1:], 2):
        end = len(sep.rstrip()) if i < len(pieces) else 0  # room for the comma a break would leave
        if limit is None or len(lines[-1]) + len(sep) + len(piece) + end <= limit:
            lines[-1] += sep + piece
        else:
            lines[-1] += sep.rstrip()
            lines.append("  " + piece)
    return lines


def _join(cells: list[str], widths: list[int]) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()


def _table(header: list[str], values: list[tuple[Any, ...]], limit: int | None) -> tuple[list[str], list[str]]:
    """Aligned lines (header, rule, body) of at most ``limit`` characters, and the names of the
    columns dropped from the right to get there (the first column always stays)."""
    body = [[_cell(v) for v in row] for row in values]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    shown = len(header)
    if limit is not None:
        while shown > 1 and sum(widths[:shown]) + 2 * (shown - 1) > limit:
            shown -= 1
    widths = widths[:shown]
    lines = [_join(header[:shown], widths), "  ".join("-" * w for w in widths)]
    lines += [_join(b[:shown], widths) for b in body]
    return lines, header[shown:]


def _terminal_width() -> int | None:
    isatty = getattr(sys.stdout, "isatty", None)
    if "COLUMNS" in os.environ or (callable(isatty) and isatty()):
        return shutil.get_terminal_size().columns
    return None


def _cell(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, tuple):
        return "×".join(str(d) for d in v) if v else "scalar"
    return str(v)


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, tuple):
        return list(v)
    return v


def _summaries_of(rows: list[ParamRow]) -> list[GroupSummary]:
    summaries: dict[int, GroupSummary] = {}
    for r in rows:
        s = summaries.get(r.group)
        parameters, elements = (s.parameters, s.elements) if s else (0, 0)
        summaries[r.group] = GroupSummary(r.group, r.lr, r.decay, r.weight_decay, r.l1,
                                          parameters + 1, elements + math.prod(r.shape))
    return [summaries[i] for i in sorted(summaries)]


def _mode(group: dict[str, Any]) -> str:
    if "decay" in group:
        return str(group["decay"])
    return "decoupled" if group.get("decoupled_weight_decay") else "coupled"


def explain(optimizer: torch.optim.Optimizer, *, model: torch.nn.Module | None = None,
            width: int | None = None) -> Explanation:
    """One row per parameter of ``optimizer`` (descend's or torch.optim's), group by group, or
    in ``model.named_parameters()`` order where ``model`` is given (parameters are matched by
    identity and keep the optimizer's names; those the model lacks follow, in the optimizer's
    order, and the model's parameters the optimizer lacks are left out). ``width`` fixes the
    printed width (default: the terminal's, see :meth:`Explanation.format`)."""
    if width is not None:
        check_int("width", width, 1)
    rows: list[tuple[ParamRow, torch.Tensor]] = []
    groups = []
    for gi, group in enumerate(optimizer.param_groups):
        names = group.get("param_names") or [f"group{gi}.param{i}" for i in range(len(group["params"]))]
        decay = _mode(group)
        lr = float(group["lr"])
        base_lr = float(group.get("base_lr", group.get("initial_lr", lr)))
        wd = float(group.get("weight_decay", 0.0))
        l1 = float(group.get("l1", 0.0))
        factor = regularization.decay_factor(decay, lr, base_lr, wd)
        steps = timescale_of_factor(factor)
        rule = regularization.describe({"decay": decay, "weight_decay": wd, "l1": l1})
        algorithm = str(group.get("algorithm") or type(optimizer).__name__.lower())
        # (erased_decay reads a group's decay mode and lr₀ by descend's keys: torch's groups get them)
        seen = {**group, "decay": decay, "base_lr": base_lr}
        for name, p in zip(names, group["params"], strict=True):
            dtype, stored, rounding, erased = precision.account(optimizer, p, seen)
            rows.append((ParamRow(str(name), tuple(p.shape), gi, lr, decay, wd, factor, steps, l1, rule, algorithm,
                                  dtype, stored, rounding, bool(erased)), p))
        groups.append(GroupSummary(gi, lr, decay, wd, l1, len(group["params"]),
                                   sum(p.numel() for p in group["params"])))
    if model is not None:
        position: dict[int, int] = {}
        for _, p in model.named_parameters(remove_duplicate=False):  # a tied parameter sits where it first appears
            position.setdefault(id(p), len(position))
        rows.sort(key=lambda rp: position.get(id(rp[1]), len(position)))  # stable: the rest keep their order
    return Explanation([r for r, _ in rows], groups, width)
