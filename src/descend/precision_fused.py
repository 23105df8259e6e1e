"""Adam and AdamW on low-precision storage in one compiled pass per tensor.

The general low-precision step (:mod:`descend.precision`) widens θ, g and the state into
float32 working tensors, runs the rule's float32 kernel over them, and writes them back: five
passes over memory where a step needs one. For the common case this module does it in one
kernel that torch.compile generates (C++ on a CPU, Triton on a GPU), reading each stored
tensor once and writing it once:

    g ← float(g)                        (+ λ·w for Adam's coupled decay)
    w ← float(θ) (+ float(c) where rounding="compensated"),  w ← w·(1 − lr·λ) (AdamW)
    m ← lerp(float(m), g, 1 − β₁),  v ← β₂·float(v) + (1 − β₂)·g²
    w ← w − lr/(1 − β₁ᵗ) · m / (√v/√(1 − β₂ᵗ) + ε)
    θ ← rn(w) (c ← rn(w − rn(w))),  m, v ← their stored dtype

which is the working path's arithmetic, equal to it to float32 rounding (and so to within one
unit in the last place of a 16-bit stored value). With 8-bit state the kernel works on
(blocks, 256) views: float(m) and float(v) are the codes' values times their block's scale,
and "their stored dtype" is each block's new maximum and the codes of m/max and v/max (the
code of :mod:`descend.precision`), so that a float32 difference can move a stored value to
its neighbouring level.

Taken where everything of the step is in that formula: in a batch with a tensor of at least
:data:`descend.precision.COMPILE_NUMEL` elements (a model of small tensors only is not worth
compiling a kernel for), every tensor of at least 2 elements (with 8-bit state, at least two
whole blocks of 256), torch's fused form chosen (not
``foreach=`` or ``fused=False``), a number lr, no AMSGrad, ``maximize``, L1, GradScaler
scale or capturable counts, step counts on the host, and a compiler that works (where none
does, the general path runs, after :mod:`descend.precision`'s one warning). Everything else,
the remaining tensors of the batch included, takes the general path. The tensors taken go
through the kernel four to a call (:data:`CHUNK`), and its loops run in 16-bit lanes
(:mod:`descend.lanes`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from descend import dispatch, precision, regularization
from descend.precision import BLOCK, COMPENSATION
from descend.tensors import count_step_

if TYPE_CHECKING:
    from descend.optimizer import GroupBatch

__all__ = ["adam_stored_step"]

#: off in the tests that compare this path with the general one
ENABLED = True
_PLAIN = frozenset((Tensor, torch.nn.Parameter))
_FLOATS = frozenset((torch.float32, torch.bfloat16, torch.float16))
#: a step's scalars (:func:`_scalars`)
Scalars = Tensor | tuple[float, ...]


def _scalars(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, bias_correction1: float,
             bias_correction2_sqrt: float, device: torch.device) -> Scalars:
    """The scalars of one step, as :func:`_adam_update` takes them: lr, β₁, β₂, ε, λ, the step
    size lr/(1 − β₁ᵗ) and 1/√(1 − β₂ᵗ) (the two quotients here, in float64 as a kernel would
    compute them, so that no loop divides scalars per vector). On a CPU one float64 tensor (a
    compiled call then checks and wraps one tensor instead of seven floats), elsewhere the
    floats themselves (where a CPU tensor would be a host argument of a device kernel)."""
    values = (lr, beta1, beta2, eps, weight_decay, lr / bias_correction1, 1 / bias_correction2_sqrt)
    return torch.tensor(values, dtype=torch.float64) if device.type == "cpu" else values


def _adam_update(w: Tensor, g: Tensor, m: Tensor, v: Tensor, scalars: Scalars, decoupled: bool
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Adam's step on float32 working values (module docstring): the new (w, m, v), with the
    scalars of :func:`_scalars`."""
    lr, beta1, beta2, eps, weight_decay, step_size, inverse_correction2 = (
        scalars.unbind() if isinstance(scalars, Tensor) else scalars)
    if decoupled:
        w = w * (1 - lr * weight_decay)
    else:
        g = g + weight_decay * w
    m = torch.lerp(m, g, (1 - beta1).float() if isinstance(beta1, Tensor) else 1 - beta1)
    v = v * beta2 + (1 - beta2) * g * g
    # (a product by 1/√(1 − β₂ᵗ) where the formula divides: one division per element, not two)
    denom = v.sqrt() * inverse_correction2 + eps
    return w - step_size * (m / denom), m, v


def _value(param: Tensor, compensation: Tensor | None) -> Tensor:
    return param.float() if compensation is None else precision._join(param, compensation)


def _store(w: Tensor, param: Tensor, compensation: Tensor | None) -> None:
    if compensation is not None:
        precision._split_into(w, param, compensation)  # (traced into the kernel)
    else:
        param.copy_(w.to(param.dtype))


def _adam_pass(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, compensation: Tensor | None,
               scalars: Scalars, decoupled: bool) -> None:
    """One tensor's step on 16-bit (or float32) state (module docstring)."""
    w, m, v = _adam_update(_value(param, compensation), grad.float(), exp_avg.float(), exp_avg_sq.float(), scalars,
                           decoupled)
    _store(w, param, compensation)
    exp_avg.copy_(m.to(exp_avg.dtype))
    exp_avg_sq.copy_(v.to(exp_avg_sq.dtype))


def _adam_8bit_pass(param: Tensor, grad: Tensor, m_codes: Tensor, m_absmax: Tensor, v_codes: Tensor,
                    v_absmax: Tensor, compensation: Tensor | None, scalars: Scalars, decoupled: bool) -> None:
    """One tensor's step on 8-bit state, every tensor as a (blocks, BLOCK) view (the scales
    (blocks, 1)): decoded, stepped, and each block's new maximum and codes written back, the
    code of :mod:`descend.precision` in the same kernel."""
    m = precision.code_values(m_codes, True) * m_absmax
    v = precision.code_values(v_codes, False) * v_absmax
    w, m, v = _adam_update(_value(param, compensation), grad.float(), m, v, scalars, decoupled)
    m_max, v_max = m.abs().amax(dim=1, keepdim=True), v.amax(dim=1, keepdim=True)
    m_codes.copy_(precision.codes_of(m, precision.inverse(m_max), True))
    v_codes.copy_(precision.codes_of(v, precision.inverse(v_max), False))
    # w as it is (no maximum is below 0, NaN included), but now read after the blocks' maxima:
    # inductor then computes it in the loop that writes the codes instead of in a loop of its
    # own through a float32 temporary (measured: 1.9x -> 1.6x torch's fused step, kernel alone)
    w = torch.where(v_max < 0, v_max, w)
    _store(w, param, compensation)
    m_absmax.copy_(m_max)
    v_absmax.copy_(v_max)


#: the tensors one compiled call steps together: a batch's tensors go in fours, the rest one
#: by one. A call has a fixed cost (dynamo's guards, the wrappers around the kernel) that four
#: tensors share: ``descend bench --sets precision`` went from 1.97–2.60× to 1.77–2.26× with 8-bit state and
#: from 1.48–1.53× to 1.19–1.30× with compensated weights. Two graphs per configuration, one
#: per function (its own code object, so that dynamo's recompile limit counts them apart),
#: where a call per list length would compile one for each length.
CHUNK = 4


def _adam_passes(tensors: list[tuple[Any, ...]], scalars: Scalars, decoupled: bool) -> None:
    """:func:`_adam_pass` for each of :data:`CHUNK` tensors' arguments, in one call."""
    for args in tensors:
        _adam_pass(*args, scalars, decoupled)  # type: ignore[call-arg]


def _adam_8bit_passes(tensors: list[tuple[Any, ...]], scalars: Scalars, decoupled: bool) -> None:
    """:func:`_adam_8bit_pass` for each of :data:`CHUNK` tensors' arguments, in one call."""
    for args in tensors:
        _adam_8bit_pass(*args, scalars, decoupled)  # type: ignore[call-arg]


def _eligible_group(optimizer: Any, batch: GroupBatch, lr: Any, plan: regularization.DecayPlan) -> bool:
    group = batch.group
    prec = optimizer._precision
    return (ENABLED and precision.COMPILE_NUMEL > 0 and batch.implementation == "fused"
            and prec.rounding in ("nearest", "compensated")
            and not isinstance(lr, Tensor) and not any(isinstance(b, Tensor) for b in group["betas"])
            and not group["amsgrad"] and not group.get("capturable") and not group["maximize"]
            and batch.grad_scale is None and batch.found_inf is None and not dispatch.compiling()
            and not precision._compile_failed(_pass(prec)) and not precision._compile_failed(_passes(prec))
            and plan.applied_by(optimizer._absorbs["fused"], maximize=False))


def _pass(prec: precision.Precision) -> Callable[..., None]:
    return _adam_8bit_pass if prec.state_dtype == "8bit" else _adam_pass


def _passes(prec: precision.Precision) -> Callable[..., None]:
    return _adam_8bit_passes if prec.state_dtype == "8bit" else _adam_passes


def _flat(x: Tensor) -> Tensor:
    """x as one dimension (a 1-D tensor as it is: no new view per tensor and step)."""
    return x if x.dim() == 1 else x.view(-1)


def _lanes(param: Tensor, exp_avg: Tensor) -> torch.dtype | None:
    """The 16-bit type of a 16-bit pass's loops (:mod:`descend.lanes`): that of the moments, or
    of the parameter. (8-bit passes take no hint: the codes are computed in every loop of
    theirs, and the hint only relabels loops that compute nothing.)"""
    for dtype in (exp_avg.dtype, param.dtype):
        if precision._is_16bit(dtype):
            return dtype
    return None


def _eligible(prec: precision.Precision, param: Tensor, grad: Tensor, state: dict[str, Any]) -> bool:
    if type(param) not in _PLAIN or type(grad) not in _PLAIN or param.dtype not in _FLOATS:
        return False
    # (a length-1 dimension would specialize the kernel: one more compile for nothing)
    if param.numel() < 2 or grad.dtype != param.dtype or grad.is_sparse:
        return False
    m, v, step = state.get("exp_avg"), state.get("exp_avg_sq"), state.get("step")
    if not (isinstance(m, Tensor) and isinstance(v, Tensor) and isinstance(step, Tensor) and step.is_cpu
            and step.dim() == 0):  # (the counts are read together, stacked)
        return False
    form = prec.stored_form(param)
    if form == "8bit":
        scales = [state.get(precision.absmax_key(k)) for k in ("exp_avg", "exp_avg_sq")]
        blocks = param.numel() // BLOCK
        if m.dtype != torch.uint8 or v.dtype != torch.uint8 or param.numel() % BLOCK or blocks < 2 \
                or not all(isinstance(a, Tensor) and a.shape == (blocks,) and a.dtype == torch.float32
                           and a.is_contiguous() for a in scales):
            return False  # (a ragged last block: the general path)
    elif m.dtype != form or v.dtype != form:
        return False
    tensors = [param, grad, m, v]
    if prec.rounding == "compensated" and precision._is_16bit(param.dtype):
        c = state.get(COMPENSATION)
        if not isinstance(c, Tensor):
            return False
        tensors.append(c)
    elif not isinstance(form, str) and form == param.dtype:
        return False  # nothing differs from torch's own fused step
    # (stepped as 1-D views: one compiled kernel serves every shape)
    return all(map(Tensor.is_contiguous, tensors))


def adam_stored_step(optimizer: Any, batch: GroupBatch, lr: Any,
                     plan: regularization.DecayPlan) -> GroupBatch | None:
    """Step the tensors of ``batch`` that this path takes (module docstring); return the batch
    of the others for the general path (None when none is left)."""
    if not _eligible_group(optimizer, batch, lr, plan):
        return batch
    if not any(p.numel() >= precision.COMPILE_NUMEL for p in batch.params):
        return batch  # (nothing here is worth compiling a kernel for)
    prec = optimizer._precision
    chosen = [_eligible(prec, p, g, s) for p, g, s in zip(batch.params, batch.grads, batch.states, strict=True)]
    if not any(chosen):
        return batch
    if hasattr(batch, "runs") and not all(chosen):
        return batch  # flat storage: its runs go together
    group = batch.group
    beta1, beta2 = (float(b) for b in group["betas"])
    # the kernel's terms (weight_decay, coupled or decoupled) as the fused form gets them; with
    # the whole plan absorbed (checked above) this touches no tensor
    _, terms = regularization.regularize_before([], [], plan, maximize=False, absorbs=optimizer._absorbs["fused"])
    compensated = prec.rounding == "compensated"
    kernel_fn = _pass(prec)
    hyper = (float(lr), beta1, beta2, float(group["eps"]), float(terms.weight_decay))
    # the scalars of each (step count, device): a CPU tensor must not reach a device kernel
    by_count: dict[tuple[float, torch.device], Scalars] = {}
    # each tensor's arguments, by what its call needs: step count, emulated casts, lanes
    # (and its device and dtype: a call's tensors share them, or each arrangement of dtypes in
    # a call of four would be a graph of its own, past dynamo's recompile limit)
    pending: dict[tuple[float, torch.device, torch.dtype, bool, torch.dtype | None],
                  list[tuple[Tensor | None, ...]]] = {}
    taken = [i for i, c in enumerate(chosen) if c]
    steps = [batch.states[i]["step"] for i in taken]
    count_step_(steps)  # (one add for all, and one read of the counts below)
    counts = torch.stack(steps).tolist() if len(steps) > 1 else [steps[0].item()]
    for i, t in zip(taken, counts, strict=True):
        param, grad, state = batch.params[i].detach(), batch.grads[i], batch.states[i]
        c = state[COMPENSATION].detach() if compensated and precision._is_16bit(param.dtype) else None
        if (t, param.device) not in by_count:
            by_count[t, param.device] = _scalars(*hyper, 1 - beta1**t, (1 - beta2**t) ** 0.5, device=param.device)
        if kernel_fn is _adam_8bit_pass:
            blocks = param.numel() // BLOCK
            views = [x.view(blocks, BLOCK) for x in (param, grad, state["exp_avg"], state["exp_avg_sq"])]
            if c is not None:
                views.append(c.view(blocks, BLOCK))
            for x in views:
                torch._dynamo.mark_static(x, 1)  # the block: a constant of the kernel (its loops vectorize)
            m_absmax, v_absmax = (state[precision.absmax_key(k)].view(blocks, 1) for k in ("exp_avg", "exp_avg_sq"))
            args: tuple[Tensor | None, ...] = (views[0], views[1], views[2], m_absmax, views[3], v_absmax,
                                               views[4] if c is not None else None)
            lanes = None
        else:
            m = state["exp_avg"]
            args = (_flat(param), _flat(grad), _flat(m), _flat(state["exp_avg_sq"]), None if c is None else _flat(c))
            lanes = _lanes(param, m)
        # without compensation the kernel casts to 16 bits only to store, and needs no emulated rounding
        exact_casts = c is not None
        pending.setdefault((t, param.device, param.dtype, exact_casts, lanes), []).append(args)
    # once the batch has one large tensor the kernel exists, and a call is cheaper than the
    # general path's dozen operations for the small ones too
    for (t, device, _, exact_casts, lanes), calls in pending.items():
        scalars = by_count[t, device]
        whole = len(calls) - len(calls) % CHUNK
        if whole:
            together = precision._kernel(_passes(prec), precision.COMPILE_NUMEL, exact_casts=exact_casts, lanes=lanes)
            for k in range(0, whole, CHUNK):
                together(calls[k:k + CHUNK], scalars, terms.decoupled)
        if whole < len(calls):
            alone = precision._kernel(kernel_fn, precision.COMPILE_NUMEL, exact_casts=exact_casts, lanes=lanes)
            for args in calls[whole:]:
                alone(*args, scalars, terms.decoupled)
    if all(chosen):
        return None
    return batch.part([not c for c in chosen])
