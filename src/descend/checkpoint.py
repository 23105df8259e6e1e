"""Checks a state dict before an optimizer loads it.

torch.optim's ``load_state_dict`` accepts an Adam state into SGD, moment buffers of the wrong
shape and parameters in another order, and fails later (or never, and trains on garbage).
:func:`aligned_state_dict` checks, before anything changes:

- the number of groups and of parameters per group (as torch does);
- parameter names, where both sides have them: the same names in another order are matched
  by name; missing or unexpected names are an error that lists them;
- the optimizer kind: state entries this optimizer does not keep (``exp_avg`` into SGD,
  ``momentum_buffer`` into Adam), or a saved group without this optimizer's hyperparameters;
- every state entry against the rule's declaration (:mod:`descend.state`): entries this
  optimizer does not keep, types, shapes and dtypes (torch would cast silently), and value
  ranges (a step count is a finite number ≥ 0, second moments hold no negative value);
- precision (:mod:`descend.precision`): a state saved in another precision (a descend state
  dict with a ``state_dtype``, or any state loaded into an optimizer that has one) is checked
  in plain form (8-bit codes dequantized, any float dtype), then converted to this optimizer's
  stored form: entries already in it are kept bit for bit, others cast or quantized; the
  saved state of stochastic rounding's generators is checked too. torch's own load would
  then cast every float entry to its parameter's dtype (pytorch/pytorch#43706): the optimizer
  puts the converted entries back (``RegularizedOptimizer._restore_loaded``).

It returns a state dict in this optimizer's parameter order; a rejected one raises
``ValueError`` saying what differs, and the optimizer is unchanged.
"""

from __future__ import annotations

from typing import Any, cast

import torch

from descend import precision
from descend.state import StateSpec


def _names(group: dict[str, Any]) -> list[str] | None:
    names = group.get("param_names")
    return list(names) if names is not None else None


def _reorder_by_name(saved_groups: list[dict[str, Any]], groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Saved groups whose ``params`` ids are permuted to follow the current names."""
    out = []
    for gi, (saved, current) in enumerate(zip(saved_groups, groups, strict=True)):
        saved_names, names = _names(saved), _names(current)
        if saved_names is None or names is None or saved_names == names:
            out.append(saved)
            continue
        missing = [n for n in names if n not in saved_names]
        unexpected = [n for n in saved_names if n not in names]
        if missing or unexpected or len(set(saved_names)) != len(saved_names):
            raise ValueError(
                f"parameter names of group {gi} differ: missing from the state dict {missing}, "
                f"not in the optimizer {unexpected}")
        position = {n: i for i, n in enumerate(saved_names)}
        reordered = dict(saved)
        reordered["params"] = [saved["params"][position[n]] for n in names]
        reordered["param_names"] = names
        out.append(reordered)
    return out


def aligned_state_dict(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` checked against ``optimizer`` and put in its parameter order."""
    kind = type(optimizer).__name__
    if not isinstance(state_dict, dict) or "param_groups" not in state_dict or "state" not in state_dict:
        raise ValueError(f"not an optimizer state dict (expected the keys 'state' and 'param_groups'), "
                         f"got {type(state_dict).__name__}")
    saved_groups, groups = state_dict["param_groups"], optimizer.param_groups
    if len(saved_groups) != len(groups):
        raise ValueError(f"the state dict has {len(saved_groups)} parameter groups, {kind} has {len(groups)}")
    for gi, (saved, current) in enumerate(zip(saved_groups, groups, strict=True)):
        if len(saved["params"]) != len(current["params"]):
            raise ValueError(f"group {gi} of the state dict has {len(saved['params'])} parameters, "
                             f"group {gi} of {kind} has {len(current['params'])}")
        missing = [k for k in getattr(optimizer, "_group_keys", ()) if k not in saved]
        if missing:
            raise ValueError(f"group {gi} of the state dict lacks {missing}, which {kind} needs: "
                             f"was it saved by another kind of optimizer?")
    saved_groups = _reorder_by_name(saved_groups, groups)

    spec: StateSpec | None = getattr(optimizer, "state_spec", None)
    prec: precision.Precision | None = getattr(optimizer, "_precision", None)
    # a state in another precision (descend's low-precision state dicts, or any state loaded
    # into a low-precision optimizer) is checked in plain form, then converted; otherwise
    # every dtype must be the declared one, as torch would cast silently
    relaxed = spec is not None and prec is not None and (prec.active or "precision" in state_dict)
    base = cast(StateSpec, getattr(type(optimizer), "state_spec", spec) if relaxed else spec)
    any_float = frozenset(prec.converted) if relaxed and prec is not None else frozenset()
    if relaxed and prec is not None and prec.rounding == "stochastic" and "rounding_generators" in state_dict:
        precision.Generators.check(state_dict["rounding_generators"])
    state = state_dict["state"]
    converted = dict(state)
    for saved, current in zip(saved_groups, groups, strict=True):
        names = _names(current)
        for pi, (pid, param) in enumerate(zip(saved["params"], current["params"], strict=True)):
            entry = state.get(pid)
            if entry is None:
                continue
            label = repr(names[pi]) if names else f"{pi} of its group (shape {tuple(param.shape)})"
            if not isinstance(entry, dict):
                raise ValueError(f"the state of parameter {label} is a {type(entry).__name__}, not a dict")
            if spec is not None and entry:
                group = {**optimizer.defaults, **saved}
                if relaxed and prec is not None:
                    try:
                        plain = precision.plain_state(entry, base)
                    except ValueError as e:
                        raise ValueError(f"the state of parameter {label}: {e}") from None
                    base.check_loaded(param, plain, label, kind, group, any_float=any_float)
                    converted[pid] = stored = precision.stored_state(prec, param, entry)
                    spec.check_loaded(param, stored, label, kind, group)
                else:
                    spec.check_loaded(param, entry, label, kind, group)
    out = dict(state_dict)
    out["param_groups"] = saved_groups
    out["state"] = converted
    return out
