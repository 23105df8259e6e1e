r"""What the closure solvers (L-BFGS, conjugate gradient) share: the parameters seen as one
vector, the global reductions, the objective with its weight-decay term, and a base class.

A quasi-Newton or conjugate gradient method works on one vector x ∈ ℝⁿ made of every
parameter of every group. :class:`ParamSpace` is that vector: it gathers the gradients into
it, moves the parameters along a direction, and saves and restores them. A vector is a
list of *pieces*: one flat tensor per (device, real dtype) bucket of ordinary tensors
(complex parameters are viewed as pairs of reals, as ``torch.optim.LBFGS`` does), and one
piece per DTensor parameter, kept in the parameter's own shape and placement. With every
parameter on one device and of one dtype there is exactly one flat piece, and every
operation is the one ``torch.optim.LBFGS`` performs on its flat vector, bit for bit.

Global reductions
-----------------
Every reduction the solvers make over the elements of a vector — dot products, the max-abs
and abs-sum norms of their stopping tests and first step, the value of the loss and of the
weight-decay penalty — goes through the few functions of this module marked *reduction*
(:func:`dot`, :func:`max_abs`, :func:`abs_sum`, :func:`loss_value`, :func:`squared_norm`).
Nothing else in the solvers looks at more than one element at a time, so making them global
across a process group is a change to these functions alone. DTensor pieces (Shard and
Replicate placements) are reduced on their local shards, and the stacked results of all of
them are all-reduced once per reduction (per sharded mesh dimension); other placements are
left to DTensor (``full_tensor()``); ordinary tensors are reduced locally (under DDP their gradients are already averaged, so
every rank holds the same vectors and the same reductions).

The loss
--------
The loss a closure returns is each rank's own (its share of the batch), as in single-process
code. :func:`loss_value` averages it over the ranks that share the parameters, as the
gradients are averaged: over the device mesh of DTensor (FSDP2) parameters, or over the
``process_group`` given to the solver (DDP). The ranks' values are all-gathered and combined
in rank order, so every rank gets the same bits; where they are all equal (a closure that
already returns the global loss) that value itself is used, unchanged. So every rank takes
the same line-search decisions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from descend import regularization
from descend.optimizer import RegularizedOptimizer
from descend.tensors import is_dtensor
from descend.validation import check_int, check_number, invalid, scalar_value

__all__ = ["ParamSpace", "Objective", "ClosureSolver", "Outcome", "Vector", "dot", "max_abs", "abs_sum",
           "loss_value", "squared_norm", "is_finite"]

#: one piece per bucket: a flat tensor, or a DTensor parameter's own shape
Vector = list[Tensor]
#: a step length: a Python number or a 0-dim tensor, as in torch's L-BFGS
Scalar = float | Tensor




def _to_local_scalar(x: Tensor) -> Tensor:
    """A replicated plain tensor from a (possibly partial) DTensor reduction."""
    if is_dtensor(x):
        return x.full_tensor()  # type: ignore[attr-defined, no-any-return]
    return x


def _combine(parts: list[Tensor], how: str) -> Tensor:
    """Reduce the per-piece results to one 0-dim tensor (the identity for one piece, so a
    single flat piece gives exactly torch's number)."""
    if len(parts) == 1:
        return parts[0]
    dtype = parts[0].dtype
    for p in parts[1:]:
        dtype = torch.promote_types(dtype, p.dtype)
    stacked = torch.stack([p.to(device=parts[0].device, dtype=dtype) for p in parts])
    return stacked.sum() if how == "sum" else stacked.max()


# --- DTensor pieces: local results, then one collective for all of them ------------------
#
# A DTensor piece placed by Shard and Replicate only (FSDP2's Shard(0), HSDP's Replicate and
# Shard, hand-made ones) is reduced by hand: the result over its local shard, for every such
# piece, stacked into one tensor that is all-reduced once over each mesh dimension the pieces
# are sharded on (one collective per reduction under FSDP2, however many parameters). Over a
# replicated dimension every rank already holds the whole, so nothing is reduced there. Any
# other placement (Partial) is left to DTensor, one collective per piece.


def _shard_plan(x: Tensor) -> tuple[Any, tuple[int, ...]] | None:
    """(mesh, the mesh dimensions x is sharded over) for a DTensor placed by Shard and
    Replicate only; None for another placement."""
    try:
        from torch.distributed.tensor import Replicate, Shard
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import Replicate, Shard  # type: ignore[no-redef]

    dims = []
    for i, placement in enumerate(x.placements):  # type: ignore[attr-defined]
        if isinstance(placement, Shard):
            dims.append(i)
        elif not isinstance(placement, Replicate):
            return None
    return x.device_mesh, tuple(dims)  # type: ignore[attr-defined]


def _reduce_over_meshes(parts: list[Tensor], plans: list[tuple[Any, tuple[int, ...]] | None], how: str) -> None:
    """Make ``parts[i]`` global, in place in the list, for every i with a plan: one all-reduce
    (sum or max) per (mesh, sharded dimensions) and dimension, of the stacked results.

    For "max" a NaN on any rank must reach every rank, which a MAX all-reduce does not promise
    (it compares): NaNs travel as +inf with a flag beside them, in the same collective."""
    import torch.distributed as dist

    batches: dict[Any, list[int]] = {}
    for i, plan in enumerate(plans):
        if plan is not None and plan[1]:
            batches.setdefault(plan, []).append(i)
    for (mesh, dims), indices in batches.items():
        dtype = parts[indices[0]].dtype
        for i in indices[1:]:
            dtype = torch.promote_types(dtype, parts[i].dtype)
        stacked = torch.stack([parts[i].to(dtype) for i in indices])
        if how == "max":
            nan = stacked.isnan()
            stacked = torch.cat([stacked.masked_fill(nan, math.inf), nan.to(dtype)])
        op = dist.ReduceOp.SUM if how == "sum" else dist.ReduceOp.MAX
        for dim in dims:
            dist.all_reduce(stacked, op=op, group=mesh.get_group(dim))
        if how == "max":
            values, flags = stacked.chunk(2)
            stacked = values.masked_fill(flags > 0, math.nan)
        for j, i in enumerate(indices):
            parts[i] = stacked[j]


def _reduce(pieces: Sequence[tuple[Tensor, ...]], local: Callable[..., Tensor], how: str,
            combine: bool = True, shard: Callable[..., Tensor] | None = None) -> Any:
    """``local`` of each tuple of pieces (the same parameter in one or two vectors), made global
    over the mesh of DTensor pieces with one collective (see above), then combined. ``shard``
    (default ``local``) is what DTensor pieces compute on their local shards."""
    parts: list[Tensor] = []
    plans: list[tuple[Any, tuple[int, ...]] | None] = []
    for tensors in pieces:
        plan = _shard_plan(tensors[0]) if is_dtensor(tensors[0]) else None
        if plan is not None and any(not is_dtensor(t) or t.placements != tensors[0].placements  # type: ignore[attr-defined]
                                    for t in tensors[1:]):
            plan = None
        if plan is not None:
            parts.append((shard or local)(*[t.to_local() for t in tensors]))  # type: ignore[attr-defined]
        else:
            parts.append(_to_local_scalar(local(*tensors)))
        plans.append(plan)
    _reduce_over_meshes(parts, plans, how)
    return _combine(parts, how) if combine else parts


def _is_plain(a: Vector) -> bool:
    return len(a) == 1 and type(a[0]) is Tensor  # one flat local piece: the common case, kept cheap


# --- reductions: the only places where elements of a vector are combined ---------------


def _piece_dot(x: Tensor, y: Tensor) -> Tensor:
    return x.dot(y) if x.dim() == 1 and not is_dtensor(x) else (x * y).sum()


def _shard_dot(x: Tensor, y: Tensor) -> Tensor:
    return (x * y).sum()  # what DTensor computes on each shard: a DTensor piece keeps its bits


def dot(a: Vector, b: Vector) -> Tensor:
    """*reduction* aᵀb, a 0-dim tensor."""
    if _is_plain(a):
        return a[0].dot(b[0])
    return _reduce(list(zip(a, b, strict=True)), _piece_dot, "sum", shard=_shard_dot)  # type: ignore[no-any-return]


def _piece_max_abs(x: Tensor) -> Tensor:
    return x.abs().max() if x.numel() else x.new_zeros(())  # an empty local shard: torch's max rejects it


def max_abs(a: Vector) -> Tensor:
    """*reduction* ‖a‖_∞ (NaN if any element is NaN), a 0-dim tensor."""
    if _is_plain(a):
        return a[0].abs().max()
    return _reduce([(x,) for x in a], _piece_max_abs, "max")  # type: ignore[no-any-return]


def abs_sum(a: Vector) -> Tensor:
    """*reduction* ‖a‖₁, a 0-dim tensor."""
    if _is_plain(a):
        return a[0].abs().sum()
    return _reduce([(x,) for x in a], lambda x: x.abs().sum(), "sum")  # type: ignore[no-any-return]


def loss_value(loss: Any, groups: Sequence[Any] = (), device: torch.device | None = None) -> float:
    """*reduction* The value of a closure's loss as a Python float, averaged over ``groups``.

    A DTensor loss is made whole by DTensor. Then, for each process group in turn, the ranks'
    values are all-gathered; if they are all equal, the value is kept as it is (a loss that is
    already global is unchanged, bit for bit), else it becomes their mean, summed in rank order
    (the same bits on every rank). The all-gather runs on the host where the group takes host
    tensors (gloo), else on the loss tensor's device, or ``device`` (:func:`collective_device`)."""
    if isinstance(loss, Tensor):
        loss = _to_local_scalar(loss.detach())
        device = loss.device if device is None or loss.device.type != "cpu" else device
    value = float(loss)
    for group in groups:
        value = _average(value, group, device)
    return value


def _average(value: float, group: Any, device: torch.device | None) -> float:
    import torch.distributed as dist

    world = dist.get_world_size(group)
    if world == 1:
        return value
    mine = torch.tensor([value], dtype=torch.float64, device=collective_device(group, device))
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    values = torch.cat(gathered).tolist()  # one read of the device
    if all(v == values[0] for v in values):
        return values[0]  # type: ignore[no-any-return]  # the loss is already global
    return sum(values) / world  # type: ignore[no-any-return]  # in rank order: the same bits on every rank


def collective_device(group: Any, hint: torch.device | None = None) -> torch.device:
    """Where a small tensor for a collective over ``group`` must live: the host if the group's
    backend takes host tensors (gloo, a "cpu:gloo,cuda:nccl" group); else the device the group
    is bound to, else ``hint`` (the parameters' or the loss's device) where the group takes its
    type, else the current device of the group's device type. Not ``torch.cuda.current_device()``
    blindly: a rank that never called ``set_device`` has device 0 current, which is another
    rank's device under NCCL."""
    types = [d.type for d in getattr(group, "_device_types", [])]
    if not types:
        import torch.distributed as dist

        types = ["cuda"] if str(dist.get_backend(group)) == "nccl" else ["cpu"]
    if "cpu" in types:
        return torch.device("cpu")
    bound = getattr(group, "bound_device_id", None)
    if bound is not None:
        return torch.device(bound)
    if hint is not None and hint.type in types:
        return hint if hint.index is not None else torch.device(hint.type, torch.get_device_module(hint.type)
                                                                .current_device())
    return torch.device(types[0], torch.get_device_module(types[0]).current_device())


def mesh_groups(params: Sequence[Tensor]) -> list[Any]:
    """The process groups of the device mesh of the first DTensor in ``params`` (one per mesh
    dimension; averaging over each in turn is the mean over the whole mesh), or []."""
    for p in params:
        if is_dtensor(p):
            mesh = p.device_mesh  # type: ignore[attr-defined]
            return [mesh.get_group(i) for i in range(mesh.ndim)]
    return []


def squared_norm(tensors: Sequence[Tensor]) -> float:
    """*reduction* Σ‖θ‖² over ``tensors`` (:func:`descend.regularization.l2_penalty`)."""
    return squared_norms([tensors])[0]


def squared_norms(lists: Sequence[Sequence[Tensor]]) -> list[float]:
    """*reduction* :func:`squared_norm` of each list, with one collective for all their DTensors.

    Plain tensors are summed per (device, dtype) bucket by ``l2_penalty``, DTensors one by one;
    each list's total adds the buckets' values in order."""
    buckets: list[tuple[int, list[Tensor]]] = []
    for index, tensors in enumerate(lists):
        keyed: dict[Any, list[Tensor]] = {}
        for t in tensors:
            keyed.setdefault(id(t) if is_dtensor(t) else (t.device, t.dtype), []).append(t)
        buckets += [(index, group) for group in keyed.values()]
    parts = _reduce([tuple(group) for _, group in buckets],
                    lambda *group: regularization.l2_penalty([t.detach() for t in group]), "sum", combine=False)
    totals = [0.0] * len(lists)
    for (index, _), part in zip(buckets, parts, strict=True):
        totals[index] += float(part)
    return totals


def first_step(grad: Vector, lr: float) -> Scalar:
    """lr·min(1, 1/‖g‖₁): the first trial step of torch's L-BFGS (a 0-dim tensor where 1/‖g‖₁ < 1)."""
    step: Any = min(1.0, 1.0 / abs_sum(grad))
    return step * lr  # type: ignore[no-any-return]


def is_finite(x: float | Tensor) -> bool:
    """Whether a scalar already reduced (a float or 0-dim tensor) is finite."""
    return math.isfinite(float(x))


# --- element-wise operations on vectors ------------------------------------------------


def neg(a: Vector) -> Vector:
    return [x.neg() for x in a]


def sub(a: Vector, b: Vector) -> Vector:
    return [x.sub(y) for x, y in zip(a, b, strict=True)]


def mul(a: Vector, s: Scalar) -> Vector:
    return [torch.mul(x, s) for x in a]


def add_(a: Vector, b: Vector, alpha: Scalar) -> Vector:
    """a ← a + alpha·b in place."""
    if len(a) == 1:
        a[0].add_(b[0], alpha=alpha)  # type: ignore[arg-type]
        return a
    for x, y in zip(a, b, strict=True):
        x.add_(y, alpha=alpha)  # type: ignore[arg-type]
    return a


def clone(a: Vector) -> Vector:
    return [x.clone(memory_format=torch.contiguous_format) for x in a]


# --- the parameters as a vector ----------------------------------------------------------


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.empty((), dtype=dtype).real.dtype if dtype.is_complex else dtype


class ParamSpace:
    """The parameters of an optimizer, in order, as one vector of buckets."""

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.params = list(params)
        keys: dict[Any, int] = {}
        self.buckets: list[list[Tensor]] = []
        for p in self.params:
            if is_dtensor(p):
                if p.is_complex():
                    raise ValueError("complex DTensor parameters are not supported by the closure solvers")
                self.buckets.append([p])
                continue
            key = (p.device, _real_dtype(p.dtype))
            if key not in keys:
                keys[key] = len(self.buckets)
                self.buckets.append([])
            self.buckets[keys[key]].append(p)
        self.sizes = [sum(2 * p.numel() if p.is_complex() else p.numel() for p in b) for b in self.buckets]

    def _real_view(self, p: Tensor) -> Tensor:
        return torch.view_as_real(p) if p.is_complex() else p

    def gather(self, grads: Sequence[Tensor | None]) -> Vector:
        """The vector of ``grads`` (one per parameter, in order; None counts as zeros)."""
        by_param = dict(zip(map(id, self.params), grads, strict=True))
        pieces: Vector = []
        for bucket in self.buckets:
            if is_dtensor(bucket[0]):
                g = by_param[id(bucket[0])]
                pieces.append(torch.zeros_like(bucket[0]) if g is None else g.clone())
                continue
            views = []
            for p in bucket:
                g = by_param[id(p)]
                if g is None:
                    view = p.new(p.numel()).zero_()
                else:
                    view = (g.to_dense() if g.is_sparse else g).reshape(-1)
                views.append(torch.view_as_real(view).view(-1) if view.is_complex() else view)
            pieces.append(torch.cat(views, 0))
        return pieces

    def add_(self, t: Scalar, d: Vector) -> None:
        """θ ← θ + t·d."""
        for bucket, piece in zip(self.buckets, d, strict=True):
            if is_dtensor(bucket[0]):
                bucket[0].add_(piece, alpha=t)  # type: ignore[arg-type]
                continue
            offset = 0
            for p in bucket:
                real = self._real_view(p)
                n = real.numel()
                real.add_(piece[offset:offset + n].view_as(real), alpha=t)  # type: ignore[arg-type]
                offset += n

    def unflatten(self, v: Vector) -> list[Tensor]:
        """One tensor per parameter, shaped (and typed, complex included) like it, from a vector."""
        out: dict[int, Tensor] = {}
        for bucket, piece in zip(self.buckets, v, strict=True):
            if is_dtensor(bucket[0]):
                out[id(bucket[0])] = piece
                continue
            offset = 0
            for p in bucket:
                real = self._real_view(p)
                n = real.numel()
                chunk = piece[offset:offset + n].view_as(real)
                out[id(p)] = torch.view_as_complex(chunk) if p.is_complex() else chunk
                offset += n
        return [out[id(p)] for p in self.params]

    def save(self) -> list[Tensor]:
        return [p.clone(memory_format=torch.contiguous_format) for p in self.params]

    def restore(self, saved: Sequence[Tensor]) -> None:
        for p, s in zip(self.params, saved, strict=True):
            p.copy_(s)

    def join(self, name: str, tensors: Sequence[Any]) -> Vector:
        """The vector whose per-parameter slices are ``tensors`` (as :meth:`unflatten` made them).

        Slices that are still views of one flat piece, in order, give that piece back without
        a copy; others (a loaded checkpoint) are concatenated. Raises ValueError, naming the
        state entry, for a slice that does not fit its parameter."""
        for p, t in zip(self.params, tensors, strict=True):
            if not isinstance(t, Tensor) or t.shape != p.shape or t.dtype != p.dtype or is_dtensor(t) != is_dtensor(p):
                got = f"shape {tuple(t.shape)} and dtype {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(
                    f"optimizer state {name!r} holds {got} for a parameter of shape {tuple(p.shape)} and dtype "
                    f"{p.dtype}: the state does not belong to these parameters; nothing was changed")
        by_param = dict(zip(map(id, self.params), tensors, strict=True))
        pieces: Vector = []
        for bucket, size in zip(self.buckets, self.sizes, strict=True):
            slices = [by_param[id(p)] for p in bucket]
            if is_dtensor(bucket[0]):
                pieces.append(slices[0])
                continue
            base = _common_base(bucket, slices, size)
            if base is None:
                base = torch.cat([(torch.view_as_real(t) if t.is_complex() else t).reshape(-1) for t in slices])
            pieces.append(base)
        return pieces


def _common_base(bucket: list[Tensor], slices: list[Tensor], size: int) -> Tensor | None:
    """The flat tensor ``slices`` are consecutive views of, if they are."""
    base = slices[0]._base
    if base is None or base.dim() != 1 or base.numel() != size or not base.is_contiguous():
        return None
    address, offset = base.data_ptr(), 0
    for p, t in zip(bucket, slices, strict=True):
        if t._base is not base or not t.is_contiguous() or t.data_ptr() != address + offset * base.element_size():
            return None
        offset += 2 * p.numel() if p.is_complex() else p.numel()
    return base


class Objective:
    r"""φ(θ) = s·f(θ) + Σ_g λ_g/2·‖θ_g‖² and its gradient, from a closure.

    s = −1 when maximizing, else 1; λ_g is group g's ``weight_decay``. The decay gradient is
    :func:`descend.regularization.coupled_gradient` and its value λ/2·
    :func:`descend.regularization.l2_penalty`, so the line search sees the same function
    whose gradient it follows.
    """

    def __init__(self, space: ParamSpace, closure: Callable[[], Any], weight_decays: Sequence[float],
                 maximize: bool, loss_groups: Sequence[Any] = ()) -> None:
        self.space = space
        self.closure = closure
        self.decays = list(weight_decays)
        self.maximize = maximize
        self.loss_groups = list(loss_groups)
        first = space.params[0]
        #: where the loss's collectives go on a backend without host tensors (NCCL)
        self.device = first.to_local().device if is_dtensor(first) else first.device  # type: ignore[attr-defined]
        #: called once, with the closure's loss, after the first evaluation (the non-finite guard)
        self.guard: Callable[[Any], None] | None = None

    def __call__(self) -> tuple[Any, float, Vector]:
        """(what the closure returned, φ, ∇φ) at the current parameters."""
        with torch.enable_grad():
            loss = self.closure()
        if self.guard is not None:
            guard, self.guard = self.guard, None
            guard(loss)
        value = loss_value(loss, self.loss_groups, self.device)
        grads: list[Tensor | None] = []
        decayed: dict[float, list[Tensor]] = {}
        for p, wd in zip(self.space.params, self.decays, strict=True):
            g = p.grad
            if self.maximize and g is not None:
                g = -g
            if wd != 0:
                g = regularization.coupled_gradient(p, torch.zeros_like(p) if g is None else g, wd, 0)
                decayed.setdefault(wd, []).append(p)
            grads.append(g)
        if self.maximize:
            value = -value
        for wd, norm in zip(decayed, squared_norms(list(decayed.values())), strict=True):
            value += wd / 2 * norm
        return loss, value, self.space.gather(grads)

    def at(self, saved: Sequence[Tensor], t: Scalar, d: Vector) -> tuple[float, Vector]:
        """(φ, ∇φ) at saved + t·d; the parameters are then put back to ``saved``."""
        self.space.add_(t, d)
        try:
            _, value, grad = self()
        finally:
            self.space.restore(saved)
        return value, grad


# --- the base class ----------------------------------------------------------------------

#: why a step stopped, in words (``Outcome.reason`` → message)
STOP_MESSAGES = {
    "tolerance_grad": "the largest gradient component is at most tolerance_grad",
    "tolerance_change": "the change in parameters or objective fell below tolerance_change",
    "no_descent": "the directional derivative along the search direction is above -tolerance_change",
    "max_iter": "max_iter iterations were run",
    "max_eval": "max_eval function evaluations were spent",
    "line_search": "the line search found no lower point along the search direction",
    "nonfinite": "the closure returned a non-finite value and no finite point was found",
    "callback": "the callback asked to stop",
    "skipped": "the gradient at the starting point was not finite; nothing was changed (nonfinite='skip')",
}


@dataclass
class Outcome:
    """How one call of a closure solver ended."""

    loss: Any  #: what the closure returned at the start of the call (what ``step`` returns)
    reason: str  #: a key of :data:`STOP_MESSAGES`
    value: float | None  #: φ at the final parameters, None where they were not evaluated
    grad: Vector | None  #: ∇φ there
    iterations: int  #: iterations run in this call
    evaluations: int  #: closure evaluations in this call


#: called after each iteration with φ and ∇φ at the new point (None where not evaluated) and the
#: iterations and evaluations of this call so far; returning True stops the solver.
IterationCallback = Callable[[float | None, Vector | None, int, int], bool | None]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        try:
            return scalar_value(a) == scalar_value(b)
        except (TypeError, ValueError, RuntimeError):
            return False
    return bool(a == b)


class _Skipped(Exception):
    """Raised by the non-finite guard under ``nonfinite="skip"``; carries the closure's loss."""

    def __init__(self, loss: Any) -> None:
        super().__init__("skipped")
        self.loss = loss


def _process_groups(process_group: Any) -> list[Any]:
    """``process_group=`` as a list of groups: None → [], True or "default" → the default group."""
    if process_group is None or process_group is False:
        return []
    import torch.distributed as dist

    if process_group is True or process_group == "default":
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("process_group=True needs an initialized default process group "
                             "(torch.distributed.init_process_group)")
        return [dist.group.WORLD]
    if isinstance(process_group, str):
        raise invalid("process_group", process_group, "None, True, 'default' or a torch.distributed ProcessGroup")
    return [process_group]


def _no_params(name: str, groups: list[Any]) -> ValueError:
    """The error for a set of groups without a parameter (there would be no vector to solve over)."""
    return invalid("params", groups, f"at least one parameter: {name} runs one solver over the parameters of all "
                   "groups (a group without parameters beside others is accepted, and changes nothing)")


def _refuse_zero(name: str) -> None:
    """A closure solver made as the local optimizer of ``ZeroRedundancyOptimizer`` is refused.

    ZeRO gives each rank's optimizer only its partition of the parameters: each rank would run
    its own L-BFGS or CG on its partition (a block-diagonal method, not this one), with its own
    line search calling the closure a number of times of its own, so the collectives of the
    model's backward (DDP's all-reduce) would not match across ranks and hang."""
    import sys

    frame: Any = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return
        owner = frame.f_locals.get("self")
        if any(c.__name__ == "ZeroRedundancyOptimizer" and c.__module__.startswith("torch.distributed")
               for c in type(owner).__mro__):
            raise TypeError(
                f"{name} cannot be the local optimizer of ZeroRedundancyOptimizer: ZeRO gives each rank only "
                f"its partition of the parameters, so each would run a different {name} on its part (not one "
                f"{name} over the model), with line searches evaluating the closure a different number of "
                f"times on each rank (the model's collectives would hang). Use {name} over all parameters "
                "(DDP with process_group=True, or FSDP2)")
        frame = frame.f_back


class ClosureSolver(RegularizedOptimizer):
    """The base class of :class:`descend.LBFGS` and :class:`descend.ConjugateGradient`.

    One solver runs over every parameter of every group, so the solver settings must agree
    across groups (``_shared``); only ``weight_decay`` may differ, and it is part of the
    objective (see :class:`Objective`). Each parameter keeps its slice of every vector of the
    solver (the direction, the last gradient, the history), shaped and typed like itself, as
    every other optimizer's state is; the solver's scalars (iteration and evaluation counts,
    step length, ρ_i, …) are kept with the first parameter. A step works on copies and writes
    the state only at the end; if it raises, parameters and state are as they were.

    ``nonfinite`` ("ignore", "skip" or "raise") looks at the gradients of the step's first
    closure evaluation (its starting point): with "skip", a non-finite one makes the whole
    ``step`` change nothing (parameters, state) but ``skipped_steps``, and it returns that
    first loss; with "raise", a ``FloatingPointError`` names the first offending parameter and
    nothing is changed. Non-finite values at the line search's trial points make it step back,
    whatever the mode.

    ``process_group`` (DDP): None (no reduction), True or ``"default"`` (the default group), or
    a ``torch.distributed`` process group: the closure's loss is averaged over it (the
    gradients are averaged by DDP already), so every rank takes the same decisions. With
    DTensor (FSDP2) parameters the loss is averaged over their device mesh without it.
    """

    #: GradScaler unscales and reads found_inf itself (a closure solver re-evaluates the loss)
    _step_supports_amp_scaling = False

    _fast_paths: tuple[str, ...] = ()
    #: options every group must share
    _shared: tuple[str, ...] = ("lr", "max_iter", "max_eval", "tolerance_grad", "tolerance_change",
                                "line_search_fn", "c1", "c2", "maximize")
    #: state keys holding one vector, and a list of vectors
    _vector_keys: tuple[str, ...] = ()
    _history_keys: tuple[str, ...] = ()

    def __init__(self, params: Any, defaults: dict[str, Any], *, nonfinite: str = "ignore",
                 process_group: Any = None) -> None:
        check_int("max_iter", defaults["max_iter"], 1)
        if defaults["max_eval"] is None:
            defaults["max_eval"] = defaults["max_iter"] * 5 // 4  # torch's default
        self._validate(defaults)  # options before parameters, as torch checks them
        self.last_stop: str | None = None
        _refuse_zero(type(self).__name__)
        self._loss_groups = _process_groups(process_group)
        if not isinstance(params, Tensor):
            params = list(params)  # read once (model.parameters() is a generator)
            if not params:
                raise _no_params(type(self).__name__, [])
        self._building = True  # torch adds the groups one by one: an empty one may come before the others
        super().__init__(params, defaults, nonfinite=nonfinite)
        self._building = False
        if not any(g["params"] for g in self.param_groups):
            raise _no_params(type(self).__name__, [g["params"] for g in self.param_groups])

    # --- validation ----------------------------------------------------------------------

    def _check_group(self, group: dict[str, Any]) -> None:
        name = type(self).__name__
        check_int("max_iter", group["max_iter"], 1)
        check_int("max_eval", group["max_eval"], 1)
        check_number("tolerance_grad", group["tolerance_grad"], low=0)
        check_number("tolerance_change", group["tolerance_change"], low=0)
        if group["line_search_fn"] not in (None, "strong_wolfe"):
            raise invalid("line_search_fn", group["line_search_fn"], "None or 'strong_wolfe'")
        check_number("c1", group["c1"], low=0, high=1, low_open=True)
        check_number("c2", group["c2"], low=scalar_value(group["c1"]), high=1, low_open=True)
        if not isinstance(group["maximize"], bool):
            raise invalid("maximize", group["maximize"], "True or False")
        if group["decay"] != "coupled":
            raise invalid(
                "decay", group["decay"],
                f"'coupled' only: {name} minimizes f + Σ weight_decay/2·‖θ‖², so weight decay is part of the "
                "objective its line search measures; a decoupled shrink of θ between evaluations has no "
                "objective to descend")
        if scalar_value(group["l1"]) != 0:
            raise invalid(
                "l1", group["l1"],
                f"0 only: {name} needs a smooth objective, and λ₁·‖θ‖₁ is not differentiable at 0 "
                "(its curvature pairs and line search break down there)")

    def _check_agreement(self, first: dict[str, Any], group: dict[str, Any], index: int) -> None:
        differ = [k for k in self._shared if not _same(first[k], group[k])]
        if differ:
            details = ", ".join(f"{k}={group[k]!r} (group 0: {first[k]!r})" for k in differ)
            raise ValueError(
                f"{type(self).__name__} runs one solver over all parameter groups, so its solver settings must "
                f"agree across groups; group {index} differs in {details}. Only weight_decay may differ.")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if isinstance(param_group, dict) and "max_eval" in param_group and param_group["max_eval"] is None:
            max_iter = param_group.get("max_iter", self.defaults["max_iter"])
            check_int("max_iter", max_iter, 1)
            param_group = {**param_group, "max_eval": max_iter * 5 // 4}
        if self.param_groups and isinstance(param_group, dict):
            params = param_group.get("params")
            named = "param_names" in param_group or (
                isinstance(params, (list, tuple)) and any(isinstance(p, tuple) for p in params))
            if named and "param_names" not in self.param_groups[0]:  # torch's refusal, before the settings' check
                raise ValueError("all optimizer param groups should be with/without names. cannot add param group "
                                 "with names to the optimizer (allowed: names in every group or in none)")
            options = {k: v for k, v in param_group.items() if k not in ("params", "param_names")}
            merged = {**self.defaults, **options}
            self._validate(merged)
            self._check_agreement(self.param_groups[0], merged, len(self.param_groups))
        super().add_param_group(param_group)
        if not getattr(self, "_building", False) and not any(g["params"] for g in self.param_groups):
            self.param_groups.pop()  # refused: nothing changed
            raise _no_params(type(self).__name__, [g["params"] for g in self.param_groups] + [[]])
        # the vector the solver works on has changed: its memory no longer applies
        self.state.clear()

    def _settings(self) -> dict[str, Any]:
        first = self.param_groups[0]
        for i, group in enumerate(self.param_groups):
            self._validate(group)
            if i:
                self._check_agreement(first, group, i)
        settings = {k: first[k] for k in self.defaults if k not in ("weight_decay", "l1", "decay")}
        settings["lr"] = scalar_value(first["lr"])
        return settings

    # --- state: each parameter keeps its slice of every vector ---------------------------------
    #
    # Between steps the solver's vectors live twice, at no cost in memory: as flat pieces (what
    # the solver computes with) and as per-parameter views of them in ``self.state`` (what
    # checkpoints see). ``_stored`` remembers what the last step wrote, so the next one takes
    # the flat pieces back without a copy or a check as long as every state entry is still the
    # very object written; anything else (a loaded checkpoint, an edited state) is rebuilt from
    # the per-parameter slices and checked.

    def _signature(self, space: ParamSpace) -> list[Any]:
        return [(id(p), p.shape, p.dtype, p.device) for p in space.params]

    def _unchanged(self, space: ParamSpace) -> dict[str, Any] | None:
        """The flat vectors of the last step, if the state still holds exactly what it wrote."""
        stored = getattr(self, "_stored", None)
        if stored is None or stored["signature"] != self._signature(space):
            return None
        for p, written in zip(space.params, stored["entries"], strict=True):
            entry = self.state.get(p)
            if entry is None:
                return None
            for key, value in written.items():
                now = entry.get(key)
                if now is not value:
                    return None
                if isinstance(value, list) and list(map(id, now)) != stored["items"][id(p), key]:
                    return None  # (the ids are of views ``_views`` keeps alive, so none is reused)
        return stored["vectors"]  # type: ignore[no-any-return]

    def _load_state(self, space: ParamSpace) -> dict[str, Any]:
        """The solver's state with whole vectors, from the per-parameter slices."""
        head = self.state.get(space.params[0], {})
        vector_keys = self._vector_keys + self._history_keys
        state = {k: v for k, v in head.items() if k not in vector_keys}
        vectors = self._unchanged(space)
        if vectors is not None:
            state.update({k: list(v) if isinstance(v, list) and k in self._history_keys else v
                          for k, v in vectors.items()})
            return state
        per_param = [self.state.get(p, {}) for p in space.params]
        for key in self._vector_keys:
            if head.get(key) is not None:
                state[key] = space.join(key, [s.get(key) for s in per_param])
        for key in self._history_keys:
            if key not in head:
                continue
            lists = [s.get(key) for s in per_param]
            if any(not isinstance(x, list) or len(x) != len(head[key]) for x in lists):
                raise ValueError(f"optimizer state {key!r} does not belong to these parameters (its lists differ "
                                 "in length); nothing was changed")
            state[key] = [space.join(key, [x[i] for x in lists]) for i in range(len(head[key]))]  # type: ignore[index]
        return state

    def _store_state(self, space: ParamSpace, state: dict[str, Any]) -> None:
        """Each parameter gets its slice of every vector (a view, shaped and typed like it, so
        checkpoints are checked and resharded like any optimizer's state); the solver's own
        scalars go to the first parameter, 0-dim tensors as Python numbers."""
        vector_keys = self._vector_keys + self._history_keys
        previous = getattr(self, "_views", {})
        views: dict[int, tuple[Vector, list[Tensor]]] = {}

        def slices(v: Vector) -> list[Tensor]:
            hit = previous.get(id(v)) or views.get(id(v))
            cut = hit[1] if hit is not None and hit[0] is v else space.unflatten(v)
            views[id(v)] = (v, cut)
            return cut

        per_param: list[dict[str, Any]] = [{} for _ in space.params]
        for key, value in state.items():
            if key not in vector_keys:
                per_param[0][key] = value.item() if isinstance(value, Tensor) and value.dim() == 0 else value
        written: list[dict[str, Any]] = [{} for _ in space.params]
        vectors: dict[str, Any] = {}
        for key in self._vector_keys:
            if key in state:
                vectors[key] = state[key]
                if state[key] is None:
                    per_param[0][key] = None
                    continue
                for entry, record, piece in zip(per_param, written, slices(state[key]), strict=True):
                    entry[key] = record[key] = piece
        for key in self._history_keys:
            if key in state:
                vectors[key] = list(state[key])
                cut = [slices(v) for v in state[key]]
                for i, (entry, record) in enumerate(zip(per_param, written, strict=True)):
                    entry[key] = record[key] = [c[i] for c in cut]
        for p, entry in zip(space.params, per_param, strict=True):
            self.state[p] = entry
        self._views = views
        self._stored = {
            "signature": self._signature(space), "entries": written, "vectors": vectors,
            "items": {(id(p), k): list(map(id, record[k])) for p, record in zip(space.params, written, strict=True)
                      for k in self._history_keys if k in record},
        }

    # --- the step --------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any]) -> Any:  # type: ignore[override]
        """Run up to ``max_iter`` iterations; return what the closure returned at the start.

        Args:
            closure: clears the gradients, computes the loss, calls ``backward()`` and returns
                the loss. It is called with gradients enabled.
        """
        return self._run(closure).loss

    @torch.no_grad()
    def _run(self, closure: Callable[[], Any], callback: IterationCallback | None = None) -> Outcome:
        if closure is None or not callable(closure):
            raise ValueError(f"{type(self).__name__}.step needs a closure that re-evaluates the loss and its "
                             f"gradient, got {closure!r} (torch.distributed.checkpoint's get/set_optimizer_state_dict "
                             "call step(closure=None) at lr = 0 to create a fresh optimizer's state, and leave lr = 0 "
                             "when it fails: see 'Closure solvers' in docs/distributed.md)")
        settings = self._settings()
        params = [p for g in self.param_groups for p in g["params"]]
        if not params:  # param_groups emptied by hand after construction
            raise _no_params(type(self).__name__, [g["params"] for g in self.param_groups])
        decays = [scalar_value(g["weight_decay"]) for g in self.param_groups for _ in g["params"]]
        space = ParamSpace(params)
        state = self._load_state(space)
        loss_groups = getattr(self, "_loss_groups", []) or mesh_groups(params)
        objective = Objective(space, closure, decays, settings["maximize"], loss_groups)
        if getattr(self, "nonfinite", "ignore") != "ignore":
            objective.guard = self._guard
        saved = space.save()
        try:
            new_state, outcome = self._solve(objective, state, settings, callback)
        except _Skipped as skipped:
            space.restore(saved)
            self.skipped_steps += 1
            self.last_stop = "skipped"
            return Outcome(loss=skipped.loss, reason="skipped", value=None, grad=None, iterations=0, evaluations=1)
        except BaseException:
            space.restore(saved)
            raise
        self._store_state(space, new_state)
        self.last_stop = outcome.reason
        return outcome

    def _guard(self, loss: Any) -> None:
        """The non-finite check of the gradients at the step's starting point (every rank runs
        the same collectives, in order, for DTensor gradients, and so takes the same decision)."""
        params = [p for g in self.param_groups for p in g["params"]]
        nonfinite = _nonfinite_grads([p.grad for p in params])
        if not any(nonfinite):
            return
        if self.nonfinite == "raise":
            culprit = next(p for p, bad in zip(params, nonfinite, strict=True) if bad)
            raise FloatingPointError(f"non-finite gradient in {self._describe_param(culprit)}; nothing was "
                                     "changed (nonfinite='raise')")
        raise _Skipped(loss)

    def _solve(self, objective: Objective, state: dict[str, Any], settings: dict[str, Any],
               callback: IterationCallback | None) -> tuple[dict[str, Any], Outcome]:
        raise NotImplementedError


def _nonfinite_grads(grads: Sequence[Tensor | None]) -> list[bool]:
    """For each gradient (None counts as finite): whether some entry is NaN or infinite, over
    all shards of a DTensor, with one collective for all DTensor gradients and one read."""
    present = [g.to_dense() if g is not None and g.is_sparse else g for g in grads]
    dense = [g for g in present if g is not None]
    if not dense:
        return [False] * len(grads)

    def flag(g: Tensor) -> Tensor:
        return torch.isfinite(g).all().logical_not().to(torch.float32)  # (True for no entry at all)

    flags = _reduce([(g,) for g in dense], flag, "max", combine=False)
    read = iter(torch.stack([f.to(flags[0].device) for f in flags]).tolist())
    return [g is not None and next(read) > 0 for g in present]
