"""The base class of every descend optimizer.

It knows no algorithm. It owns what all of them share: parameter groups and their
defaults, validation of every option (at construction, in ``add_param_group`` and again
before each step, since groups are plain dicts a user may edit), ``base_lr`` (the lr a group
had when it was given to the optimizer, which ``decay="independent"`` divides by), the
non-finite gradient guard, the choice of implementation (fused, multi-tensor or the
per-tensor reference), and loading state dicts saved by torch.optim.

A step runs in two phases so that nothing is half-applied: :meth:`_prepare` gathers every
group's parameters, gradients and (new or existing) state and checks them all, raising
before anything changes; only then does :meth:`_update` run the update rule of each group.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import numbers
import operator
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from descend import regularization

if TYPE_CHECKING:
    from descend.flat import FlatStorage

NONFINITE_MODES = ("ignore", "skip", "raise")
IMPLEMENTATIONS = ("fused", "foreach", "single")

_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)


def _value(x: float | Tensor) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def _allowed(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"Invalid {name}: {value!r} (allowed: {allowed})")


def check_number(name: str, value: Any, *, low: float, high: float | None = None,
                 low_open: bool = False, high_open: bool = True) -> None:
    """Raise ValueError unless ``value`` is a finite real number in the stated interval."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, Tensor)):
        raise _allowed(name, value, "a real number")
    try:
        x = _value(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError):
        raise _allowed(name, value, "a real number") from None
    if not math.isfinite(x):
        raise _allowed(name, value, "a finite real number")
    lo_ok = x > low if low_open else x >= low
    hi_ok = high is None or (x < high if high_open else x <= high)
    if not (lo_ok and hi_ok):
        lo = f"{'(' if low_open else '['}{low:g}"
        hi = f"{high:g}{')' if high_open else ']'}" if high is not None else "inf)"
        raise _allowed(name, value, f"a number in {lo}, {hi}")


def check_flag(name: str, value: Any, *, optional: bool = False) -> None:
    """Raise ValueError unless ``value`` is a bool (or None where ``optional``): a string
    such as "no" would otherwise count as True."""
    if isinstance(value, bool) or (optional and value is None):
        return
    raise _allowed(name, value, "True or False" + (" or None" if optional else ""))


def check_regularization(group: dict[str, Any]) -> None:
    """The vocabulary every optimizer shares: weight_decay, l1 and decay."""
    check_number("weight_decay", group["weight_decay"], low=0)
    check_number("l1", group["l1"], low=0)
    decay = group["decay"]
    if decay not in regularization.DECAY_MODES:
        raise _allowed("decay", decay, ", ".join(repr(m) for m in regularization.DECAY_MODES))
    if decay == "fixed" and _value(group["weight_decay"]) >= 1:
        raise _allowed("weight_decay", group["weight_decay"],
                       'a number in [0, 1) with decay="fixed", which multiplies θ by 1 - weight_decay')


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

    def state_list(self, key: str) -> list[Any]:
        return [s.get(key) for s in self.states]


class RegularizedOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` with descend's regularization vocabulary.

    Subclasses provide ``_check_group`` (their own options), ``_new_state`` (the lazy state
    of one parameter) and ``_update`` (the update rule over one :class:`GroupBatch`).
    """

    #: implementations this optimizer has besides the per-tensor reference.
    _fast_paths: tuple[str, ...] = ("fused", "foreach")

    def __init__(self, params: Any, defaults: dict[str, Any], *, nonfinite: str = "ignore") -> None:
        if nonfinite not in NONFINITE_MODES:
            raise _allowed("nonfinite", nonfinite, ", ".join(repr(m) for m in NONFINITE_MODES))
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
            raise _allowed("lr", group["lr"], "a float or a 1-element tensor")
        check_regularization(group)
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
        group.setdefault("base_lr", _value(group["lr"]))

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
            group["base_lr"] = _value(group.get("initial_lr", group["lr"]))

    # --- state dicts -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["skipped_steps"] = self.skipped_steps
        return sd

    #: the state entries this optimizer keeps, and the group options that say which kind of
    #: optimizer saved a state dict (checked by descend.checkpoint before loading).
    _state_keys: tuple[str, ...] | None = None
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
        """The state of a parameter before its first step (subclasses override)."""
        return {}

    #: (device type, dtype) pairs on which torch's fused kernel of this optimizer is wrong
    _fused_broken: frozenset[tuple[str, torch.dtype]] = frozenset()

    #: state entries every parameter with state must have (checked before a step changes anything)
    _required_state: tuple[str, ...] = ()

    def _check_state(self, param: Tensor, state: dict[str, Any]) -> None:
        """Existing state must fit its parameter (entries, shapes, dtypes); else nothing may change."""
        missing = [k for k in self._required_state if k not in state]
        if missing:
            raise ValueError(f"the state of {self._describe_param(param)} lacks {missing}; nothing was changed")
        for key, value in state.items():
            if not isinstance(value, Tensor) or value.dim() == 0:
                continue  # scalars such as Adam's step are kept in float32 whatever the parameter
            if value.shape != param.shape:
                raise ValueError(
                    f"state {key!r} of {self._describe_param(param)} has shape {tuple(value.shape)}, "
                    f"but the parameter has shape {tuple(param.shape)}; nothing was changed"
                )
            if value.dtype != param.dtype:
                raise ValueError(
                    f"state {key!r} of {self._describe_param(param)} has dtype {value.dtype}, "
                    f"but the parameter has dtype {param.dtype}; nothing was changed"
                )

    def _prepare(self) -> list[GroupBatch]:
        flat = self._flat_storage()
        if flat is not None:
            return flat.prepare()
        batches = []
        state_of = self.state.get
        # the base check has a bulk form (per state key, in C): per parameter it cost more than the rest
        bulk = type(self)._check_state is RegularizedOptimizer._check_state
        verified: dict[int, _Verified] = self.__dict__.get("_verified") or {}
        self._verified: dict[int, _Verified] = {}
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
                    self._check_state(p, state)
                params.append(p)
                grads.append(grad)
                states.append(state)
            if bulk and params:
                values = list(itertools.chain.from_iterable(map(dict.values, states)))
                ptrs = list(map(Tensor.data_ptr, params))
                entry = verified.get(id(group))
                if entry is None or not entry.matches(params, ptrs, values):
                    if not _states_fit(params, states, self._required_state):
                        for p, state in zip(params, states):  # find it, and say what does not fit
                            if p not in batch.new:
                                self._check_state(p, state)
                    entry = _Verified(params, ptrs, values)
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
        sharded = [_all_finite(g) for g in grads if _is_dtensor(g)]
        # (an empty tensor is finite, and has no infinity norm: _foreach_norm would raise)
        plain = [g for g in grads if g.numel() and not _is_dtensor(g)]
        # One read of each gradient: a 2-norm is finite only if every entry is (NaN and ±inf
        # propagate), and torch's CPU kernel for it is several times faster than the inf-norm's.
        # A non-finite norm may also be the overflow of huge finite entries (|g| > 1e19 in
        # float32; float32 accumulation covers float16), so that answer is confirmed entry by entry.
        norms = [torch.stack(torch._foreach_norm(gs, 2, dtype=_norm_dtype(gs[0]))).isfinite().all()
                 for gs in _by_device_and_dtype(plain)]
        finite = not norms or bool(torch.stack([f.cpu() for f in norms]).all())
        if not finite:
            finite = all(_all_finite(g) for g in plain)
        return all(sharded) and finite

    def _first_nonfinite(self, batches: list[GroupBatch]) -> Tensor:
        for b in batches:
            for p, g in zip(b.params, b.grads, strict=True):
                if not _all_finite(g):
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
        """``_update``, with the small CPU tensors of a fused step run on one thread.

        torch's fused CPU kernels open a parallel region for every tensor, however small
        (grain size 0), which costs more than updating a few thousand elements: on a
        2-core machine it made fused AdamW on 2,000 tensors of 1,000 elements several
        times slower than the same kernel on one thread. ATen's own elementwise kernels stay
        on one thread below ``_SERIAL_NUMEL`` elements; so do we. Each element's update is
        independent of the threads, so results are bit-identical."""
        implementation = batch.implementation
        if implementation != "fused" or not _can_serialize():
            self._update(batch, implementation)
            return
        small = [n < _SERIAL_NUMEL and cpu for n, cpu in zip(map(Tensor.numel, batch.params),
                                                            map(_IS_CPU, batch.params))]
        if not any(small):
            self._update(batch, implementation)
            return
        if all(small):
            with _one_thread():
                self._update(batch, implementation)
            return
        for serial in (True, False):
            part = GroupBatch(batch.group, implementation=implementation)
            for p, g, state, is_small in zip(batch.params, batch.grads, batch.states, small):
                if is_small is serial:
                    part.params.append(p)
                    part.grads.append(g)
                    part.states.append(state)
            if serial:
                with _one_thread():
                    self._update(part, implementation)
            else:
                self._update(part, implementation)

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
        raise NotImplementedError

    # --- which implementation ----------------------------------------------------------

    def _implementation(self, batch: GroupBatch) -> str:
        """torch's fused kernels where they compute the same math, else multi-tensor
        (foreach) kernels, else the per-tensor reference. ``fused=`` / ``foreach=`` force a path.

        Fused also needs each parameter, its gradient and its state in one dense layout
        (:func:`_one_dense_layout`); where they differ the default is foreach."""
        group, params = batch.group, batch.params
        entry = self.__dict__.get("_verified", {}).get(id(group))
        if entry is not None and entry.current is params:  # the same tensors as a step that was checked
            if entry.facts is None:
                entry.facts = _static_facts(batch)
            plain, kinds, static_dense = entry.facts
        else:
            plain, kinds, static_dense = _static_facts(batch)

        def dense() -> bool:
            return (static_dense and all(map(Tensor.is_contiguous, batch.grads))) or _one_dense_layout(batch)

        complex_ = any(t.is_complex for _, t in kinds)
        fused_devices, foreach_devices = _fused_devices(), _foreach_devices()
        fused_ok = ("fused" in self._fast_paths and plain and not complex_
                    and all(d in fused_devices and t.is_floating_point for d, t in kinds))
        broken = [(d, t) for d, t in kinds if (d, t) in self._fused_broken]
        if group.get("fused"):
            if not fused_ok:
                raise RuntimeError(
                    "fused=True needs floating-point, non-complex tensors on a device with fused kernels "
                    f"({', '.join(fused_devices)})")
            if broken:
                raise RuntimeError(
                    f"fused=True: torch {torch.__version__}'s fused {type(self).__name__} kernel leaves "
                    f"{broken[0][1]} parameters on {broken[0][0]} unchanged; use foreach=True")
            if not dense():
                raise RuntimeError(
                    "fused=True needs each parameter, its gradient and its state in one dense memory layout "
                    "(torch's fused kernels walk raw memory); use foreach=True, or make them contiguous")
            return "fused"
        if group.get("foreach") is False:
            return "single"
        foreach_ok = "foreach" in self._fast_paths and not complex_ and all(d in foreach_devices for d, _ in kinds)
        if group.get("foreach"):
            return "foreach" if foreach_ok else "single"
        if fused_ok and not broken and dense():
            return "fused"
        # DTensor (FSDP2) supports the foreach kernels, and they are torch's default for it too
        return "foreach" if foreach_ok and (plain or all(map(_is_dtensor, params))) else "single"


_PLAIN_TENSOR_TYPES_SET = frozenset(_PLAIN_TENSOR_TYPES)


def _is_dtensor(t: Tensor) -> bool:
    """A torch.distributed DTensor (FSDP2's parameters and gradients), without importing it."""
    return _is_dtensor_type(type(t))


@functools.cache
def _is_dtensor_type(cls: type) -> bool:  # cached: the guard asks once per gradient per step
    return any(c.__name__ == "DTensor" and c.__module__.startswith("torch.distributed") for c in cls.__mro__)


def _norm_dtype(t: Tensor) -> torch.dtype | None:
    """float32 accumulation and result for 16-bit floats, whose own range a norm overflows."""
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None


def _all_finite(t: Tensor) -> bool:
    """Every entry is finite; for a DTensor, over all ranks' shards (its own answer covers
    only the local shard, and ranks must take the same decision)."""
    flag = torch.isfinite(t).all()
    full = getattr(flag, "full_tensor", None)
    return bool(full() if full is not None else flag)
_IS_CPU = operator.attrgetter("is_cpu")
#: below this many elements a tensor's fused update runs on one thread (ATen's GRAIN_SIZE).
_SERIAL_NUMEL = 32768


@functools.cache
def _openmp() -> bool:
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


def _can_serialize() -> bool:
    """Whether :func:`_one_thread` helps and is safe: several intra-op threads, and the
    OpenMP backend, whose thread count is per calling thread (ATen's native pool is global)."""
    return torch.get_num_threads() > 1 and _openmp()


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
_DEVICE_AND_DTYPE = operator.attrgetter("device", "dtype")
_DTYPE = operator.attrgetter("dtype")


_SHAPE = operator.attrgetter("shape")


def _states_fit(params: list[Tensor], states: list[dict[str, Any]], required: tuple[str, ...]) -> bool:
    """True if every state has the ``required`` entries and every state tensor of more than
    0 dimensions has its parameter's shape and dtype (the base ``_check_state``), checked key
    by key with C-level maps; False means "look closer" (a misfit, or states too irregular
    for the bulk form), never a wrong True."""
    keys = states[0].keys()
    if not all(map(keys.__eq__, map(dict.keys, states))) or not all(map(keys.__contains__, required)):
        return False
    shapes = dtypes = None
    for key in keys:
        values = list(map(operator.itemgetter(key), states))
        try:
            dims = list(map(Tensor.dim, values))
        except TypeError:  # not a tensor
            return False
        if not any(dims):
            continue  # all 0-dimensional (step counts): not checked
        if not all(dims):
            return False
        if shapes is None:
            shapes, dtypes = list(map(_SHAPE, params)), list(map(_DTYPE, params))
        if list(map(_SHAPE, values)) != shapes or list(map(_DTYPE, values)) != dtypes:
            return False
    return True


def _device_types_and_dtypes(params: list[Tensor]) -> set[tuple[str, torch.dtype]]:
    """The (device type, dtype) pairs among ``params`` (``.device`` builds an object: skip it on CPU)."""
    if all(map(_IS_CPU, params)):
        return {("cpu", t) for t in set(map(_DTYPE, params))}
    return {(d.type, t) for d, t in map(_DEVICE_AND_DTYPE, params)}


@dataclass
class _Verified:
    """A group's parameters (and where their data lives) and state entries at the last step
    whose states were checked. While a step shows the very same objects, what depends on them
    alone (state shapes and dtypes, the kinds of device and dtype, contiguity of parameters
    and state) is not checked again: per parameter, those checks cost more than the rest of
    a step over many small tensors. (A tensor resized in place, or a ``p.data`` replaced by
    a view of the same memory in another shape, is not noticed; torch.optim checks neither.)"""

    params: list[Tensor]
    ptrs: list[int]
    values: list[Any]  # held, so that no new object can reuse a checked one's id
    facts: tuple[bool, set[tuple[str, torch.dtype]], bool] | None = None  # of _static_facts
    current: list[Tensor] | None = None  # the params list of this step's batch

    def matches(self, params: list[Tensor], ptrs: list[int], values: list[Any]) -> bool:
        return (len(params) == len(self.params) and len(values) == len(self.values) and ptrs == self.ptrs
                and all(map(operator.is_, params, self.params)) and all(map(operator.is_, values, self.values)))


def _static_facts(batch: GroupBatch) -> tuple[bool, set[tuple[str, torch.dtype]], bool]:
    """What ``_implementation`` needs that depends on parameters and state only: whether all
    parameters are plain tensors, their (device type, dtype) pairs, and whether parameters and
    state tensors are all contiguous."""
    contiguous = Tensor.is_contiguous
    plain = set(map(type, batch.params)) <= _PLAIN_TENSOR_TYPES_SET
    kinds = _device_types_and_dtypes(batch.params)
    static_dense = all(map(contiguous, batch.params))
    if static_dense:
        try:
            static_dense = all(map(contiguous, itertools.chain.from_iterable(map(dict.values, batch.states))))
        except TypeError:  # a state entry that is not a tensor (it has no layout)
            static_dense = all(contiguous(v) for st in batch.states for v in st.values() if isinstance(v, Tensor))
    return plain, kinds, static_dense


def _one_dense_layout(batch: GroupBatch) -> bool:
    """Whether every parameter, its gradient and its state tensors share one dense,
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


def _fused_devices() -> list[str]:
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    return list(_get_fused_kernels_supported_devices())


def _foreach_devices() -> list[str]:
    from torch.utils._foreach_utils import _get_foreach_kernels_supported_devices
    return list(_get_foreach_kernels_supported_devices()) + ["cpu"]


def grouped_by_device_and_dtype(lists: list[list[Any]]) -> list[tuple[list[list[Any]], list[int]]]:
    """torch's grouping of parallel tensor lists by (device, dtype) of the first list, as
    plain lists, with the indices of each bucket's entries in the input lists."""
    first = lists[0]
    if first and all(map(_IS_CPU, first)) and len(set(map(_DTYPE, first))) == 1:
        # one bucket, as torch's grouping (which looks at the first list only) would make;
        # torch's C grouping walks every tensor of every list; the two maps here read the first list only
        return [([list(t) for t in lists], list(range(len(first))))]
    grouped = torch.optim.Optimizer._group_tensors_by_device_and_dtype(lists, with_indices=True)  # type: ignore[arg-type]
    return [([list(t) for t in tensors], list(indices)) for tensors, indices in grouped.values()]


def _by_device_and_dtype(tensors: Iterable[Tensor]) -> list[list[Tensor]]:
    buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.device, t.dtype), []).append(t)
    return list(buckets.values())
