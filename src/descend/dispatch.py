"""Which implementation steps a group, and the speed machinery around it.

An update rule has a per-tensor reference and, where it pays, a multi-tensor (foreach) and a
fused form; all compute the same math (tests hold them equal). :func:`choose` picks one for
a group's batch: torch's fused kernel wherever it computes the same math, else foreach, else
the reference; ``fused=`` / ``foreach=`` force a path as in torch. Under ``torch.compile``
it picks foreach, which compiles (torch's fused CPU kernels have no fake kernels), and
:func:`grouped` leaves the grouping by device and dtype to inductor, as torch.optim does.

Also here, because they only make a step faster and never change a number:

- :class:`Verified`: a group's parameters and state objects at the last step whose state was
  checked; while a step shows the very same objects, the checks that depend on them alone
  are skipped (per parameter they cost more than the rest of a step over many small tensors);
- :func:`run_serialized`: the small CPU tensors of a fused step run on one thread (torch's
  fused CPU kernels open a parallel region for every tensor, however small).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from descend.tensors import IS_CPU, device_types_and_dtypes, grouped_by_device_and_dtype, is_dtensor

if TYPE_CHECKING:
    from descend.optimizer import GroupBatch

__all__ = ["IMPLEMENTATIONS", "choose", "grouped", "Verified", "run_serialized", "compiling"]

IMPLEMENTATIONS = ("fused", "foreach", "single")

_PLAIN_TENSOR_TYPES = frozenset((Tensor, torch.nn.Parameter))

#: below this many elements a tensor's fused update runs on one thread (ATen's GRAIN_SIZE).
SERIAL_NUMEL = 32768


def compiling() -> bool:
    """Whether the step is being traced by torch.compile (dynamo)."""
    return bool(torch.compiler.is_compiling())


@dataclass
class Verified:
    """A group's parameters (and where their data lives) and state entries at the last step
    whose states were checked. While a step shows the very same objects, what depends on them
    alone (state shapes and dtypes, the kinds of device and dtype, contiguity of parameters
    and state) is not checked again. (A tensor resized in place, or a ``p.data`` replaced by
    a view of the same memory in another shape, is not noticed; torch.optim checks neither.)"""

    params: list[Tensor]
    ptrs: list[int]
    values: list[Any]  # held, so that no new object can reuse a checked one's id
    facts: tuple[bool, set[tuple[str, torch.dtype]], bool] | None = None  # of static_facts
    current: list[Tensor] | None = None  # the params list of this step's batch
    shapes: list[torch.Size] | None = None  # the parameters' shapes when their state was checked
    grads: list[Any] | None = None  # weak references to the last step's gradients, checked against the parameters

    def matches(self, params: list[Tensor], ptrs: list[int], values: list[Any]) -> bool:
        return (len(params) == len(self.params) and len(values) == len(self.values) and ptrs == self.ptrs
                and all(map(operator.is_, params, self.params)) and all(map(operator.is_, values, self.values)))


def static_facts(batch: GroupBatch) -> tuple[bool, set[tuple[str, torch.dtype]], bool]:
    """What :func:`choose` needs that depends on parameters and state only: whether all
    parameters are plain tensors, their (device type, dtype) pairs, and whether parameters and
    state tensors are all contiguous."""
    contiguous = Tensor.is_contiguous
    plain = set(map(type, batch.params)) <= _PLAIN_TENSOR_TYPES
    kinds = device_types_and_dtypes(batch.params)
    static_dense = all(map(contiguous, batch.params))
    if static_dense:
        try:
            static_dense = all(map(contiguous, itertools.chain.from_iterable(map(dict.values, batch.states))))
        except TypeError:  # a state entry that is not a tensor (it has no layout)
            static_dense = all(contiguous(v) for st in batch.states for v in st.values() if isinstance(v, Tensor))
    return plain, kinds, static_dense


def one_dense_layout(batch: GroupBatch) -> bool:
    """Whether every parameter, its gradient and its θ-shaped state tensors share one dense,
    non-overlapping layout. torch's fused kernels (on CPU at least) index all of them as
    one flat array, so a transposed gradient of a contiguous parameter (or a strided
    parameter with gaps) would silently be updated with the wrong elements."""
    contiguous = Tensor.is_contiguous
    if all(map(contiguous, batch.params)) and all(map(contiguous, batch.grads)):
        values = itertools.chain.from_iterable(map(dict.values, batch.states))
        try:
            if all(map(contiguous, values)):
                return True  # the common case, checked in C
        except TypeError:  # a state entry that is not a tensor (it has no layout)
            if all(contiguous(v) for state in batch.states for v in state.values() if isinstance(v, Tensor)):
                return True
    for p, g, state in zip(batch.params, batch.grads, batch.states):
        stride = p.stride()
        if not _dense(p) or g.stride() != stride or any(
                v.stride() != stride for v in state.values() if isinstance(v, Tensor) and v.dim() > 0):
            return False
    return True


def _dense(t: Tensor) -> bool:
    """Non-overlapping and dense: some permutation of the dimensions is contiguous."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def fused_devices() -> list[str]:
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    return list(_get_fused_kernels_supported_devices())


def foreach_devices() -> list[str]:
    from torch.utils._foreach_utils import _get_foreach_kernels_supported_devices
    return list(_get_foreach_kernels_supported_devices()) + ["cpu"]


def choose(batch: GroupBatch, *, fast_paths: tuple[str, ...], fused_broken: frozenset[tuple[str, torch.dtype]],
           kind: str, verified: Verified | None, fused_dtensor: bool = False) -> str:
    """The implementation for one group's batch: "fused", "foreach" or "single".

    ``fast_paths`` are the rule's forms besides the reference, ``fused_broken`` the (device
    type, dtype) pairs on which torch's fused kernel of the rule is wrong. Fused also needs
    each parameter, its gradient and its state in one dense layout (:func:`one_dense_layout`);
    where they differ the default is foreach. ``fused_dtensor``: the rule's fused kernel has a
    DTensor (FSDP2) sharding rule (torch's fused Adam and AdamW kernels do), so a group whose
    parameters are all DTensors takes it, as torch's ``fused=True`` does."""
    group, params = batch.group, batch.params
    if compiling():
        return _choose_compiling(batch, fast_paths)
    if verified is not None and verified.current is params:  # the same tensors as a step that was checked
        if verified.facts is None:
            verified.facts = static_facts(batch)
        plain, kinds, static_dense = verified.facts
    else:
        plain, kinds, static_dense = static_facts(batch)

    def dense() -> bool:
        return (static_dense and all(map(Tensor.is_contiguous, batch.grads))) or one_dense_layout(batch)

    complex_ = any(t.is_complex for _, t in kinds)
    if not plain and fused_dtensor and group.get("fused") and all(map(is_dtensor, params)):
        plain = True  # (asked for, as torch's: the default for DTensors stays foreach, torch's default)
    fused_ok = ("fused" in fast_paths and plain and not complex_
                and all(d in fused_devices() and t.is_floating_point for d, t in kinds))
    broken = [(d, t) for d, t in kinds if (d, t) in fused_broken]
    if group.get("fused"):
        if not fused_ok and not plain and all(map(is_dtensor, params)):
            raise RuntimeError(f"fused=True: torch's fused {kind} kernel has no DTensor (FSDP2) sharding rule; "
                               "use foreach=True (the default for DTensors)")
        if not fused_ok:
            raise RuntimeError(
                "fused=True needs floating-point, non-complex tensors on a device with fused kernels "
                f"({', '.join(fused_devices())})")
        if broken:
            raise RuntimeError(
                f"fused=True: torch {torch.__version__}'s fused {kind} kernel leaves "
                f"{broken[0][1]} parameters on {broken[0][0]} unchanged; use foreach=True")
        if not dense():
            raise RuntimeError(
                "fused=True needs each parameter, its gradient and its state in one dense memory layout "
                "(torch's fused kernels walk raw memory); use foreach=True, or make them contiguous")
        return "fused"
    if group.get("foreach") is False:
        return "single"
    foreach_ok = "foreach" in fast_paths and not complex_ and all(d in foreach_devices() for d, _ in kinds)
    if group.get("foreach"):
        return "foreach" if foreach_ok else "single"
    if fused_ok and not broken and dense():
        return "fused"
    # DTensor (FSDP2) supports the foreach kernels, and they are torch's default for it too
    return "foreach" if foreach_ok and (plain or all(map(is_dtensor, params))) else "single"


def _choose_compiling(batch: GroupBatch, fast_paths: tuple[str, ...]) -> str:
    """:func:`choose` while torch.compile traces the step: foreach wherever the rule has it and
    the tensors allow it, else the reference. Never fused: torch's fused CPU kernels have no
    fake kernels, and its fused AdamW trips functionalization; the foreach forms compile to
    the same math (``fused=True`` is honoured in eager mode only, after the same refusals).
    Written with plain loops and attribute reads, which dynamo traces without a break (the
    eager path's C-level maps over ``operator.attrgetter`` are not traceable)."""
    group, params = batch.group, batch.params
    kinds = {(p.device.type, p.dtype) for p in params}
    complex_ = any(t.is_complex for _, t in kinds)
    if group.get("fused"):
        plain = all(type(p) in _PLAIN_TENSOR_TYPES for p in params)
        if not ("fused" in fast_paths and plain and not complex_
                and all(d in fused_devices() and t.is_floating_point for d, t in kinds)):
            raise RuntimeError(
                "fused=True needs floating-point, non-complex tensors on a device with fused kernels "
                f"({', '.join(fused_devices())})")
    if group.get("foreach") is False:
        return "single"
    foreach_ok = "foreach" in fast_paths and not complex_ and all(d in foreach_devices() for d, _ in kinds)
    return "foreach" if foreach_ok else "single"


def grouped(lists: list[list[Any]]) -> list[tuple[list[list[Any]], list[int]]]:
    """:func:`descend.tensors.grouped_by_device_and_dtype`, except while torch.compile traces
    the step: then one bucket of everything, as torch.optim does (inductor groups by device
    and dtype when it lowers the foreach ops; the eager grouping is not traceable)."""
    if compiling():
        return [(lists, list(range(len(lists[0]))))]
    return grouped_by_device_and_dtype(lists)


@functools.cache
def _openmp() -> bool:
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


def can_serialize() -> bool:
    """Whether :func:`one_thread` helps and is safe: several intra-op threads, and the
    OpenMP backend, whose thread count is per calling thread (ATen's native pool is global)."""
    return torch.get_num_threads() > 1 and _openmp()


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_serialized(update: Callable[[GroupBatch, str], None], batch: GroupBatch) -> None:
    """``update(batch, implementation)``, with the small CPU tensors of a fused step run on one thread.

    torch's fused CPU kernels open a parallel region for every tensor, however small
    (grain size 0), which costs more than updating a few thousand elements: on a
    2-core machine it made fused AdamW on 2,000 tensors of 1,000 elements several
    times slower than the same kernel on one thread. ATen's own elementwise kernels stay
    on one thread below :data:`SERIAL_NUMEL` elements; so do we. Each element's update is
    independent of the threads, so results are bit-identical."""
    implementation = batch.implementation
    if implementation != "fused" or not can_serialize():
        update(batch, implementation)
        return
    small = [n < SERIAL_NUMEL and cpu for n, cpu in zip(map(Tensor.numel, batch.params), map(IS_CPU, batch.params))]
    if not any(small):
        update(batch, implementation)
        return
    if all(small):
        with one_thread():
            update(batch, implementation)
        return
    for serial in (True, False):
        part = batch.part([is_small is serial for is_small in small])
        if serial:
            with one_thread():
                update(part, implementation)
        else:
            update(part, implementation)
