r"""Adadelta (Zeiler 2012, "ADADELTA: An Adaptive Learning Rate Method").

.. math::
   \begin{aligned}
   &g_t \leftarrow \pm\nabla f(\theta_{t-1}) \quad(\text{minus when maximizing})\\
   &\textbf{coupled: } g_t \leftarrow g_t + \lambda\theta_{t-1} + \lambda_1\,\mathrm{sgn}(\theta_{t-1})
    \qquad \textbf{decoupled modes: } \theta_{t-1} \leftarrow \theta_{t-1}(1 - s\lambda)\\
   &v_t \leftarrow \rho v_{t-1} + (1-\rho) g_t^2\\
   &\Delta x_t \leftarrow \frac{\sqrt{u_{t-1} + \epsilon}}{\sqrt{v_t + \epsilon}}\, g_t\\
   &u_t \leftarrow \rho u_{t-1} + (1-\rho) \Delta x_t^2\\
   &\theta_t \leftarrow \theta_{t-1} - \gamma \Delta x_t\\
   &\textbf{decoupled L1: } \theta_t \leftarrow \mathrm{sgn}(\theta_t)\max(|\theta_t| - s\lambda_1, 0)
   \end{aligned}

with γ = lr (1 in the paper, which has none), v = ``square_avg`` and u = ``acc_delta`` (both
zeros at first), and s the decoupled scale of :mod:`descend.regularization`. The step is the
ratio of two running RMS values, so it has the units of θ. With ``decay="coupled"`` (the
default) this is ``torch.optim.Adadelta``: torch adds λθ to the gradient after negating it for
maximize, the pipeline's coupled term. A complex parameter is stepped as its real and
imaginary parts, as torch does; the ``step`` count is kept as torch keeps it (float32, on the
host), though the rule does not read it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from descend import dispatch
from descend.optimizer import GroupBatch, RegularizedOptimizer
from descend.state import SCALAR, Entry, StateSpec
from descend.tensors import count_step_
from descend.validation import check_number, invalid

__all__ = ["Adadelta", "adadelta"]

STATE = StateSpec((
    Entry("step", SCALAR, low=0, device="cpu"),
    Entry("square_avg", low=0),
    Entry("acc_delta", low=0),
))


def adadelta(params: list[Tensor], grads: list[Tensor], square_avgs: list[Tensor], acc_deltas: list[Tensor],
             steps: list[Tensor], *, lr: float | Tensor, rho: float, eps: float,
             implementation: str = "single") -> None:
    """Functional Adadelta over lists of tensors (the rule alone: regularization and maximize are
    the pipeline's; state updated in place, ``steps`` incremented)."""
    impl: Callable[..., None] = {"single": _single_tensor_adadelta, "foreach": _multi_tensor_adadelta}[implementation]
    if not (implementation == "foreach" and isinstance(lr, Tensor) and dispatch.compiling()):
        lr = float(lr)  # torch's γ·x with a tensor γ is γ's value as a number: the same result
    impl(params, grads, square_avgs, acc_deltas, steps, lr=lr, rho=float(rho), eps=float(eps))


def _single_tensor_adadelta(params: list[Tensor], grads: list[Tensor], square_avgs: list[Tensor],
                            acc_deltas: list[Tensor], steps: list[Tensor], *, lr: float, rho: float,
                            eps: float) -> None:
    """The reference: one tensor at a time, each line a line of the math above."""
    for param, grad, square_avg, acc_delta, step in zip(params, grads, square_avgs, acc_deltas, steps, strict=True):
        step += 1
        if torch.is_complex(param):
            param, grad = torch.view_as_real(param), torch.view_as_real(grad)
            square_avg, acc_delta = torch.view_as_real(square_avg), torch.view_as_real(acc_delta)
        square_avg.mul_(rho).addcmul_(grad, grad, value=1 - rho)
        std = square_avg.add(eps).sqrt_()
        delta = acc_delta.add(eps).sqrt_().div_(std).mul_(grad)
        acc_delta.mul_(rho).addcmul_(delta, delta, value=1 - rho)
        param.add_(delta, alpha=-lr)


def _multi_tensor_adadelta(params: list[Tensor], grads: list[Tensor], square_avgs: list[Tensor],
                           acc_deltas: list[Tensor], steps: list[Tensor], *, lr: float | Tensor, rho: float,
                           eps: float) -> None:
    """The same rule with torch's multi-tensor (foreach) kernels, per device and dtype (never complex)."""
    for (p, g, v, u, t), _ in dispatch.grouped([params, grads, square_avgs, acc_deltas, steps]):
        count_step_(t)
        torch._foreach_mul_(v, rho)
        torch._foreach_addcmul_(v, g, g, value=1 - rho)
        std = torch._foreach_add(v, eps)
        torch._foreach_sqrt_(std)
        deltas = torch._foreach_add(u, eps)
        torch._foreach_sqrt_(deltas)
        torch._foreach_div_(deltas, std)
        torch._foreach_mul_(deltas, g)
        torch._foreach_mul_(u, rho)
        torch._foreach_addcmul_(u, deltas, deltas, value=1 - rho)
        if isinstance(lr, Tensor):  # only while torch.compile traces the step (alpha takes a number)
            torch._foreach_mul_(deltas, -lr)
            torch._foreach_add_(p, deltas)
        else:
            torch._foreach_add_(p, deltas, alpha=-lr)


class Adadelta(RegularizedOptimizer):
    r"""Adadelta, maximize, and descend's regularization.

    Args:
        params: tensors, parameter-group dicts, or ``(name, tensor)`` pairs.
        lr: learning rate γ, a factor on the step (default 1.0).
        rho: ρ in [0, 1], the decay of both running averages (default 0.9).
        eps: ε ≥ 0 inside both square roots (default 1e-6).
        weight_decay: λ ≥ 0 (default 0); see ``decay``.
        capturable: only False: descend keeps step counts on the host (no CUDA-graph capture).
        foreach, maximize, l1, nonfinite, flat, warn: as for :class:`descend.SGD` (no fused form).
        decay: ``"coupled"`` (default: torch's L2 ``weight_decay``), ``"decoupled"``,
            ``"independent"``, ``"fixed"`` or ``"corrected"``; see :mod:`descend.regularization`.

    The update rule is in the docstring of :mod:`descend.optimizers.adadelta`.
    """

    state_spec = STATE
    _fast_paths = ("foreach",)
    _group_keys = ("rho", "eps")

    def __init__(self, params: Any, lr: float | Tensor = 1.0, rho: float = 0.9, eps: float = 1e-6,
                 weight_decay: float = 0, foreach: bool | None = None, *, capturable: bool = False,
                 maximize: bool = False, decay: str = "coupled", l1: float = 0, nonfinite: str = "ignore",
                 flat: bool = False, warn: bool = True) -> None:
        if capturable is not False:
            raise invalid("capturable", capturable, "False: descend's Adadelta keeps step counts on the host")
        defaults = dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, l1=l1, decay=decay, maximize=maximize,
                        foreach=foreach)
        super().__init__(params, defaults, nonfinite=nonfinite, warn=warn, flat=flat)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_number("rho", group["rho"], low=0, high=1, high_open=False)
        check_number("eps", group["eps"], low=0)

    def _update(self, batch: GroupBatch, implementation: str) -> None:
        group = batch.group
        adadelta(batch.params, batch.grads, batch.state_list("square_avg"), batch.state_list("acc_delta"),
                 batch.state_list("step"), lr=group["lr"], rho=group["rho"], eps=group["eps"],
                 implementation=implementation)
