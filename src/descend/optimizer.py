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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from descend import dispatch, regularization
from descend.regularization import Absorbs, KernelTerms
from descend.state import StateSpec
from descend.tensors import all_finite, by_device_and_dtype, is_dtensor, norm_dtype
from descend.validation import check_flag, check_number, invalid, scalar_value

if TYPE_CHECKING:
    from descend.flat import FlatStorage

NONFINITE_MODES = ("ignore", "skip", "raise")
IMPLEMENTATIONS = dispatch.IMPLEMENTATIONS


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

    def state_list(self, key: str) -> list[Any]:
        return [s.get(key) for s in self.states]

    def part(self, chosen: list[bool]) -> GroupBatch:
        """The batch of the chosen parameters only (same group, implementation and terms)."""
        pick = list(itertools.compress(range(len(self.params)), chosen))
        return GroupBatch(self.group, [self.params[i] for i in pick], [self.grads[i] for i in pick],
                          [self.states[i] for i in pick], implementation=self.implementation, terms=self.terms,
                          inspected=[self.inspected[i] for i in pick] if self.inspected else [])


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

    def __init__(self, params: Any, defaults: dict[str, Any], *, nonfinite: str = "ignore") -> None:
        if nonfinite not in NONFINITE_MODES:
            raise invalid("nonfinite", nonfinite, ", ".join(repr(m) for m in NONFINITE_MODES))
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        self._validate(defaults)
        super().__init__(params, defaults)

    # --- groups and validation ---------------------------------------------------------

    def _check_group(self, group: dict[str, Any]) -> None:
        """Raise ValueError for an invalid option of this optimizer (subclasses extend)."""

    def _validate(self, group: dict[str, Any]) -> None:
        check_number("lr", group["lr"], low=0)
        if isinstance(group["lr"], Tensor) and group["lr"].numel() != 1:
            raise invalid("lr", group["lr"], "a float or a 1-element tensor")
        regularization.check_regularization(group)
        for flag in ("maximize", "nesterov", "amsgrad"):
            if flag in group:
                check_flag(flag, group[flag])
        for flag in ("foreach", "fused"):
            check_flag(flag, group.get(flag), optional=True)
        if group.get("foreach") and group.get("fused"):
            raise ValueError("Invalid foreach=True with fused=True (allowed: at most one of them)")
        self._check_group(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        options = {k: v for k, v in param_group.items() if k not in ("params", "param_names")}
        self._validate({**self.defaults, **options})
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        # lr₀ of "independent" decay: fixed here, never touched by LR schedulers.
        group.setdefault("base_lr", scalar_value(group["lr"]))

    def __setstate__(self, state: dict[str, Any]) -> None:
        ours = "differentiable" in state.get("defaults", {})
        super().__setstate__(state)
        if not ours:
            # torch's __setstate__ adds 'differentiable' to the defaults; descend has no such
            # option, and loaded groups must keep exactly the keys they were saved with
            self.defaults.pop("differentiable", None)
        self.__dict__.setdefault("nonfinite", "ignore")
        self.__dict__.setdefault("skipped_steps", 0)
        for group in self.param_groups:
            self._fill_group(group)

    def _fill_group(self, group: dict[str, Any]) -> None:
        """Give a group that was saved by torch.optim (or an older descend) every key."""
        if "decay" not in group:
            # torch's Adam(decoupled_weight_decay=True) and AdamW decay decoupled.
            group["decay"] = "decoupled" if group.get("decoupled_weight_decay") else self.defaults["decay"]
        for key, default in self.defaults.items():
            group.setdefault(key, default)
        if "base_lr" not in group:
            group["base_lr"] = scalar_value(group.get("initial_lr", group["lr"]))

    # --- state dicts -------------------------------------------------------------------

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

    #: (device type, dtype) pairs on which torch's fused kernel of this optimizer is wrong
    _fused_broken: frozenset[tuple[str, torch.dtype]] = frozenset()

    def _check_state(self, param: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """Existing state must fit its parameter (entries, shapes, dtypes); else nothing may change."""
        self.state_spec.check(param, state, group, self._describe_param(param))

    def _prepare(self) -> list[GroupBatch]:
        flat = self._flat_storage()
        if flat is not None:
            return flat.prepare()
        batches = []
        state_of = self.state.get
        # the state check has a bulk form (per state key, in C): per parameter it cost more than the rest
        bulk = type(self)._check_state is RegularizedOptimizer._check_state
        verified: dict[int, dispatch.Verified] = self.__dict__.get("_verified") or {}
        self._verified: dict[int, dispatch.Verified] = {}
        for group in self.param_groups:
            self._validate(group)
            batch = GroupBatch(group)
            params, grads, states = batch.params, batch.grads, batch.states
            for p in group["params"]:  # the hot loop of a step over many small tensors: keep it lean
                grad = p.grad
                if grad is None:
                    continue  # as in torch.optim: a parameter without gradient is not touched
                if grad.is_sparse:
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
            if bulk and params:
                values = list(itertools.chain.from_iterable(map(dict.values, states)))
                ptrs = list(map(Tensor.data_ptr, params))
                entry = verified.get(id(group))
                if entry is None or not entry.matches(params, ptrs, values):
                    if not self.state_spec.all_fit(params, states, group):
                        for p, state in zip(params, states):  # find it, and say what does not fit
                            if p not in batch.new:
                                self._check_state(p, state, group)
                    entry = dispatch.Verified(params, ptrs, values)
                entry.current = params
                self._verified[id(group)] = entry
            if params:
                batch.implementation = self._implementation(batch)
            batches.append(batch)
        return batches

    def _grads_are_finite(self, batches: list[GroupBatch]) -> bool:
        grads = [g for b in batches for g in b.grads]
        # a sharded (DTensor) gradient is checked over all shards, so that every rank agrees;
        # all of them, in order, since each check is a collective every rank must run
        sharded = [all_finite(g) for g in grads if is_dtensor(g)]
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
        return all(sharded) and finite

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
        if self.nonfinite != "ignore" and not self._grads_are_finite(batches):
            if self.nonfinite == "raise":
                first = flat.first_nonfinite(batches) if flat is not None else self._first_nonfinite(batches)
                culprit = self._describe_param(first)
                raise FloatingPointError(
                    f"non-finite gradient in {culprit}; nothing was changed (nonfinite='raise')")
            self.skipped_steps += 1
            return loss
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
        lr = group["lr"] if implementation in self._tensor_lr_paths else scalar_value(group["lr"])
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
