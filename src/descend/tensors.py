"""Facts about tensors that the step, the non-finite guard and the solvers share: DTensors
(FSDP2's parameters) told apart without importing torch.distributed, finiteness over all
shards, and torch's grouping of tensor lists by device and dtype."""

from __future__ import annotations

import functools
import operator
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["is_dtensor", "all_finite", "norm_dtype", "IS_CPU", "DTYPE", "SHAPE", "count_step_",
           "grouped_by_device_and_dtype", "by_device_and_dtype", "device_types_and_dtypes"]

IS_CPU = operator.attrgetter("is_cpu")
DTYPE = operator.attrgetter("dtype")
SHAPE = operator.attrgetter("shape")
_DEVICE_AND_DTYPE = operator.attrgetter("device", "dtype")
_IS_SPARSE = operator.attrgetter("is_sparse")


def is_dtensor(t: Any) -> bool:
    """A torch.distributed DTensor (FSDP2's parameters and gradients), without importing it."""
    return _is_dtensor_type(type(t))  # type: ignore[arg-type]


@functools.cache
def _is_dtensor_type(cls: type) -> bool:  # cached: the guard asks once per gradient per step
    return any(c.__name__ == "DTensor" and c.__module__.startswith("torch.distributed") for c in cls.__mro__)


def count_step_(steps: list[Tensor]) -> None:
    """t ← t + 1 for every step counter of a list on one device.

    On the CPU a multi-tensor add falls back to one add per tensor, and a Python number would
    be wrapped in a new tensor for each (about 1 µs per parameter): the 1 is wrapped once here,
    as torch's foreach Adam does (its fused Adam does not, and pays it). While torch.compile
    traces the step the plain number stays, which the compiler folds."""
    if steps and steps[0].is_cpu and not torch.compiler.is_compiling():
        torch._foreach_add_(steps, _ONE, alpha=1.0)  # alpha picks the overload taking a tensor
    else:
        torch._foreach_add_(steps, 1)


_ONE = torch.ones((), dtype=torch.float32, device="cpu")  # a 0-dim tensor: added as a number, in t's own dtype


def norm_dtype(t: Tensor) -> torch.dtype | None:
    """float32 accumulation and result for 16-bit floats, whose own range a norm overflows."""
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None


def all_finite(t: Tensor) -> bool:
    """Every entry is finite; for a DTensor, over all ranks' shards (its own answer covers
    only the local shard, and ranks must take the same decision)."""
    flag = torch.isfinite(t).all()
    full = getattr(flag, "full_tensor", None)
    return bool(full() if full is not None else flag)


def nonfinite_flags(grads: Iterable[Tensor]) -> dict[torch.device, Tensor]:
    """Per device, a float32 flag on that device: 1 where some of these (plain, not sharded)
    gradients holds a NaN or an infinity, else 0. Never read on the host here.

    GradScaler's own check (``_amp_foreach_non_finite_check_and_unscale_``, with a scale of 1,
    which leaves every value as it was): one multi-tensor kernel per device and dtype that looks
    at each entry, so a huge finite entry is never taken for an overflow (a norm can overflow)
    and many small tensors cost one launch. Complex gradients are checked as their real parts
    and imaginary parts; sparse ones by their values."""
    grads = list(grads)
    dtypes = set(map(DTYPE, grads))
    if any(map(_IS_SPARSE, grads)) or any(dtype.is_complex for dtype in dtypes):
        grads = [g.coalesce().values() if g.is_sparse else g for g in grads]
        grads = [torch.view_as_real(g) if g.is_complex() else g for g in grads]
        dtypes = set(map(DTYPE, grads))
    if grads and len(dtypes) == 1 and all(map(IS_CPU, grads)):
        buckets = {(grads[0].device, grads[0].dtype): grads}  # the common case, in C-level maps
    else:
        buckets = {}
        for g in grads:
            buckets.setdefault(_DEVICE_AND_DTYPE(g), []).append(g)
    flags: dict[torch.device, Tensor] = {}
    for (device, _), gs in buckets.items():
        if device not in flags:
            flags[device] = torch.zeros((), dtype=torch.float32, device=device)
        one = torch.ones((), dtype=torch.float32, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(gs, flags[device], one)
    return flags


def sharded_nonfinite(grads: list[Tensor]) -> Tensor | None:
    """For DTensor gradients: a float flag, 1 where an entry of some shard on some rank is
    NaN or infinite, else 0, the same on every rank; None for no gradients. Each shard is
    checked locally, and one all-reduce per device mesh dimension combines the answers (a
    check per gradient would be one collective per gradient). Never read on the host here."""
    if not grads:
        return None
    import torch.distributed as dist

    by_mesh: dict[int, tuple[Any, list[Tensor]]] = {}
    for g in grads:
        by_mesh.setdefault(id(g.device_mesh), (g.device_mesh, []))[1].append(g)  # type: ignore[attr-defined]
    flags = []
    for mesh, gs in by_mesh.values():
        local = [g.to_local() for g in gs]  # type: ignore[attr-defined]
        flag = torch.stack([torch.isfinite(t).all() for t in local]).all().logical_not().float()
        for dim in range(mesh.ndim):
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))
        flags.append(flag)
    result = flags[0]
    for f in flags[1:]:
        result = torch.maximum(result, f.to(result.device))
    return result


def grouped_by_device_and_dtype(lists: list[list[Any]]) -> list[tuple[list[list[Any]], list[int]]]:
    """torch's grouping of parallel tensor lists by (device, dtype) of the first list, as
    plain lists, with the indices of each bucket's entries in the input lists."""
    first = lists[0]
    if first and all(map(IS_CPU, first)) and len(set(map(DTYPE, first))) == 1:
        # one bucket, as torch's grouping (which looks at the first list only) would make;
        # torch's C grouping walks every tensor of every list; the two maps here read the first list only
        return [([list(t) for t in lists], list(range(len(first))))]
    grouped = torch.optim.Optimizer._group_tensors_by_device_and_dtype(lists, with_indices=True)  # type: ignore[arg-type]
    return [([list(t) for t in tensors], list(indices)) for tensors, indices in grouped.values()]


def by_device_and_dtype(tensors: Iterable[Tensor]) -> list[list[Tensor]]:
    buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.device, t.dtype), []).append(t)
    return list(buckets.values())


def device_types_and_dtypes(params: list[Tensor]) -> set[tuple[str, torch.dtype]]:
    """The (device type, dtype) pairs among ``params`` (``.device`` builds an object: skip it on CPU)."""
    if all(map(IS_CPU, params)):
        return {("cpu", t) for t in set(map(DTYPE, params))}
    return {(d.type, t) for d, t in map(_DEVICE_AND_DTYPE, params)}
