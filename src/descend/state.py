"""The declaration of an optimizer's per-parameter state, and every check that reads it.

Each rule declares its state once, as a :class:`StateSpec` of :class:`Entry` objects: the
entry's name, its shape relative to the parameter θ (:data:`LIKE_PARAM`, :data:`SCALAR`, a
row or column factor of θ, …), its dtype (θ's, or a fixed one such as float32 for a step
count), whether every parameter with state must have it, for which parameters and groups it
exists at all, and the values it may hold. From that one declaration come

- the state of a parameter before its first step (:meth:`StateSpec.new_state`),
- the checks before a step changes anything (:meth:`StateSpec.check`, and
  :meth:`StateSpec.all_fit`, its bulk form over a whole group, in C-level maps),
- the checks of a state dict before it is loaded (:meth:`StateSpec.check_loaded`: foreign
  entries, types, shapes, dtypes and value ranges),
- what flat storage may keep in one buffer (:meth:`StateSpec.flat_kind`).

Nothing else in descend restates what a rule's state looks like.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from descend.tensors import DTYPE, SHAPE

__all__ = ["Entry", "StateSpec", "LIKE_PARAM", "SCALAR", "ROW_FACTOR", "COL_FACTOR", "ANY_SHAPE"]

Shape = Callable[[torch.Size], tuple[int, ...] | None]


def LIKE_PARAM(shape: torch.Size) -> tuple[int, ...]:  # noqa: N802 - a constant, named as one
    """θ's own shape (moments, momentum buffers)."""
    return tuple(shape)


def SCALAR(shape: torch.Size) -> tuple[int, ...]:  # noqa: N802
    """A 0-dimensional tensor (step counts)."""
    return ()


def ROW_FACTOR(shape: torch.Size) -> tuple[int, ...]:  # noqa: N802
    """θ's shape with the last dimension reduced to 1 (a factored second moment's rows)."""
    return (*shape[:-1], 1)


def COL_FACTOR(shape: torch.Size) -> tuple[int, ...]:  # noqa: N802
    """θ's shape with the second-to-last dimension reduced to 1 (its columns)."""
    return (*shape[:-2], 1, shape[-1])


def ANY_SHAPE(shape: torch.Size) -> None:  # noqa: N802
    """Not checked (the closure solvers' slices of their vectors and histories)."""
    return None


def _always(param: Tensor, group: dict[str, Any]) -> bool:
    return True


@dataclass(frozen=True)
class Entry:
    """One state entry of a rule.

    Args:
        name: the key in ``optimizer.state[p]``.
        shape: its shape as a function of θ's shape (:data:`LIKE_PARAM`, :data:`SCALAR`, …).
        dtype: a fixed dtype, or None for θ's dtype. A scalar entry with ``dtype=None``
            accepts any floating dtype (torch keeps step counts in float32, or float64
            under a float64 default dtype). It is the *stored* dtype: an optimizer with a
            ``state_dtype`` declares its moments in it (uint8 codes for 8 bits, see
            :mod:`descend.precision`), so that every check below holds the stored form.
        init: "zeros" if the pipeline creates it (zeros) before a parameter's first step;
            None if the rule creates it itself (SGD's momentum buffer is the first gradient).
        required: every parameter that has state has this entry (where ``when`` holds).
        when: for which parameters and groups the entry exists (Adafactor's factors only
            for matrices, AMSGrad's maximum only with ``amsgrad=True``).
        device: "param" (θ's device) or "cpu" (where torch keeps a count off the device).
        low: the least value any element may hold, checked at load (second moments ≥ 0).
        none_allowed: the entry may be None (torch's SGD keeps ``momentum_buffer=None``).
        tensor: False for an entry that is not a tensor of its own (the closure solvers' counts
            and lists of history vectors), whose type and shape are not checked.
    """

    name: str
    shape: Shape = LIKE_PARAM
    dtype: torch.dtype | None = None
    init: str | None = "zeros"
    required: bool = True
    when: Callable[[Tensor, dict[str, Any]], bool] = _always
    device: str = "param"
    low: float | None = None
    none_allowed: bool = False
    tensor: bool = True

    def expected_shape(self, param: Tensor) -> tuple[int, ...] | None:
        return self.shape(param.shape)

    def expected_dtype(self, param: Tensor) -> torch.dtype | None:
        if self.dtype is not None:
            return self.dtype
        return None if self.shape is SCALAR else param.dtype

    def misfit(self, param: Tensor, value: Any) -> str | None:
        """Why ``value`` cannot be this entry of ``param``'s state (None if it can)."""
        if not self.tensor:
            return None
        if value is None:
            return None if self.none_allowed else "is None"
        if not isinstance(value, Tensor):
            return f"is a {type(value).__name__}, not a tensor"
        shape = self.expected_shape(param)
        if shape is not None and tuple(value.shape) != shape:
            return f"has shape {tuple(value.shape)}, but the parameter's needs shape {shape}"
        dtype = self.expected_dtype(param)
        if dtype is not None and value.dtype != dtype:
            return f"has dtype {value.dtype}, but the parameter has dtype {param.dtype}" if self.dtype is None \
                else f"has dtype {value.dtype}, not {dtype}"
        if dtype is None and self.shape is SCALAR and not value.is_floating_point():
            return f"has dtype {value.dtype}, not a floating-point dtype"
        return None


@dataclass(frozen=True)
class StateSpec:
    """The state of one rule: its entries, in order."""

    entries: tuple[Entry, ...] = ()
    by_name: dict[str, Entry] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_name", {e.name: e for e in self.entries})

    @classmethod
    def untyped(cls, *names: str) -> StateSpec:
        """Entries whose values are not checked (the closure solvers keep counts, floats and
        lists of slices of their vectors); only foreign keys are refused at load."""
        return cls(tuple(Entry(n, init=None, required=False, tensor=False) for n in names))

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.by_name)

    def new_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        """The state of ``param`` before its first step: zeros for every entry the pipeline creates."""
        state: dict[str, Any] = {}
        for e in self.entries:
            if e.init != "zeros" or not e.when(param, group):
                continue
            shape = e.expected_shape(param)
            device = torch.device("cpu") if e.device == "cpu" else param.device
            dtype = e.dtype or (torch.float32 if e.shape is SCALAR else param.dtype)
            if e.shape is LIKE_PARAM and e.dtype is None:
                state[e.name] = torch.zeros_like(param, memory_format=torch.preserve_format)
            else:
                state[e.name] = torch.zeros(shape or (), dtype=dtype, device=device)
        return state

    def _missing(self, param: Tensor, state: dict[str, Any], group: dict[str, Any] | None) -> list[str]:
        return [e.name for e in self.entries if e.required and e.name not in state
                and (group is None or e.when(param, group))]

    def check(self, param: Tensor, state: dict[str, Any], group: dict[str, Any], label: str) -> None:
        """Raise ValueError if ``state`` cannot be ``param``'s (before a step: nothing changed)."""
        missing = self._missing(param, state, group)
        if missing:
            raise ValueError(f"the state of {label} lacks {missing}; nothing was changed")
        for key, value in state.items():
            entry = self.by_name.get(key)
            if entry is None:
                continue  # an entry the rule does not read (load_state_dict refuses foreign ones)
            why = entry.misfit(param, value)
            if why is not None:
                raise ValueError(f"state {key!r} of {label} {why}; nothing was changed")

    def all_fit(self, params: list[Tensor], states: list[dict[str, Any]], group: dict[str, Any]) -> bool:
        """:meth:`check` for a whole group at once, key by key with C-level maps.

        True only if every state fits; False means "look closer" (a misfit, or states too
        irregular for the bulk form, such as key sets that differ), never a wrong True."""
        keys = states[0].keys()
        if not all(map(keys.__eq__, map(dict.keys, states))):
            return False
        for e in self.entries:
            if not e.required:
                continue
            if e.when is _always:
                if e.name not in keys:
                    return False
            # an entry required for some parameters only (Adafactor's factors): per parameter
            elif any(e.when(p, group) != (e.name in keys) for p in params):
                return False
        shapes = dtypes = None
        for key in keys:
            entry = self.by_name.get(key)
            if entry is None:
                continue
            values = [s[key] for s in states]
            if not entry.tensor:
                continue
            try:
                dims = list(map(Tensor.dim, values))
            except TypeError:  # not a tensor (None, a number): the per-parameter check decides
                return False
            if entry.shape is SCALAR:
                if any(dims) or not all(v.is_floating_point() for v in values):
                    return False
                if entry.dtype is not None and any(v.dtype != entry.dtype for v in values):
                    return False
                continue
            if entry.shape is LIKE_PARAM:
                if shapes is None:
                    shapes, dtypes = list(map(SHAPE, params)), list(map(DTYPE, params))
                if list(map(SHAPE, values)) != shapes:
                    return False
            elif entry.shape is not ANY_SHAPE:
                if [tuple(v.shape) for v in values] != [entry.expected_shape(p) for p in params]:
                    return False
            if entry.dtype is not None:
                if any(v.dtype != entry.dtype for v in values):
                    return False
            else:
                if dtypes is None:
                    dtypes = list(map(DTYPE, params))
                if list(map(DTYPE, values)) != dtypes:
                    return False
        return True

    def check_loaded(self, param: Tensor, state: dict[str, Any], label: str, kind: str,
                     group: dict[str, Any] | None = None, any_float: frozenset[str] = frozenset()) -> None:
        """Raise ValueError if a saved ``state`` cannot be ``param``'s: entries this rule does not
        keep (or not for this parameter, such as a row factor of a vector), then each entry's
        type, shape and dtype, then its values (finite scalars; no element below the entry's
        ``low``). Reads the values: done at load, never per step. The entries named in
        ``any_float`` may have any floating dtype (a state saved in another precision, which
        :mod:`descend.precision` converts)."""
        foreign = sorted(set(state) - set(self.by_name))
        if foreign:
            raise ValueError(f"the state of parameter {label} holds {foreign}, which {kind} does not keep: "
                             f"was it saved by another kind of optimizer?")
        for key, value in state.items():
            entry = self.by_name[key]
            if group is not None and entry.required and not entry.when(param, group):
                raise ValueError(f"state {key!r} of parameter {label} is not kept for a parameter of shape "
                                 f"{tuple(param.shape)} by {kind}")
            if entry.shape is SCALAR and isinstance(value, (int, float)) and not isinstance(value, bool):
                value = torch.tensor(float(value))  # torch < 1.12 saved counts as numbers; torch converts them
            if key in any_float and isinstance(value, Tensor) and value.is_floating_point() \
                    and not value.is_complex():
                entry = replace(entry, dtype=value.dtype)
            why = entry.misfit(param, value)
            if why is not None:
                raise ValueError(f"state {key!r} of parameter {label} {why}")
            if not isinstance(value, Tensor) or not value.is_floating_point() or value.numel() == 0:
                continue
            if entry.shape is SCALAR:
                x = float(value)
                if not math.isfinite(x) or (entry.low is not None and x < entry.low):
                    raise ValueError(f"state {key!r} of parameter {label} is {x!r} "
                                     f"(allowed: a finite number >= {entry.low if entry.low is not None else '-inf'})")
            elif entry.low is not None and bool((value < entry.low).any()):
                raise ValueError(f"state {key!r} of parameter {label} holds values below {entry.low} "
                                 f"(least {float(value.min())!r}), which no step of {kind} can make")

    def flat_kind(self, key: str) -> str | None:
        """Where flat storage keeps an entry: "element" (one value per element of θ, in a
        buffer), "scalar" (one per parameter, in a vector), or None (not declared, or of
        another shape: flat storage cannot hold it)."""
        entry = self.by_name.get(key)
        if entry is None:
            return None
        if entry.shape is LIKE_PARAM:
            return "element"
        if entry.shape is SCALAR:
            return "scalar"
        return None

    def flattenable(self) -> bool:
        """Whether every entry is per element or per parameter (so ``flat=True`` applies)."""
        return all(self.flat_kind(e.name) is not None for e in self.entries)
