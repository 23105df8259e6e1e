"""Flat storage: parameters, gradients and optimizer state in a few contiguous buffers.

An optimizer step over many small tensors is bound by per-tensor overhead, not by memory:
torch's fused AdamW on 2,000 tensors of 1,000 elements takes many times the bandwidth
floor. With ``flat=True`` (``descend.SGD``, ``Adam``, ``AdamW``) the optimizer keeps, for
each device and dtype, one buffer of parameters, one of gradients and one per state
tensor (``exp_avg``, ``momentum_buffer``, ...), and one vector per scalar state (``step``).
The parameters of a group are contiguous in them, so the existing update functions
(fused, foreach or the reference) run on one tensor per group, device and dtype instead
of one per parameter. Nothing here knows an update rule: the rule sees *runs*
(contiguous slices standing for several parameters) exactly as it sees parameters.

What stays as it was:

- every parameter is the same ``nn.Parameter`` object, now sharing storage with the
  flat buffer (``p.data`` is a view), so models, autograd, ``model.state_dict()`` and
  checkpoints use it as before;
- ``optimizer.state[p]`` holds per-parameter tensors of torch's format (views into the
  buffers), so ``optimizer.state_dict()`` loads into non-flat descend optimizers and
  torch.optim, and theirs load into a flat one.

Defined behaviour (each is tested in ``tests/test_flat.py``):

- **gradients**: after a step ``p.grad`` is a view into the gradient buffer, so a
  backward pass after ``zero_grad(set_to_none=False)`` accumulates into it in place and
  the next step reads it with no copy; ``zero_grad(set_to_none=False)`` zeroes the whole
  buffer at once. ``zero_grad()`` (``set_to_none=True``, torch's default) and
  ``model.zero_grad()`` set gradients to None as in torch: the next backward creates new
  tensors, which the next step copies into the buffer (one more read and write of the
  gradients) before pointing ``p.grad`` at its view again. A parameter whose grad is None
  is not touched, as in torch.optim.
- **replacing** ``p.data`` (``p.data = t``, ``model.to(dtype)``): detected at the next
  step, which copies the new values into the buffers (moving the parameter to the buffer
  of its new device and dtype, its state converted with it) and points ``p.data`` at its
  view again. In-place changes (``p.copy_(t)``, ``model.load_state_dict``) need nothing.
- **add_param_group**, editing a group's ``params`` list and ``load_state_dict``: the
  next step rebuilds the buffers (values are copied, never changed), so every parameter
  of every group is flat again.
- **state**: replacing a state tensor by hand (``optimizer.state[p]["exp_avg"] = t``) is
  not seen until the next rebuild; change state in place, or through ``load_state_dict``.
- parameters whose step counts differ (one had no gradient at some step) are stepped in
  separate runs, so the result never depends on the layout; in the worst case (every
  neighbour different) the step is as slow as the non-flat one.

Costs: a parameter's storage is shared with its neighbours, so ``torch.save(p)`` of a
single parameter writes the whole buffer (saving ``model.state_dict()`` does not: the
storage is written once). Parameters become contiguous (a ``channels_last`` weight
loses that layout), and two parameters that shared storage before no longer do.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from descend.optimizer import GroupBatch

if TYPE_CHECKING:
    from descend.optimizer import RegularizedOptimizer

__all__ = ["FlatStorage", "check_flat_params"]

_PLAIN = (Tensor, torch.nn.Parameter)
_GRAD = operator.attrgetter("grad")
_ELEMENT, _SCALAR, _OTHER = "element", "scalar", "other"


def check_flat_params(optimizer: RegularizedOptimizer) -> None:
    """Raise ValueError for a rule or a parameter that flat storage cannot hold."""
    if not optimizer.state_spec.flattenable():
        odd = [e.name for e in optimizer.state_spec.entries if optimizer.state_spec.flat_kind(e.name) is None]
        raise ValueError(f"Invalid flat=True for {type(optimizer).__name__}, whose state {odd} is neither one value "
                         f"per element nor one per parameter (allowed: flat=True with element-wise rules)")
    for group in optimizer.param_groups:
        for p in group["params"]:
            if type(p) not in _PLAIN or p.layout != torch.strided or p.is_quantized:
                raise ValueError(
                    f"Invalid flat=True for {optimizer._describe_param(p)} of type {type(p).__name__} and layout "
                    f"{p.layout} (allowed: flat=True only with dense tensors or nn.Parameter)")


#: every parameter's place in a buffer starts at a multiple of this many elements
ALIGN = 64


class _Bucket:
    """The buffers of one device and dtype: parameter ``params[i]`` owns the slot
    ``offsets[i]:offsets[i + 1]`` of ``data``, ``grad`` and every buffer in ``state`` (its
    elements first, then zeros up to the next multiple of :data:`ALIGN`), and element ``i``
    of every vector in ``scalars``.

    Why the padding: torch's fused CPU kernels split a tensor into chunks of whole cache lines
    and run the SIMD form of the update on each, except on the tail of the tensor, which takes
    the scalar form, whose rounding differs (fused multiply-adds). Without padding, which of a
    parameter's elements fell in a tail depended on its neighbours, so results depended on the
    order in which parameters were listed. With every slot a multiple of 64 elements (a whole
    number of cache lines and vectors for every dtype) a run of slots has no tail: each element
    takes the same path wherever it lies. The zeros stay zero under every rule (zero gradient,
    zero state) and every decay mode. The price: on the fused path, flat and non-flat storage
    agree to rounding rather than bit for bit, since the elements that a lone tensor's kernel
    computes in its scalar tail are computed by the SIMD body here (foreach and the reference
    use no fused multiply-adds and stay bit-identical)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, params: list[Tensor]) -> None:
        self.device, self.dtype, self.params = device, dtype, params
        self.offsets = [0]
        for p in params:
            self.offsets.append(self.offsets[-1] + -(-p.numel() // ALIGN) * ALIGN)
        total = self.offsets[-1]
        self.data = torch.zeros(total, dtype=dtype, device=device)
        self.grad = torch.zeros(total, dtype=dtype, device=device)
        self.state: dict[str, Tensor] = {}
        self.scalars: dict[str, Tensor] = {}
        self.other: set[str] = set()  # state keys that are neither (kept in the per-parameter dicts)
        self.keys: list[tuple[str, ...]] = [() for _ in params]  # which state keys each parameter has
        self.data_views = [self.element_view(self.data, i) for i in range(len(params))]
        self.grad_views = [self.element_view(self.grad, i) for i in range(len(params))]
        self.ptrs: list[int] = []

    def element_view(self, buffer: Tensor, i: int) -> Tensor:
        start = self.offsets[i]
        return buffer[start:start + self.params[i].numel()].view(self.params[i].shape)

    def state_buffer(self, key: str, dtype: torch.dtype) -> Tensor:
        if key not in self.state:
            self.state[key] = torch.zeros(self.offsets[-1], dtype=dtype, device=self.device)
        return self.state[key]

    def scalar_buffer(self, key: str, like: Tensor) -> Tensor:
        if key not in self.scalars:
            self.scalars[key] = torch.zeros(len(self.params), dtype=like.dtype, device=like.device)
        return self.scalars[key]


@dataclass
class _Segment:
    """The parameters of one group that live in one bucket: ``bucket.params[lo:hi]``."""

    bucket: _Bucket
    lo: int
    hi: int
    params: list[Tensor]
    grad_views: list[Tensor]
    #: the last step stepped every parameter of the segment as one run, so their scalar state
    #: (step counts) is still equal and need not be read again: on a GPU a read is a sync
    uniform: bool = False


@dataclass
class _Run:
    """Consecutive parameters of a segment stepped as one tensor: all have a gradient and
    the same state keys and scalar state (step count)."""

    bucket: _Bucket
    lo: int
    hi: int
    state: dict[str, Any]  # what the update rule sees as this "parameter's" state
    given: dict[str, Tensor] = field(default_factory=dict)  # buffer views put into ``state``
    new: bool = False  # the parameters had no state before this step


@dataclass
class FlatBatch(GroupBatch):
    """A :class:`GroupBatch` whose params, grads and states are runs of flat buffers."""

    runs: list[_Run] = field(default_factory=list)


def _strided(t: Tensor | None) -> bool:
    return t is not None and t.layout == torch.strided


def _same(a: Any, b: Any) -> bool:
    """Whether two non-tensor state values may share a run."""
    if isinstance(a, (int, float, bool, str, type(None))) and type(a) is type(b):
        return bool(a == b)
    return a is b


class FlatStorage:
    """The flat buffers of one optimizer, and the two halves of a step over them:
    :meth:`prepare` (runs for the update rule; nothing observable changes) and
    :meth:`commit` (new state written back into the buffers)."""

    def __init__(self, optimizer: RegularizedOptimizer) -> None:
        check_flat_params(optimizer)
        self.optimizer = optimizer
        self.buckets: list[_Bucket] = []
        self.segments: list[list[_Segment]] = []
        self.kinds: dict[str, str] = {}  # state key -> _ELEMENT / _SCALAR, as learned from the rule
        self._groups: list[dict[str, Any]] = []
        self._group_params: list[list[Tensor]] = []
        self._state: Any = None
        self._dirty = True
        optimizer.register_load_state_dict_post_hook(FlatStorage._loaded)
        self.rebuild()

    @staticmethod
    def _loaded(optimizer: Any) -> None:
        flat = getattr(optimizer, "_flat", None)
        if flat is not None:
            flat._dirty = True

    # --- layout -------------------------------------------------------------------------

    def up_to_date(self) -> bool:
        """False after add_param_group, a change to a group's params, load_state_dict or a
        replaced ``p.data``; all checked in O(#params) pointer comparisons."""
        opt = self.optimizer
        if self._dirty or opt.state is not self._state or len(opt.param_groups) != len(self._groups):
            return False
        for group, known, known_params in zip(opt.param_groups, self._groups, self._group_params):
            params = group["params"]
            if group is not known or len(params) != len(known_params) or not all(
                    map(operator.is_, params, known_params)):
                return False
        return all(list(map(Tensor.data_ptr, b.params)) == b.ptrs for b in self.buckets)

    def _kind(self, key: str, values: list[tuple[Tensor, Any]]) -> str:
        """Where a state key lives: a buffer (one value per element), a vector (one per
        parameter) or the per-parameter dicts (anything else, e.g. a float step)."""
        if not all(isinstance(v, Tensor) and v.layout == torch.strided for _, v in values):
            return _OTHER
        scalar = all(v.dim() == 0 for _, v in values)
        element = all(v.shape == p.shape for p, v in values)
        known = self.kinds.get(key)
        if known is None:  # a key the update rule has not told us about: judge by shapes
            known = _SCALAR if scalar and any(p.dim() > 0 for p, _ in values) else _ELEMENT
        if known == _SCALAR:
            return _SCALAR if scalar else _OTHER
        return _ELEMENT if element else _OTHER

    def _probe_kinds(self) -> None:
        """Which declared state entries are per element and which per parameter (:mod:`descend.state`)."""
        spec = self.optimizer.state_spec
        for key in spec.keys:
            kind = spec.flat_kind(key)
            if kind is not None:
                self.kinds.setdefault(key, _ELEMENT if kind == "element" else _SCALAR)

    def rebuild(self) -> None:
        """Copy every parameter, gradient and state tensor into new buffers and point the
        parameters, their gradients and their state at views of them. Values never change;
        a state tensor that does not fit its parameter raises before anything is touched."""
        opt = self.optimizer
        check_flat_params(opt)
        self._probe_kinds()
        by_key: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for group in opt.param_groups:
            for p in group["params"]:
                state = opt.state.get(p)
                if state:
                    opt._check_state(p, state, group)
                by_key.setdefault((p.device, p.dtype), []).append(p)
        buckets = [_Bucket(device, dtype, params) for (device, dtype), params in by_key.items()]
        new_states: list[tuple[dict[str, Any], dict[str, Any]]] = []
        for b in buckets:
            if b.params:
                torch._foreach_copy_(b.data_views, [p.detach() for p in b.params])
            for i, p in enumerate(b.params):
                grad = p.grad
                if grad is not None and _strided(grad):
                    b.grad_views[i].copy_(grad)
            states = [opt.state.get(p) or {} for p in b.params]
            keys = sorted({k for s in states for k in s})
            kinds = {k: self._kind(k, [(p, s[k]) for p, s in zip(b.params, states) if k in s]) for k in keys}
            views: list[dict[str, Any]] = [{} for _ in b.params]
            for key, kind in kinds.items():
                holders = [i for i, s in enumerate(states) if key in s]
                if kind == _ELEMENT:
                    buf = b.state_buffer(key, states[holders[0]][key].dtype)
                    for i in holders:
                        views[i][key] = b.element_view(buf, i)
                        views[i][key].copy_(states[i][key])
                elif kind == _SCALAR:
                    buf = b.scalar_buffer(key, states[holders[0]][key])
                    for i in holders:
                        views[i][key] = buf[i]
                        views[i][key].copy_(states[i][key])
                else:
                    b.other.add(key)
            for i, state in enumerate(states):
                b.keys[i] = tuple(sorted(state))
                if state:
                    new_states.append((state, views[i]))
        # Everything is copied: now point parameters, gradients and state at the buffers.
        for b in buckets:
            for p, data, grad in zip(b.params, b.data_views, b.grad_views):
                p.data = data
                if _strided(p.grad):
                    p.grad = grad
            b.ptrs = list(map(Tensor.data_ptr, b.params))
        for state, state_views in new_states:
            state.update(state_views)
        self.buckets = buckets
        where = {id(p): (b, i) for b in buckets for i, p in enumerate(b.params)}
        self.segments = []
        for group in opt.param_groups:
            segments: list[_Segment] = []
            for p in group["params"]:
                b, i = where[id(p)]
                if segments and segments[-1].bucket is b and segments[-1].hi == i:
                    segments[-1].hi = i + 1
                else:
                    segments.append(_Segment(b, i, i + 1, [], []))
            for s in segments:
                s.params, s.grad_views = s.bucket.params[s.lo:s.hi], s.bucket.grad_views[s.lo:s.hi]
            self.segments.append(segments)
        self._groups = list(opt.param_groups)
        self._group_params = [list(g["params"]) for g in opt.param_groups]
        self._state = opt.state
        self._dirty = False

    # --- the step -----------------------------------------------------------------------

    def prepare(self) -> list[GroupBatch]:
        """The step's batches, one per group, each holding runs. Gradients that are not
        views of the buffer (new after ``zero_grad()``) are copied into it first; nothing
        else changes, and invalid input raises before that copy."""
        opt = self.optimizer
        if not self.up_to_date():
            self.rebuild()
        adopt: list[tuple[Tensor, Tensor, Tensor]] = []
        batches: list[GroupBatch] = []
        plans: list[tuple[FlatBatch, _Segment, list[bool] | None]] = []
        for group, segments in zip(opt.param_groups, self.segments):
            opt._validate(group, stepping=True)
            batch = FlatBatch(group)
            batches.append(batch)
            for seg in segments:
                grads = list(map(_GRAD, seg.params))
                if all(map(operator.is_, grads, seg.grad_views)):
                    plans.append((batch, seg, None))  # every gradient is in the buffer already
                    continue
                present: list[bool] = []
                for p, g, view in zip(seg.params, grads, seg.grad_views):
                    present.append(g is not None)
                    if g is None or g is view:
                        continue
                    if g.is_sparse:
                        raise RuntimeError(
                            f"{type(opt).__name__} does not support sparse gradients "
                            f"({opt._describe_param(p)} has one); nothing was changed")
                    adopt.append((p, g, view))
                plans.append((batch, seg, present))
        if adopt:
            # in bulk, before any copy: a copy into the buffer would broadcast or cast a misfit
            opt._check_grads([p for p, _, _ in adopt], [g for _, g, _ in adopt])
            torch._foreach_copy_([v for _, _, v in adopt], [g for _, g, _ in adopt])
            for p, _, view in adopt:
                p.grad = view
        for flat_batch, seg, has_grad in plans:
            for lo, hi in self._runs(seg, has_grad):
                self._add_run(flat_batch, seg.bucket, lo, hi)
        for done in batches:
            if done.params:
                done.implementation = opt._implementation(done)
        return batches

    def _runs(self, seg: _Segment, present: list[bool] | None) -> list[tuple[int, int]]:
        """Maximal ranges of parameters that have a gradient and the same state keys and
        scalar state (so one call of the update rule covers them)."""
        b, lo, hi = seg.bucket, seg.lo, seg.hi
        everyone = present is None or all(present)
        if everyone and seg.uniform and not b.other:
            return [(lo, hi)]
        keys = b.keys[lo:hi]
        scalars = {k: v[lo:hi].tolist() for k, v in b.scalars.items()}
        if (everyone and not b.other and keys.count(keys[0]) == len(keys)
                and all(vals.count(vals[0]) == len(vals) for k, vals in scalars.items() if k in keys[0])):
            seg.uniform = True
            return [(lo, hi)]
        seg.uniform = False
        state = self.optimizer.state

        def signature(j: int) -> tuple[Any, ...]:
            own = keys[j]
            return (own, tuple(scalars[k][j] for k in own if k in scalars),
                    tuple(state[b.params[lo + j]][k] for k in own if k in b.other))

        runs: list[tuple[int, int]] = []
        start, sig = None, None
        for j in range(hi - lo):
            if present is not None and not present[j]:
                if start is not None:
                    runs.append((lo + start, lo + j))
                start = None
                continue
            s = signature(j)
            if start is None:
                start, sig = j, s
            elif not self._same_signature(s, sig):
                runs.append((lo + start, lo + j))
                start, sig = j, s
        if start is not None:
            runs.append((lo + start, hi))
        return runs

    @staticmethod
    def _same_signature(a: Any, b: Any) -> bool:
        return bool(a[0] == b[0] and a[1] == b[1] and len(a[2]) == len(b[2])
                    and all(map(_same, a[2], b[2])))

    def _add_run(self, batch: FlatBatch, b: _Bucket, lo: int, hi: int) -> None:
        o0, o1 = b.offsets[lo], b.offsets[hi]
        param = b.data[o0:o1]
        keys = b.keys[lo]
        if not keys:
            run = _Run(b, lo, hi, self.optimizer._new_state(param, batch.group), new=True)
        else:
            run = _Run(b, lo, hi, {})
            first = self.optimizer.state[b.params[lo]]
            for key in keys:
                if key in b.state:
                    run.state[key] = run.given[key] = b.state[key][o0:o1]
                elif key in b.scalars:
                    run.state[key] = b.scalars[key][lo].clone()
                else:
                    run.state[key] = first[key]
        batch.runs.append(run)
        batch.params.append(param)
        batch.grads.append(b.grad[o0:o1])
        batch.states.append(run.state)

    def commit(self, batches: list[GroupBatch]) -> None:
        """Write what the update rule left in each run's state back into the buffers and
        give parameters that got state their per-parameter views."""
        opt = self.optimizer
        for batch in batches:
            assert isinstance(batch, FlatBatch)
            for run in batch.runs:
                b, lo, hi = run.bucket, run.lo, run.hi
                o0, o1 = b.offsets[lo], b.offsets[hi]
                changed = run.new
                for key, value in run.state.items():
                    if key in run.given and value is run.given[key]:
                        continue  # updated in place
                    if isinstance(value, Tensor) and value.dim() == 1 and value.numel() == o1 - o0 \
                            and key not in b.scalars and key not in b.other:
                        b.state_buffer(key, value.dtype)[o0:o1].copy_(value)
                        self.kinds.setdefault(key, _ELEMENT)
                    elif isinstance(value, Tensor) and value.dim() == 0 and key not in b.state \
                            and key not in b.other:
                        b.scalar_buffer(key, value)[lo:hi].copy_(value)
                        self.kinds.setdefault(key, _SCALAR)
                    else:
                        b.other.add(key)
                        for p in b.params[lo:hi]:
                            opt.state[p][key] = value
                    changed = changed or key not in b.keys[lo]
                if changed and run.state:
                    keys = tuple(sorted(run.state))
                    for i in range(lo, hi):
                        p = b.params[i]
                        state = opt.state[p]
                        for key in keys:
                            if key in b.state:
                                state[key] = b.element_view(b.state[key], i)
                            elif key in b.scalars:
                                state[key] = b.scalars[key][i]
                        b.keys[i] = keys

    def first_nonfinite(self, batches: list[GroupBatch]) -> Tensor:
        """The first parameter (in group order) whose gradient holds NaN or inf."""
        for batch in batches:
            assert isinstance(batch, FlatBatch)
            for run in batch.runs:
                for p in run.bucket.params[run.lo:run.hi]:
                    if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                        return p
        raise AssertionError("no non-finite gradient")

    def zero_grad(self) -> None:
        """``zero_grad(set_to_none=False)``: one fill per buffer; a gradient that is not a
        view of it (assigned by hand) is zeroed in place, as torch does."""
        for b in self.buckets:
            b.grad.zero_()
            for p, view in zip(b.params, b.grad_views):
                g = p.grad
                if g is not None and g is not view:
                    if g.grad_fn is not None:
                        g.detach_()
                    else:
                        g.requires_grad_(False)
                    g.zero_()
