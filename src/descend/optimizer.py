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

from descend import dispatch, regularization
from descend.regularization import Absorbs, KernelTerms
from descend.state import SCALAR, StateSpec
from descend.tensors import (
    DTYPE,
    IS_CPU,
    SHAPE,
    all_finite,
    by_device_and_dtype,
    is_dtensor,
    norm_dtype,
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
    #: GradScaler's contract: it sets ``grad_scale`` and ``found_inf`` on the optimizer and calls
    #: ``step()`` without unscaling or reading ``found_inf`` itself. A fused kernel that takes
    #: them does both on the device; every other path unscales the gradients in place and skips
    #: the step on one host read, as GradScaler would (:meth:`_unscale`).
    _step_supports_amp_scaling: bool = True

    def __init__(self, params: Any, defaults: dict[str, Any], *, nonfinite: str = "ignore",
                 warn: bool = True, flat: bool = False) -> None:
        if nonfinite not in NONFINITE_MODES:
            raise invalid("nonfinite", nonfinite, ", ".join(repr(m) for m in NONFINITE_MODES))
        check_flag("warn", warn)
        check_flag("flat", flat)
        self.nonfinite = nonfinite
        #: whether implausible decay settings warn (at construction and in add_param_group)
        self.warn = warn
        self.skipped_steps = 0
        self._validate(defaults)
        super().__init__(params, defaults)
        if flat:
            self._use_flat_storage()

    # --- groups and validation ---------------------------------------------------------

    def _check_group(self, group: dict[str, Any]) -> None:
        """Raise ValueError for an invalid option of this optimizer (subclasses extend)."""

    def _validate(self, group: dict[str, Any]) -> None:
        lr = group["lr"]
        if not isinstance(lr, (float, int, Tensor)) or isinstance(lr, bool):
            # a Fraction or a Decimal passes as a real number but not into torch's kernels
            raise invalid("lr", lr, "a float, an int or a 1-element tensor")
        # a tensor lr's value cannot be read while torch.compile traces the step (a graph break,
        # and a recompile at every new value): there, as torch.optim does at every step, it is not checked
        traced_lr = isinstance(lr, Tensor) and dispatch.compiling()
        if not traced_lr:
            check_number("lr", lr, low=0)
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise invalid("lr", lr, "a float or a 1-element tensor")
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

    def __setstate__(self, state: dict[str, Any]) -> None:
        ours = "differentiable" in state.get("defaults", {})
        super().__setstate__(state)
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
                self._validate(group)
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
            self._validate(group)
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

    def _grads_are_finite(self, batches: list[GroupBatch]) -> bool:
        grads = [g for b in batches for g in b.grads]
        # sharded (DTensor) gradients are checked over all shards, so that every rank agrees
        # (one collective for all of them, which every rank runs)
        sharded_flag = sharded_nonfinite([g for g in grads if is_dtensor(g)])
        # (an empty tensor is finite, and has no infinity norm: _foreach_norm would raise)
        plain = [g for g in grads if g.numel() and not is_dtensor(g)]
        # One read of each gradient: a 2-norm is finite only if every entry is (NaN and ±inf
        # propagate), and torch's CPU kernel for it is several times faster than the inf-norm's.
        # A non-finite norm may also be the overflow of huge finite entries (|g| > 1e19 in
        # float32; float32 accumulation covers float16), so that answer is confirmed entry by entry.
        norms = [torch.stack(torch._foreach_norm(gs, 2, dtype=norm_dtype(gs[0]))).isfinite().all()
                 for gs in by_device_and_dtype(plain)]
        finite = not norms or bool(torch.stack([f.cpu() for f in norms]).all())
        if not finite:
            finite = all(all_finite(g) for g in plain)
        return (sharded_flag is None or not bool(sharded_flag.item())) and finite

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

    def _count_nonfinite_on_device(self, batches: list[GroupBatch], found_inf: Tensor | None) -> Tensor:
        """``nonfinite="skip"`` without a host read: a device flag, 1 where some gradient
        holds a NaN or an infinity (its infinity norm is then NaN or inf: max propagates
        NaN and never overflows), merged with GradScaler's and counted on the device."""
        sharded = [g for b in batches for g in b.grads if is_dtensor(g)]
        grads = [g for b in batches for g in b.grads if g.numel() and not is_dtensor(g)]
        flags = [torch.stack(torch._foreach_norm(gs, float("inf"), dtype=norm_dtype(gs[0]))).isfinite().all()
                 .logical_not().float() for gs in by_device_and_dtype(grads)]
        sharded_flag = sharded_nonfinite(sharded)
        if sharded_flag is not None:
            flags.append(sharded_flag)
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
        # (a first step that is skipped must make no state: that takes the host's decision)
        skip_on_device = self.nonfinite == "skip" and fused_skips and not any(
            b.new or any(run.new for run in getattr(b, "runs", ())) for b in batches)
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
        keep = implementation in self._tensor_lr_paths or dispatch.compiling()
        lr = group["lr"] if keep else scalar_value(group["lr"])
        if isinstance(lr, Tensor) and lr.dim() != 0:
            lr = lr.reshape(())  # a 1-element tensor lr as a scalar (same value, dtype and device)
        plan = regularization.plan(group, lr)
        self._inspect(batch)
        batch.grads, batch.terms = regularization.regularize_before(
            batch.params, batch.grads, plan, maximize=group["maximize"],
            absorbs=self._absorbs.get(implementation, regularization.NOTHING), foreach=implementation != "single")
        dispatch.run_serialized(self._update, batch)
        regularization.regularize_after(batch.params, plan)

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
                               kind=type(self).__name__,
                               verified=self.__dict__.get("_verified", {}).get(id(batch.group)))
