"""A readable account of what each parameter gets from an optimizer.

``print(descend.explain(optimizer))`` shows one row per parameter: its name (where the
optimizer was given names), shape, group, current lr, decay mode, weight decay, the factor
θ is multiplied by in one step at the current lr, and L1. It reads torch.optim optimizers
too (SGD and Adam decay coupled, AdamW decoupled), so a user can check a set-up before
switching.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import astuple, dataclass, fields
from typing import Any

import torch

from descend import regularization

__all__ = ["explain", "Explanation", "ParamRow"]


@dataclass(frozen=True)
class ParamRow:
    """What one parameter gets. ``factor`` is 1 − s·λ for a decoupled mode and 1 for
    coupled decay, whose λ·θ goes into the gradient (``rule`` says which)."""

    name: str
    shape: tuple[int, ...]
    group: int
    lr: float
    decay: str
    weight_decay: float
    factor: float
    l1: float
    rule: str


class Explanation:
    """A table of :class:`ParamRow`: printable, iterable, indexable by parameter name."""

    def __init__(self, rows: list[ParamRow]) -> None:
        self.rows = rows

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

    def __str__(self) -> str:
        header = [f.name for f in fields(ParamRow)]
        body = [[_cell(v) for v in astuple(r)] for r in self.rows]
        widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)) for b in body]
        decayed = sum(1 for r in self.rows if r.weight_decay or r.l1)
        lines.append(f"{len(self.rows)} parameters, {decayed} regularized, {len(self.rows) - decayed} not")
        return "\n".join(lines)

    __repr__ = __str__


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, tuple):
        return "×".join(str(d) for d in v) if v else "scalar"
    return str(v)


def _mode(group: dict[str, Any]) -> str:
    if "decay" in group:
        return str(group["decay"])
    return "decoupled" if group.get("decoupled_weight_decay") else "coupled"


def explain(optimizer: torch.optim.Optimizer) -> Explanation:
    """One row per parameter of ``optimizer`` (descend's or torch.optim's)."""
    rows = []
    for gi, group in enumerate(optimizer.param_groups):
        names = group.get("param_names") or [f"group{gi}.param{i}" for i in range(len(group["params"]))]
        decay = _mode(group)
        lr = float(group["lr"])
        base_lr = float(group.get("base_lr", group.get("initial_lr", lr)))
        wd = float(group.get("weight_decay", 0.0))
        l1 = float(group.get("l1", 0.0))
        factor = regularization.decay_factor(decay, lr, base_lr, wd)
        rule = regularization.describe({"decay": decay, "weight_decay": wd, "l1": l1})
        for name, p in zip(names, group["params"], strict=True):
            rows.append(ParamRow(str(name), tuple(p.shape), gi, lr, decay, wd, factor, l1, rule))
    return Explanation(rows)
