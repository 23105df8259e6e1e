r"""Stochastic gradient descent with momentum, dampening, Nesterov and maximize.

.. math::
   \begin{aligned}
   &g_t \leftarrow \pm\nabla f(\theta_{t-1})
        \quad(\text{minus when maximizing})\\
   &\textbf{coupled: } g_t \leftarrow g_t + \lambda\theta_{t-1} + \lambda_1\,\mathrm{sgn}(\theta_{t-1})
    \qquad \textbf{decoupled modes: } \theta_{t-1} \leftarrow \theta_{t-1}(1 - s\lambda)\\
   &b_t \leftarrow g_t \ (t = 1), \qquad b_t \leftarrow \mu b_{t-1} + (1-\tau) g_t \ (t > 1)\\
   &g_t \leftarrow g_t + \mu b_t \ (\text{nesterov}), \qquad g_t \leftarrow b_t \ (\text{otherwise})\\
   &\theta_t \leftarrow \theta_{t-1} - \gamma g_t\\
   &\textbf{decoupled L1: } \theta_t \leftarrow \mathrm{sgn}(\theta_t)\max(|\theta_t| - s\lambda_1, 0)
   \end{aligned}

with γ = lr, μ = momentum, τ = dampening and s the decoupled scale of
:mod:`descend.regularization` (lr, lr/lr₀ or 1). With ``decay="coupled"`` (the default)
this is ``torch.optim.SGD`` exactly, quirks included: the first momentum step takes the raw
gradient without dampening, and parameters whose grad is None are not touched.

Without momentum, coupled and decoupled weight decay coincide for SGD (θ − γ(g + λθ) =
θ(1 − γλ) − γg); with momentum they do not, since coupled decay goes through the buffer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from descend import dispatch
from descend.optimizer import GroupBatch, RegularizedOptimizer
from descend.regularization import Absorbs
from descend.state import Entry, StateSpec
from descend.tensors import grouped_by_device_and_dtype
from descend.validation import check_number, invalid

__all__ = ["SGD", "sgd"]

#: the momentum buffer is the first step's gradient, made by the rule (torch keeps None without momentum)
STATE = StateSpec((Entry("momentum_buffer", init=None, required=False, none_allowed=True),))


def sgd(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor | None], *, lr: float,
        momentum: float, dampening: float, nesterov: bool, maximize: bool = False, weight_decay: float = 0.0,
        implementation: str = "single", grad_scale: Tensor | None = None, found_inf: Tensor | None = None) -> None:
    """Functional SGD over lists of tensors (the rule alone: regularization is the pipeline's);
    new momentum buffers are written into ``momentum_buffers`` (one entry per parameter when
    momentum ≠ 0). ``maximize`` and ``weight_decay`` (coupled) are the fused kernel's own terms,
    and so are ``grad_scale`` (the gradients are divided by it) and ``found_inf`` (where nonzero,
    nothing changes), which only the fused form takes."""
    if implementation != "fused" and (grad_scale is not None or found_inf is not None):
        raise ValueError("grad_scale and found_inf are the fused kernel's (other forms: unscale and skip first)")
    extra = dict(grad_scale=grad_scale, found_inf=found_inf) if implementation == "fused" else {}
    impl = {"single": _single_tensor_sgd, "foreach": _multi_tensor_sgd, "fused": _fused_sgd}[implementation]
    if not (implementation == "foreach" and isinstance(lr, Tensor) and dispatch.compiling()):
        lr = float(lr)  # (traced, a tensor lr stays one: float() of it would break the graph)
    impl(params, grads, momentum_buffers, lr=lr, momentum=momentum, dampening=dampening,
         nesterov=nesterov, maximize=maximize, weight_decay=weight_decay, **extra)


def _single_tensor_sgd(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor | None], *,
                       lr: float, momentum: float, dampening: float, nesterov: bool, maximize: bool,
                       weight_decay: float) -> None:
    """The reference: one tensor at a time, each line a line of the math above."""
    assert not maximize and weight_decay == 0, "the pipeline applies these for the reference"
    for i, param in enumerate(params):
        grad = grads[i]
        if momentum != 0:
            buf = momentum_buffers[i]
            if buf is None:
                buf = grad.detach().clone()
                momentum_buffers[i] = buf
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - dampening)
            grad = grad.add(buf, alpha=momentum) if nesterov else buf
        param.add_(grad, alpha=-lr)


def _multi_tensor_sgd(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor | None], *,
                      lr: float | Tensor, momentum: float, dampening: float, nesterov: bool, maximize: bool,
                      weight_decay: float) -> None:
    """The same rule with torch's multi-tensor (foreach) kernels, per device and dtype."""
    assert not maximize and weight_decay == 0, "the pipeline applies these for foreach"
    lists: list[list[Any]] = [params, grads, momentum_buffers] if momentum != 0 else [params, grads]
    for tensors, indices in dispatch.grouped(lists):
        device_params: list[Tensor] = tensors[0]
        device_grads: list[Tensor] = tensors[1]
        if momentum != 0:
            bufs: list[Tensor] = tensors[2]
            if all(b is not None for b in bufs):
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, device_grads, alpha=1 - dampening)
            else:  # a first step for some: b₁ = g₁, as torch
                for j, buf in enumerate(tensors[2]):
                    if buf is None:
                        bufs[j] = momentum_buffers[indices[j]] = device_grads[j].detach().clone()
                    else:
                        buf.mul_(momentum).add_(device_grads[j], alpha=1 - dampening)
            if nesterov:
                device_grads = list(torch._foreach_add(device_grads, bufs, alpha=momentum))
            else:
                device_grads = bufs
        if isinstance(lr, Tensor):  # only while torch.compile traces the step (alpha takes a number)
            torch._foreach_add_(device_params, torch._foreach_mul(device_grads, -lr))
        else:
            torch._foreach_add_(device_params, device_grads, alpha=-lr)


def _fused_sgd(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor | None], *,
               lr: float, momentum: float, dampening: float, nesterov: bool, maximize: bool,
               weight_decay: float, grad_scale: Tensor | None = None, found_inf: Tensor | None = None) -> None:
    """torch's fused SGD kernel, which negates the gradient (``maximize``) and adds the coupled
    ``weight_decay`` term itself, divides the gradients by ``grad_scale`` and changes nothing
    where ``found_inf`` is nonzero. A momentum buffer made for a first step that such a flag
    skips is zeros (torch's is left uninitialised): the next step then takes (1 − dampening)·g."""
    lists: list[list[Any]] = [params, grads, momentum_buffers] if momentum != 0 else [params, grads]
    for tensors, indices in grouped_by_device_and_dtype(lists):
        device_params: list[Tensor] = tensors[0]
        device_grads: list[Tensor] = tensors[1]
        device = device_params[0].device
        options: dict[str, Any] = dict(
            weight_decay=weight_decay, momentum=momentum, lr=lr, dampening=dampening, nesterov=nesterov,
            maximize=maximize, grad_scale=grad_scale.to(device, non_blocking=True) if grad_scale is not None else None,
            found_inf=found_inf.to(device, non_blocking=True) if found_inf is not None else None)
        if momentum == 0:
            torch._fused_sgd_(device_params, device_grads, [], is_first_step=False, **options)
            continue
        # the kernel takes one is_first_step for the whole list: new buffers go in their own call
        old = [j for j, b in enumerate(tensors[2]) if b is not None]
        new = [j for j, b in enumerate(tensors[2]) if b is None]
        for chosen, first in ((old, False), (new, True)):
            if not chosen:
                continue
            if first:
                new_buffer = torch.empty_like if found_inf is None else torch.zeros_like
                for j in chosen:
                    momentum_buffers[indices[j]] = new_buffer(device_grads[j])
            bufs = [momentum_buffers[indices[j]] for j in chosen]
            torch._fused_sgd_([device_params[j] for j in chosen], [device_grads[j] for j in chosen],
                              bufs, is_first_step=first, **options)  # type: ignore[arg-type]


class SGD(RegularizedOptimizer):
    r"""SGD with momentum, dampening, Nesterov, maximize, and descend's regularization.

    Args:
        params: tensors, parameter-group dicts, or ``(name, tensor)`` pairs.
        lr: learning rate γ (default 1e-3).
        momentum: μ in [0, 1) (default 0).
        dampening: τ in [0, 1] (default 0).
        weight_decay: λ ≥ 0 (default 0); see ``decay``.
        nesterov: Nesterov momentum (needs momentum > 0 and dampening = 0).
        l1: λ₁ ≥ 0, L1 regularization (default 0).
        decay: ``"coupled"`` (default, torch's L2), ``"decoupled"``, ``"independent"`` or
            ``"fixed"``; see :mod:`descend.regularization`.
        maximize: maximize the objective instead of minimizing it.
        foreach, fused: force the multi-tensor or the fused implementation
            (``foreach=False`` forces the per-tensor reference); by default the fastest
            one that applies.
        nonfinite: ``"ignore"`` (default), ``"skip"`` or ``"raise"`` for steps whose
            gradients hold NaN or inf.
        flat: keep parameters, gradients and state in one buffer per device and dtype, so
            that one kernel steps many small tensors (see :mod:`descend.flat`).
        warn: warn (once, at construction and in ``add_param_group``) about a decoupled decay
            that shrinks the weights by more than 1% per step (default True).
        rounding: how 16-bit parameters are written back: ``"nearest"`` (default, torch's),
            ``"compensated"`` (a 16-bit Kahan buffer per parameter keeps what rounding drops)
            or ``"stochastic"`` (up or down with the probability of the distance; reproducible).
            float32 and float64 parameters ignore it. See :mod:`descend.precision`.
        state_dtype: the dtype of the state shaped like θ: None (θ's, as torch), ``torch.float32``,
            ``torch.bfloat16``, ``torch.float16`` or ``"8bit"`` (block-wise quantized).

    The update rule is in the docstring of :mod:`descend.optimizers.sgd`.
    """

    state_spec = STATE
    _absorbs = {"fused": Absorbs(maximize=True, coupled=True)}
    _amp_fused = True
    _group_keys = ("momentum", "dampening", "nesterov")
    # torch 2.13's fused SGD on the CPU leaves whole SIMD blocks of 16-bit parameters
    # unchanged (seen in tests/test_properties.py): those take the foreach path instead
    _fused_broken = frozenset({("cpu", torch.bfloat16), ("cpu", torch.float16)})

    def __init__(self, params: Any, lr: float | Tensor = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float = 0, nesterov: bool = False, *, l1: float = 0, decay: str = "coupled",
                 maximize: bool = False, foreach: bool | None = None, fused: bool | None = None,
                 nonfinite: str = "ignore", flat: bool = False,
                 warn: bool = True, rounding: str = "nearest",
                 state_dtype: Any = None) -> None:
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, l1=l1, decay=decay, maximize=maximize, foreach=foreach,
                        fused=fused)
        super().__init__(params, defaults, nonfinite=nonfinite, warn=warn, flat=flat, rounding=rounding,
                         state_dtype=state_dtype)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_number("momentum", group["momentum"], low=0, high=1)
        check_number("dampening", group["dampening"], low=0, high=1, high_open=False)
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise invalid("nesterov", group["nesterov"],
                           f"True only with momentum > 0 and dampening = 0, got momentum={group['momentum']!r}, "
                           f"dampening={group['dampening']!r}")

    def _update(self, batch: GroupBatch, implementation: str) -> None:
        group, terms = batch.group, batch.terms
        momentum = group["momentum"]
        bufs = batch.state_list("momentum_buffer") if momentum != 0 else []
        sgd(batch.params, batch.grads, bufs, lr=group["lr"], momentum=momentum, dampening=group["dampening"],
            nesterov=group["nesterov"], maximize=terms.maximize, weight_decay=terms.weight_decay,
            implementation=implementation, grad_scale=batch.grad_scale, found_inf=batch.found_inf)
        if momentum != 0:
            for state, buf in zip(batch.states, bufs, strict=True):
                state["momentum_buffer"] = buf
