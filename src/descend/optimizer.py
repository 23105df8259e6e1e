"""The base class of every descend optimizer, and the step pipeline every rule plugs into.

It knows no algorithm. It owns what all of them share: parameter groups and their
defaults, validation of every option (at construction, in ``add_param_group`` and again
before each step, since groups are plain dicts a user may edit), ``base_lr`` (the lr a group
had when it was given to the optimizer, which the "independent" and "corrected" decay modes
divide by), the non-finite gradient guard, and loading state dicts saved by torch.optim.

A step runs in two phases so that nothing is half-applied: :meth:`_prepare` gathers every
group's parameters, gradients and (new or existing) state and checks them all against the
rule's state declaration (:mod:`descend.state`), raising before anything changes; only then
does each group's batch flow through the pipeline::

    group → (params, grads, state) → regularize before → update rule → regularize after → params

"regularize before" and "after" are :func:`descend.regularization.regularize_before` and
:func:`~descend.regularization.regularize_after`, applying the group's
:class:`~descend.regularization.DecayPlan`; the rule (``_update``) never sees the decay mode.
Which implementation runs (fused, foreach, the per-tensor reference) is chosen by
:mod:`descend.dispatch`.

A rule is a subclass that declares

- ``state_spec``: its state (:class:`descend.state.StateSpec`);
- ``_update(batch, implementation)``: the update over one :class:`GroupBatch`, reading
  ``batch.terms`` (what its kernel must still do: :class:`~descend.regularization.KernelTerms`);
- ``_check_group(group)``: its own options (ValueError in descend's format);
- optionally ``_fast_paths`` (its forms besides the reference), ``_absorbs`` (what each
  form's kernel applies itself), ``_tensor_lr_paths`` (forms that keep a tensor lr a tensor,
  as torch's do), ``_fused_broken`` and ``_inspect`` (a look at θ before decay shrinks it).
"""

from __future__ import annotations

import itertools
import operator
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from descend import dispatch, precision, regularization
from descend.regularization import Absorbs, KernelTerms
from descend.state import SCALAR, StateSpec
from descend.tensors import (
    DTYPE,
    IS_CPU,
    SHAPE,
    all_finite,
    by_device_and_dtype,
    is_dtensor,
    nonfinite_flags,
    sharded_nonfinite,
)
from descend.validation import check_flag, check_number, invalid, scalar_value

if TYPE_CHECKING:
    from descend.flat import FlatStorage

NONFINITE_MODES = ("ignore", "skip", "raise")
IMPLEMENTATIONS = dispatch.IMPLEMENTATIONS
#: the terms of a batch before "regularize before" (frozen, so one object serves every batch)
NO_TERMS = KernelTerms()


_deref = weakref.ref.__call__
_PLAIN_TENSORS = frozenset((Tensor, torch.nn.Parameter))


def initial_base_lr(group: dict[str, Any]) -> float:
    """lr₀ of a group given to an optimizer: its lr, times timm's ``lr_scale`` if it has one."""
    return scalar_value(group["lr"]) * float(group.get("lr_scale", 1.0))


@dataclass
class GroupBatch:
    """What one group contributes to a step: the parameters that have a gradient, their
    gradients, and their state (entries not yet in ``optimizer.state`` are in ``new``)."""

    group: dict[str, Any]
    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    states: list[dict[str, Any]] = field(default_factory=list)
    new: dict[Tensor, dict[str, Any]] = field(default_factory=dict)
    implementation: str = "single"
    #: what the kernel must still do after the pipeline's "regularize before"
    terms: KernelTerms = field(default_factory=KernelTerms)
    #: per-parameter values a rule's ``_inspect`` took from θ before decay
    inspected: list[Any] = field(default_factory=list)
    #: for a fused kernel that takes them (``_amp_fused``): the scale the gradients still carry
    #: (GradScaler's), and a device flag, nonzero where the step must change nothing
    grad_scale: Tensor | None = None
    found_inf: Tensor | None = None

    def state_list(self, key: str) -> list[Any]:
        return [s.get(key) for s in self.states]

    def part(self, chosen: list[bool]) -> GroupBatch:
        """The batch of the chosen parameters only (same group, implementation and terms)."""
        pick = list(itertools.compress(range(len(self.params)), chosen))
        return GroupBatch(self.group, [self.params[i] for i in pick], [self.grads[i] for i in pick],
                          [self.states[i] for i in pick], implementation=self.implementation, terms=self.terms,
                          inspected=[self.inspected[i] for i in pick] if self.inspected else [],
                          grad_scale=self.grad_scale, found_inf=self.found_inf)


class RegularizedOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` with descend's regularization vocabulary.

    Subclasses (the rules) provide what the module docstring lists.
    """

    #: the rule's per-parameter state (:mod:`descend.state`)
    state_spec: StateSpec = StateSpec()
    #: implementations this optimizer has besides the per-tensor reference.
    _fast_paths: tuple[str, ...] = ("fused", "foreach")
    #: what each implementation's kernel applies itself (the pipeline does the rest)
    _absorbs: dict[str, Absorbs] = {}
    #: implementations in which a tensor lr stays a tensor (torch computes with it so)
    _tensor_lr_paths: tuple[str, ...] = ()
    #: whether the rule steps complex parameters (refused in add_param_group otherwise)
    _steps_complex: bool = True
    #: whether the rule takes sparse gradients (SparseAdam); every other rule refuses them
    _sparse_grads: bool = False
    #: whether the rule's fused kernel unscales gradients and skips on a device flag itself
    #: (``batch.grad_scale``, ``batch.found_inf``), as torch's fused SGD and Adam kernels do
    _amp_fused: bool = False
    #: whether the rule's fused kernel takes DTensor (FSDP2) parameters (a sharding rule for it)
    _fused_dtensor: bool = False
    #: GradScaler's contract: it sets ``grad_scale`` and ``found_inf`` on the optimizer and calls
    #: ``step()`` without unscaling or reading ``found_inf`` itself. A fused kernel that takes
    #: them does both on the device; every other path unscales the gradients in place and skips
    #: the step on one host read, as GradScaler would (:meth:`_unscale`).
    _step_supports_amp_scaling: bool = True

    def __init__(self, params: Any, defaults: dict[str, Any], *, nonfinite: str = "ignore",
                 warn: bool = True, flat: bool = False, rounding: str = "nearest",
                 state_dtype: Any = None) -> None:
        if nonfinite not in NONFINITE_MODES:
            raise invalid("nonfinite", nonfinite, ", ".join(repr(m) for m in NONFINITE_MODES))
        check_flag("warn", warn)
        check_flag("flat", flat)
        # rounding of 16-bit parameters and the dtype of the state (descend.precision); the
        # declaration of the state says its stored form, so every check reads the right dtypes
        self._precision = precision.Precision.of(rounding, state_dtype)
        self.state_spec = self._precision.declare(type(self).state_spec, type(self).__name__)
        if flat and state_dtype == "8bit":
            raise invalid("flat", flat, "False with state_dtype='8bit' (flat storage holds one value per element "
                                        "or per parameter, not 8-bit state's scale per block)")
        self._precision_groups: set[int] = set()
        self.nonfinite = nonfinite
        #: whether implausible decay settings warn (at construction and in add_param_group)
        self.warn = warn
        self.skipped_steps = 0
        self._validate(defaults)
        super().__init__(params, defaults)
        for gi, group in enumerate(self.param_groups):
            self._precision_group_added(group, gi)
        self._install_precision_hooks()
        if flat:
            self._use_flat_storage()

    # --- precision (descend.precision) -------------------------------------------------

    @property
    def rounding(self) -> str:
        """How 16-bit parameters are rounded: "nearest", "compensated" or "stochastic"."""
        return self._precision_of().rounding

    @property
    def state_dtype(self) -> Any:
        """The dtype the θ-shaped state is stored in (None: the parameter's, or "8bit")."""
        return self._precision_of().state_dtype

    def _install_precision_hooks(self) -> None:
        """The state dict hooks that keep a low-precision state in its stored form (torch's load
        casts float state to the parameter's dtype) and carry the rounding generators."""
        if self._precision.active:
            self.register_state_dict_post_hook(RegularizedOptimizer._save_precision)
            self.register_load_state_dict_pre_hook(RegularizedOptimizer._stash_loaded)
            self.register_load_state_dict_post_hook(RegularizedOptimizer._restore_loaded)

    def _precision_state(self) -> dict[str, Any]:
        """What pickling and ``copy.deepcopy`` must keep of the precision: torch's ``__getstate__``
        keeps only defaults, state and groups (and its ``__setstate__`` drops every hook)."""
        prec = self._precision_of()
        return {"rounding": prec.rounding, "state_dtype": prec.state_dtype,
                "generators": prec.generators.state() if prec.generators is not None else None}

    def _restore_precision(self, saved: dict[str, Any] | None) -> None:
        """The counterpart of :meth:`_precision_state`, for ``__setstate__``."""
        saved = saved or {}
        self._precision = precision.Precision.of(saved.get("rounding", "nearest"), saved.get("state_dtype"))
        self.state_spec = self._precision.declare(type(self).state_spec, type(self).__name__)
        if saved.get("generators") is not None and self._precision.generators is not None:
            self._precision.generators.load(saved["generators"])
        self._install_precision_hooks()

    def _precision_of(self) -> precision.Precision:
        prec = self.__dict__.get("_precision")
        return prec if prec is not None else precision.Precision()

    def _precision_group_added(self, group: dict[str, Any], index: int) -> None:
        """Checks of a new group against ``rounding`` and ``state_dtype`` (once per group): a
        ValueError for a parameter they cannot hold, and one warning where rounding to nearest
        erases the group's decay."""
        seen = self.__dict__.setdefault("_precision_groups", set())
        if id(group) in seen:
            return
        seen.add(id(group))
        prec = self._precision_of()
        for p in group["params"]:
            if isinstance(p, Tensor):
                prec.check_param(p, self._describe_param(p))
        if self.warn:
            precision.warn_if_decay_erased(self, group, f"group {index} of {type(self).__name__}")

    @staticmethod
    def _save_precision(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
        """State dict post-hook: the precision the state is stored in, and the generators' states."""
        prec = cast(RegularizedOptimizer, optimizer)._precision_of()
        dtype = prec.state_dtype
        state_dict["precision"] = {"rounding": prec.rounding,
                                   "state_dtype": dtype if dtype is None or isinstance(dtype, str)
                                   else str(dtype).removeprefix("torch.")}
        if prec.generators is not None:
            state_dict["rounding_generators"] = prec.generators.state()

    @staticmethod
    def _stash_loaded(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
        """Load pre-hook: keep the checked, converted state dict for :meth:`_restore_loaded`."""
        optimizer.__dict__["_loading"] = state_dict

    @staticmethod
    def _restore_loaded(optimizer: torch.optim.Optimizer) -> None:
        """Load post-hook: torch's load cast every float state entry (and the 8-bit codes) to its
        parameter's dtype; put back the entries :func:`descend.checkpoint.aligned_state_dict`
        converted to this optimizer's stored form, on the parameter's device."""
        loaded = optimizer.__dict__.pop("_loading", None)
        if loaded is None:
            return
        saved_ids = itertools.chain.from_iterable(g["params"] for g in loaded["param_groups"])
        params = itertools.chain.from_iterable(g["params"] for g in optimizer.param_groups)
        for pid, p in zip(saved_ids, params):
            saved = loaded["state"].get(pid)
            state = optimizer.state.get(p)
            if saved is None or state is None:
                continue
            for key, value in saved.items():
                if key != "step" and isinstance(value, Tensor):
                    state[key] = value.to(device=p.device)
        prec = cast(RegularizedOptimizer, optimizer)._precision_of()
        if prec.generators is not None and "rounding_generators" in loaded:
            prec.generators.load(loaded["rounding_generators"])

    # --- groups and validation ---------------------------------------------------------

    def _check_group(self, group: dict[str, Any]) -> None:
        """Raise ValueError for an invalid option of this optimizer (subclasses extend)."""

    def _validate(self, group: dict[str, Any], stepping: bool = False) -> None:
        lr = group["lr"]
        if not isinstance(lr, (float, int, Tensor)) or isinstance(lr, bool):
            # a Fraction or a Decimal passes as a real number but not into torch's kernels
            raise invalid("lr", lr, "a float, an int or a 1-element tensor")
        # a tensor lr's value cannot be read while torch.compile traces the step (a graph break,
        # and a recompile at every new value), nor while a CUDA graph captures a capturable step,
        # and on a device every read is a host-device sync: there, as torch.optim does at every
        # step, it is not checked (a capturable group's is checked where the group is added)
        traced_lr = isinstance(lr, Tensor) and (dispatch.compiling() or (stepping and (
            bool(group.get("capturable")) or not lr.is_cpu)))
        if isinstance(lr, Tensor) and lr.numel() != 1:  # (torch's words, and its order of checks)
            raise ValueError(f"Tensor lr must be 1-element, not of shape {tuple(lr.shape)} "
                             "(lr; allowed: a float, an int or a 1-element tensor)")
        if not traced_lr:
            check_number("lr", lr, low=0)
        if "lr_scale" in group:
            check_number("lr_scale", group["lr_scale"], low=0)
        if "base_lr" in group:
            base_lr = group["base_lr"]
            if not isinstance(base_lr, (float, int)) or isinstance(base_lr, bool):
                raise invalid("base_lr", base_lr, "a float: the lr the group had when it was given to the optimizer")
            check_number("base_lr", base_lr, low=0)
        regularization.check_regularization(group)
        if not traced_lr:
            regularization.check_factor(group, base_lr=group.get("base_lr", initial_base_lr(group)))
        for flag in ("maximize", "nesterov", "amsgrad"):
            if flag in group:
                check_flag(flag, group[flag])
        for flag in ("foreach", "fused"):
            check_flag(flag, group.get(flag), optional=True)
        if group.get("foreach") and group.get("fused"):
            raise ValueError("Invalid foreach=True with fused=True (allowed: at most one of them)")
        if group.get("fused") and "fused" not in self._fast_paths:
            raise invalid("fused", group["fused"], f"None or False: {type(self).__name__} has no fused kernel")
        self._check_group(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``, after every option and every parameter's dtype was checked.

        A group without names added to an optimizer whose groups have names (built from
        :func:`descend.param_groups` or ``named_parameters()``) gets made-up names
        ``group{i}.param{j}``, where torch raises: libraries that unfreeze layers later
        (Lightning's BackboneFinetuning) add plain groups. The group's ``base_lr`` (lr₀) is
        fixed here: its lr, times timm's ``lr_scale`` where the group carries one (timm's
        scheduler multiplies the lr by it at every step, so it is part of lr₀, not schedule)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        options = {k: v for k, v in param_group.items() if k not in ("params", "param_names")}
        self._validate({**self.defaults, **options})
        params = param_group.get("params")
        if isinstance(params, Tensor):
            params = [params]
        elif params is not None and not isinstance(params, set):
            params = list(params)
        if isinstance(params, list):
            for i, p in enumerate(params):
                tensor = p[1] if isinstance(p, tuple) and len(p) == 2 else p
                if not isinstance(tensor, Tensor):
                    continue  # torch's add_param_group says what it must be
                name = f"parameter {p[0]!r}" if tensor is not p else f"parameter {i} of the group"
                if not (tensor.is_floating_point() or tensor.is_complex()):
                    raise invalid("params", f"{name} of dtype {tensor.dtype}",
                                  "floating-point or complex tensors (an optimizer step cannot move integers)")
                if tensor.is_complex() and not self._steps_complex:
                    raise invalid("params", f"{name} of dtype {tensor.dtype}",
                                  f"real tensors: {type(self).__name__} does not support complex parameters")
            named = self.param_groups and "param_names" in self.param_groups[0]
            if named and "param_names" not in param_group and not any(isinstance(p, tuple) for p in params):
                params = [(f"group{len(self.param_groups)}.param{j}", p) for j, p in enumerate(params)]
            param_group["params"] = params
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        # lr₀ of the "independent" and "corrected" modes: fixed here, never touched by LR schedulers.
        group.setdefault("base_lr", initial_base_lr(group))
        if self.warn:
            regularization.warn_if_implausible(group, f"group {len(self.param_groups) - 1} of {type(self).__name__}")
        self._precision_group_added(group, len(self.param_groups) - 1)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["precision"] = self._precision_state()  # (torch keeps three keys, and no hooks)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        saved = state.pop("precision", None)
        ours = "differentiable" in state.get("defaults", {})
        super().__setstate__(state)
        if saved is not None:
            # unpickling; torch's load_state_dict also calls __setstate__ (with state and groups
            # only), and there the optimizer's own precision stands
            self._restore_precision(saved)
        if not ours:
            # torch's __setstate__ adds 'differentiable' to the defaults; descend has no such
            # option, and loaded groups must keep exactly the keys they were saved with
            self.defaults.pop("differentiable", None)
        self.__dict__.setdefault("nonfinite", "ignore")
        self.__dict__.setdefault("_skipped", self.__dict__.pop("skipped_steps", 0))
        self.__dict__.setdefault("warn", True)
        for group in self.param_groups:
            self._fill_group(group)
        scalars = [e.name for e in self.state_spec.entries if e.shape is SCALAR and e.tensor]
        for entry in self.state.values():
            for key in scalars:
                value = entry.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    # torch < 1.12 saved step counts as numbers; torch converts them on load, so do we
                    entry[key] = torch.tensor(float(value), dtype=torch.float32)

    def _fill_group(self, group: dict[str, Any]) -> None:
        """Give a group that was saved by torch.optim (or an older descend) every key."""
        if "decay" not in group:
            # torch's Adam(decoupled_weight_decay=True) and AdamW decay decoupled.
            group["decay"] = "decoupled" if group.get("decoupled_weight_decay") else self.defaults["decay"]
        for key, default in self.defaults.items():
            group.setdefault(key, default)
        if "base_lr" not in group:
            group["base_lr"] = scalar_value(group.get("initial_lr", group["lr"])) * float(group.get("lr_scale", 1.0))

    # --- state dicts -------------------------------------------------------------------

    @property
    def skipped_steps(self) -> int:
        """How many steps ``nonfinite="skip"`` skipped. A skip decided on the device (fused
        kernels) is counted there, and read only here."""
        counts = self.__dict__.get("_skipped_on_device")
        extra = sum(int(c.item()) for c in counts.values()) if counts else 0
        return int(self.__dict__.get("_skipped", 0)) + extra

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self.__dict__["_skipped"] = int(value)
        self.__dict__.pop("_skipped_on_device", None)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["skipped_steps"] = self.skipped_steps
        return sd

    #: the group options that say which kind of optimizer saved a state dict (checked by
    #: descend.checkpoint before loading, with the state against ``state_spec``).
    _group_keys: tuple[str, ...] = ()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, after :func:`descend.checkpoint.aligned_state_dict` has
        checked kinds, names, shapes and dtypes (a rejected state dict changes nothing)."""
        from descend.checkpoint import aligned_state_dict

        state_dict = aligned_state_dict(self, state_dict)
        skipped = state_dict.get("skipped_steps", 0)
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            self._fill_group(group)
        self.skipped_steps = int(skipped)

    # --- names -------------------------------------------------------------------------

    def param_name(self, param: Tensor) -> str | None:
        """The name a parameter was given (``named_parameters`` or :func:`descend.param_groups`)."""
        for group in self.param_groups:
            names = group.get("param_names")
            if names is None:
                continue
            for p, name in zip(group["params"], names, strict=False):
                if p is param:
                    return cast(str, name)
        return None

    def _describe_param(self, param: Tensor) -> str:
        name = self.param_name(param)
        if name is not None:
            return f"parameter {name!r}"
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p is param:
                    return f"parameter {pi} of group {gi} (shape {tuple(p.shape)})"
        return "a parameter"

    # --- the step ----------------------------------------------------------------------

    def _new_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        """The state of a parameter before its first step, from the state declaration."""
        return self.state_spec.new_state(param, group)

    def _init_group(self, group: dict[str, Any]) -> None:
        """Only while torch.compile traces a step: the state of the group's parameters before
        their first step, stored at once. Dynamo runs a method of this name eagerly at trace
        time (torch.optim's hook: torch/_dynamo/variables/optimizer.py) and guards on the state
        it made, so that a first step and the steps after it compile to one graph, not two.
        (An eager step makes new state in :meth:`_prepare` and stores it after the update.)"""
        state_of = self.state.get
        for p in group["params"]:
            if p.grad is not None and not state_of(p):
                state = self._new_state(p, group)
                if state:  # as torch.optim: no entry for a parameter that keeps no state
                    self.state[p] = state

    #: (device type, dtype) pairs on which torch's fused kernel of this optimizer is wrong
    _fused_broken: frozenset[tuple[str, torch.dtype]] = frozenset()

    def _check_state(self, param: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """Existing state must fit its parameter (entries, shapes, dtypes); else nothing may change."""
        self.state_spec.check(param, state, group, self._describe_param(param))

    def _prepare(self) -> list[GroupBatch]:
        flat = self._flat_storage()
        if flat is not None:
            return flat.prepare()
        if dispatch.compiling():  # before anything reads self.state: see _init_group
            for group in self.param_groups:
                self._validate(group, stepping=True)
                self._init_group(group)
        batches = []
        state_of = self.state.get
        # the state check has a bulk form (per state key, in C): per parameter it cost more than the rest
        # (not while torch.compile traces the step: dynamo traces neither its C-level maps nor
        # data_ptr; per parameter, each check is decided once, at trace time, and guarded)
        bulk = type(self)._check_state is RegularizedOptimizer._check_state and not dispatch.compiling()
        verified: dict[int, dispatch.Verified] = self.__dict__.get("_verified") or {}
        self._verified: dict[int, dispatch.Verified] = {}
        for group in self.param_groups:
            self._validate(group, stepping=True)
            batch = GroupBatch(group, terms=NO_TERMS)  # (a global: torch.compile traces no default_factory)
            params, grads, states = batch.params, batch.grads, batch.states
            for p in group["params"]:  # the hot loop of a step over many small tensors: keep it lean
                grad = p.grad
                if grad is None:
                    continue  # as in torch.optim: a parameter without gradient is not touched
                if grad.is_sparse and not self._sparse_grads:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients "
                        f"({self._describe_param(p)} has one); nothing was changed"
                    )
                state = state_of(p)
                if not state:
                    state = self._new_state(p, group)
                    batch.new[p] = state
                elif not bulk:
                    self._check_state(p, state, group)
                params.append(p)
                grads.append(grad)
                states.append(state)
            entry = verified.get(id(group))
            same_grads = (entry is not None and entry.grads is not None and len(grads) == len(entry.grads)
                          and not dispatch.compiling() and all(map(operator.is_, grads, map(_deref, entry.grads))))
            if same_grads:
                # the very gradient objects of a checked step (weakly held, so that zero_grad() frees
                # them): only a parameter's shape can have changed
                shapes = list(map(SHAPE, params))
                if shapes != entry.shapes:  # type: ignore[union-attr]
                    shapes = self._check_grads(params, grads)
            else:
                shapes = self._check_grads(params, grads) if params else []
            if bulk and params:
                values = list(itertools.chain.from_iterable(map(dict.values, states)))
                ptrs = list(map(Tensor.data_ptr, params))
                entry = verified.get(id(group))
                if entry is None or not entry.matches(params, ptrs, values) or entry.shapes != shapes:
                    if not self.state_spec.all_fit(params, states, group):
                        for p, state in zip(params, states):  # find it, and say what does not fit
                            if p not in batch.new:
                                self._check_state(p, state, group)
                    entry = dispatch.Verified(params, ptrs, values)
                    entry.shapes = shapes  # p.data = p.data[:2] keeps the pointer: the shape tells
                entry.current = params
                if not same_grads or entry.grads is None:
                    entry.grads = list(map(weakref.ref, grads))
                self._verified[id(group)] = entry
            if params:
                batch.implementation = self._implementation(batch)
            batches.append(batch)
        return batches

    def _check_grads(self, params: list[Tensor], grads: list[Tensor]) -> list[torch.Size]:
        """Raise ValueError unless each gradient has its parameter's shape, dtype and device
        (torch's fused kernels would read past the end of a short gradient); returns the
        parameters' shapes. In bulk, with C-level maps: this runs at every step."""
        compiling = dispatch.compiling()  # dynamo traces no attrgetter: then per parameter, at trace time
        shapes = [p.shape for p in params] if compiling else list(map(SHAPE, params))
        if not compiling and (list(map(SHAPE, grads)) == shapes and list(map(DTYPE, grads)) == list(map(DTYPE, params))
                and ((all(map(IS_CPU, params)) and all(map(IS_CPU, grads)))
                     or all(p.device == g.device for p, g in zip(params, grads)))):
            return shapes
        for p, g in zip(params, grads):
            for what, mine, its in (("shape", tuple(g.shape), tuple(p.shape)), ("dtype", g.dtype, p.dtype),
                                    ("device", g.device, p.device)):
                if mine != its:
                    raise ValueError(f"the gradient of {self._describe_param(p)} has {what} {mine}, but the "
                                     f"parameter has {what} {its}; nothing was changed")
        return shapes

    def _nonfinite_flags(self, batches: list[GroupBatch]) -> list[Tensor]:
        """Device flags, 1 where some gradient of this step holds a NaN or an infinity
        (:func:`descend.tensors.nonfinite_flags`); sharded (DTensor) gradients are checked over
        all shards, so that every rank agrees, with one collective for all of them."""
        grads = [g for b in batches for g in b.grads]
        if set(map(type, grads)) <= _PLAIN_TENSORS:
            return list(nonfinite_flags(grads).values())
        flags = list(nonfinite_flags(g for g in grads if not is_dtensor(g)).values())
        sharded = sharded_nonfinite([g for g in grads if is_dtensor(g)])
        return flags + ([sharded] if sharded is not None else [])

    def _grads_are_finite(self, batches: list[GroupBatch]) -> bool:
        """Whether every gradient is finite: one host read of the device flags."""
        flags = self._nonfinite_flags(batches)
        if not flags:
            return True
        return not bool(torch.stack([f.to("cpu", non_blocking=False) for f in flags]).any())

    def _kernels_take_found_inf(self, batches: list[GroupBatch]) -> bool:
        """Whether every batch of this step runs a fused kernel that unscales and skips on the
        device, with nothing of the decay plan left outside it (a shrink, a coupled term or a
        prox applied around the kernel would still happen on a skipped step)."""
        stepped = [b for b in batches if b.params]
        if not (self._amp_fused and stepped) or any(b.implementation != "fused" for b in stepped):
            return False
        absorbs = self._absorbs.get("fused", regularization.NOTHING)
        return all(regularization.plan(b.group, b.group["lr"]).applied_by(absorbs, maximize=b.group["maximize"])
                   for b in stepped)

    #: whether ``nonfinite="skip"`` decides on the device even where every parameter is on the
    #: CPU (the tests set it, to run the accelerators' path here)
    _skip_on_device_on_cpu: bool = False

    def _device_decides(self, batches: list[GroupBatch]) -> bool:
        """Whether the skip is decided on the device: off the CPU, where a host read waits for
        the device; on the CPU a read is free and the host's decision launches fewer kernels."""
        return self._skip_on_device_on_cpu or not all(all(map(IS_CPU, b.params)) for b in batches)

    def _count_nonfinite_on_device(self, batches: list[GroupBatch], found_inf: Tensor | None) -> Tensor:
        """``nonfinite="skip"`` without a host read: a device flag, 1 where some gradient
        holds a NaN or an infinity, merged with GradScaler's and counted on the device."""
        flags = self._nonfinite_flags(batches)
        flag = flags[0] if flags else torch.zeros((), device=batches[0].params[0].device)
        for f in flags[1:]:
            flag = torch.maximum(flag, f.to(flag.device))
        # a step GradScaler skips (its scaled loss overflowed) is its skip, not the guard's
        counted = flag if found_inf is None else flag * (found_inf.to(flag.device) == 0)
        counts: dict[torch.device, Tensor] = self.__dict__.setdefault("_skipped_on_device", {})
        counts[flag.device] = counts[flag.device] + counted if flag.device in counts else counted.clone()
        if found_inf is not None:
            flag = torch.maximum(flag, found_inf.to(flag.device).float())
        return flag

    def _unscale(self, batches: list[GroupBatch], grad_scale: Tensor) -> None:
        """GradScaler's scale taken out of the gradients, in place, for a path whose kernel does
        not take it: by the float32 inverse of the scale, as ``GradScaler.unscale_`` would."""
        inverse = grad_scale.double().reciprocal().float()
        for grads in by_device_and_dtype([g for b in batches for g in b.grads]):
            torch._foreach_mul_(grads, inverse.to(grads[0].device))

    def _first_nonfinite(self, batches: list[GroupBatch]) -> Tensor:
        for b in batches:
            for p, g in zip(b.params, b.grads, strict=True):
                if not all_finite(g):
                    return p
        raise AssertionError("no non-finite gradient")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one optimization step.

        Args:
            closure: optional; re-evaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        batches = self._prepare()
        flat = self._flat_storage()
        grad_scale, found_inf = self.__dict__.get("grad_scale"), self.__dict__.get("found_inf")
        scaled = grad_scale is not None or found_inf is not None  # GradScaler's step
        fused_skips = (scaled or self.nonfinite == "skip") and self._kernels_take_found_inf(batches)
        # (a first step that is skipped must make no state: that takes the host's decision; and
        # on the CPU a read costs no sync, while the device's decision costs kernels per tensor)
        skip_on_device = self.nonfinite == "skip" and fused_skips and not any(
            b.new or any(run.new for run in getattr(b, "runs", ())) for b in batches) and (
            scaled or self._device_decides(batches))
        scaler_on_host = scaled and not (fused_skips and (self.nonfinite == "ignore" or skip_on_device))
        if scaler_on_host and found_inf is not None and bool(found_inf.item()):
            return loss  # GradScaler's skip (the scaled loss overflowed), not the guard's
        if skip_on_device:
            found_inf = self._count_nonfinite_on_device(batches, found_inf)
        elif self.nonfinite != "ignore" and not self._grads_are_finite(batches):
            if self.nonfinite == "raise":
                first = flat.first_nonfinite(batches) if flat is not None else self._first_nonfinite(batches)
                culprit = self._describe_param(first)
                raise FloatingPointError(
                    f"non-finite gradient in {culprit}; nothing was changed (nonfinite='raise')")
            self.skipped_steps += 1
            return loss
        if scaler_on_host:
            if grad_scale is not None:
                self._unscale(batches, grad_scale)
        elif fused_skips and (scaled or skip_on_device):
            for batch in batches:
                batch.grad_scale, batch.found_inf = grad_scale, found_inf
        for batch in batches:
            if batch.params:
                self._run_update(batch)
            for p, state in batch.new.items():
                if state:  # as torch.optim: no entry for a parameter that keeps no state
                    self.state[p] = state
        if flat is not None:
            flat.commit(batches)
        return loss

    def _run_update(self, batch: GroupBatch) -> None:
        """One group's batch through the pipeline: regularize before, the rule, regularize after."""
        group, implementation = batch.group, batch.implementation
        # while torch.compile traces the step a tensor lr stays a tensor on every path: read as a
        # float it would break the graph, and recompile it at every new lr
        keep = implementation in self._tensor_lr_paths or dispatch.compiling() or bool(group.get("capturable"))
        lr = group["lr"] if keep else scalar_value(group["lr"])
        if isinstance(lr, Tensor) and lr.dim() != 0:
            lr = lr.reshape(())  # a 1-element tensor lr as a scalar (same value, dtype and device)
        plan = regularization.plan(group, lr)
        if "_precision" in self.__dict__ and self._precision.active:
            rest = self._stored_precision_step(batch, lr, plan)
            if rest is None:
                return
            batch = rest
        # low precision: θ, g and the state as working tensors (float32 for 16-bit θ), written
        # back rounded or quantized after the whole pipeline, decay and prox included
        working = self._precision.begin(batch) if "_precision" in self.__dict__ else None
        self._inspect(batch)
        batch.grads, batch.terms = regularization.regularize_before(
            batch.params, batch.grads, plan, maximize=group["maximize"],
            absorbs=self._absorbs.get(implementation, regularization.NOTHING), foreach=implementation != "single")
        dispatch.run_serialized(self._update, batch)
        regularization.regularize_after(batch.params, plan)
        if working is not None:
            working.commit()

    def _stored_precision_step(self, batch: GroupBatch, lr: float | Tensor,
                               plan: regularization.DecayPlan) -> GroupBatch | None:
        """Low precision: step what a rule can step on the stored tensors directly (one compiled
        pass, :mod:`descend.precision_fused`); return the batch of the rest (None: nothing left)."""
        return batch

    def _inspect(self, batch: GroupBatch) -> None:
        """A look at θ before "regularize before" shrinks it: a rule that needs θ_{t-1}
        itself (Adafactor's step size is relative to its RMS) fills ``batch.inspected``."""

    # --- flat storage (descend.flat) ---------------------------------------------------

    def _use_flat_storage(self) -> None:
        """Keep parameters, gradients and state in flat buffers (``flat=True``)."""
        from descend.flat import FlatStorage

        self._flat = FlatStorage(self)

    def _flat_storage(self) -> FlatStorage | None:
        return cast("FlatStorage | None", self.__dict__.get("_flat"))

    @property
    def flat(self) -> bool:
        """Whether parameters, gradients and state live in flat buffers (:mod:`descend.flat`)."""
        return self._flat_storage() is not None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch's; with flat storage, ``set_to_none=False`` zeroes each gradient buffer at once."""
        flat = self._flat_storage()
        if flat is None or set_to_none:
            super().zero_grad(set_to_none)
        else:
            flat.zero_grad()

    def _update(self, batch: GroupBatch, implementation: str) -> None:
        """The update rule over one batch, after "regularize before" (subclasses override)."""
        raise NotImplementedError

    # --- which implementation ----------------------------------------------------------

    def _implementation(self, batch: GroupBatch) -> str:
        """The implementation that steps ``batch`` (:func:`descend.dispatch.choose`)."""
        return dispatch.choose(batch, fast_paths=self._fast_paths, fused_broken=self._fused_broken,
                               kind=type(self).__name__, fused_dtensor=self._fused_dtensor,
                               verified=self.__dict__.get("_verified", {}).get(id(batch.group)))
